"""Reading a reward-history plot (dno/plot.py) back from its pixels, for tests. Not a test module.

Only the plot's documented contract is used: a black frame, the mean-reward dots in
REWARD_COLOR, the data INSET pixels inside the frame.
"""
from __future__ import annotations

import numpy as np

from dno.plot import DOT_RADIUS, INSET, REWARD_COLOR


def frame_of(pixels):
    """The plot's black frame, found from the pixels: (left, top, right, bottom)."""
    black = (pixels <= 40).all(axis=-1)
    height, width = black.shape
    columns = np.flatnonzero(black.sum(axis=0) > 0.5 * height)
    rows = np.flatnonzero(black.sum(axis=1) > 0.5 * width)
    assert len(columns) >= 2 and len(rows) >= 2, "no frame in the plot"
    return columns.min(), rows.min(), columns.max(), rows.max()


def is_reward_blue(pixels):
    return (np.abs(pixels - np.array(REWARD_COLOR)) <= 6).all(axis=-1)


def assert_curve_matches(pixels, rewards, low=None, high=None):
    """The mean-reward dots sit where the values say (the plot's contract, dno/plot.py): inside
    the frame, INSET pixels in, x linear in the step from step 0 (left) to the last step (right),
    y linear in the reward from the lowest plotted value (bottom) to the highest (top). By default
    that range is a batch of 1's: its rewards and their running maximum (the best so far)."""
    left, top, right, bottom = frame_of(pixels)
    low = min(rewards) if low is None else low
    high = max(np.maximum.accumulate(rewards)) if high is None else high
    assert high > low, f"the rewards did not change ({rewards}): nothing to locate"
    blue = is_reward_blue(pixels)
    last = len(rewards) - 1
    for step, reward in enumerate(rewards):
        x = left + INSET + (right - left - 2 * INSET) * step / last
        y = bottom - INSET - (bottom - top - 2 * INSET) * (reward - low) / (high - low)
        cx, cy = int(round(x)), int(round(y))
        # the dot's centre is blue ...
        assert blue[cy - 1:cy + 2, cx - 1:cx + 2].all(), (step, reward, (x, y))
        # ... and in the dot's column, inside the frame (the legend is above it), the blue is only
        # the dot and the line leaving it
        column = top + np.flatnonzero(blue[top:bottom + 1, cx])
        assert column.min() >= cy - DOT_RADIUS - 3 and column.max() <= cy + DOT_RADIUS + 3, \
            (step, reward, (x, y), column.min(), column.max())
