"""dno/plot.py without a host: the series read from a history, and the plot of unusual histories
(a batch, a non-finite reward, a flat run, a run of step 0 only)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from dno.plot import plot_reward_history, series_from_history
from plot_reading import assert_curve_matches, is_reward_blue


def history(rewards, probabilities=None, stop_reason="completed"):
    steps = []
    for step, reward in enumerate(rewards):
        steps.append({"step": step, "reward": list(reward),
                      "probability": None if probabilities is None else list(probabilities[step])})
    return {"stop_reason": stop_reason, "steps": steps}


def test_series_means_the_batch_and_keeps_each_images_best():
    series = series_from_history(history([(1.0, 4.0), (3.0, 2.0), (2.0, 5.0)], [(0.5, 0.7)] * 3))
    assert series.steps == [0, 1, 2]
    assert series.reward == [2.5, 2.5, 3.5]
    assert series.best == [2.5, 3.5, 4.0]          # image 1: 1, 3, 3; image 2: 4, 4, 5
    assert series.per_image == [[1.0, 3.0, 2.0], [4.0, 2.0, 5.0]]
    assert series.probability == pytest.approx([0.6] * 3)


def test_plot_of_a_batch_puts_the_mean_where_it_belongs():
    rewards = [(0.1, 0.5), (0.3, 0.2), (0.6, 0.4), (0.2, 0.9)]
    pixels = plot_reward_history(history(rewards), 500, 320).astype(int)
    assert pixels.shape == (320, 500, 3)
    means = [float(np.mean(r)) for r in rewards]
    # the axis spans every plotted value, each image's line included: 0.1 .. 0.9
    assert_curve_matches(pixels, means, low=0.1, high=0.9)
    with pytest.raises(AssertionError):                 # not the means' own range
        assert_curve_matches(pixels, means)


def test_a_non_finite_reward_leaves_a_gap_not_a_crash():
    pixels = plot_reward_history(history([(0.1,), (math.nan,), (0.3,), (0.2,)]), 400, 300)
    series = series_from_history(history([(0.1,), (math.nan,), (0.3,), (0.2,)]))
    assert series.reward[1] is None and series.best == [0.1, 0.1, 0.3, 0.3]
    assert is_reward_blue(pixels.astype(int)).any()


def test_flat_and_single_step_runs_plot():
    for rewards in ([(0.4,)] * 3, [(0.4,)]):
        pixels = plot_reward_history(history(rewards), 300, 200).astype(int)
        assert is_reward_blue(pixels).sum() > 9     # at least the dots
    with pytest.raises(ValueError, match="at least 200 x 150"):
        plot_reward_history(history([(0.4,)]), 100, 100)
