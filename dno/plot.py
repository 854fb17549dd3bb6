"""The reward history of a DNO run drawn as an RGB image (what ComfyUI's LossGraphNode does for a
training loss), with PIL only.

The geometry is a contract, so a plot can be read back: inside the black frame, ``INSET`` pixels
in from its edges (so no curve hides the frame), x runs linearly from step 0 (left) to the last
recorded step (right) and y from the lowest plotted reward (bottom) to the highest (top),
per-image rewards included; the labels beside the frame give those numbers. The mean reward of
each step is a line with a dot per step in ``REWARD_COLOR``, the best-so-far (mean over the batch
of each image's best) a thinner line in ``BEST_COLOR``, the noise probability (when a regulariser
ran) a line in ``PROBABILITY_COLOR`` on its own 0..1 scale, and with a batch of several images
each image's reward a faint line.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

BACKGROUND = (255, 255, 255)
FRAME_COLOR = (0, 0, 0)
GRID_COLOR = (225, 225, 225)
TEXT_COLOR = (40, 40, 40)
REWARD_COLOR = (31, 119, 180)
IMAGE_COLOR = (174, 199, 232)
BEST_COLOR = (255, 127, 14)
PROBABILITY_COLOR = (148, 103, 189)
DOT_RADIUS = 3
INSET = 8

Color = Tuple[int, int, int]


@dataclass(frozen=True)
class Series:
    """What the plot shows, read from a reward history (see ``series_from_history``)."""
    steps: List[int]
    reward: List[Optional[float]]             # mean over the batch; None where not finite
    best: List[Optional[float]]               # mean of each image's best so far
    per_image: List[List[Optional[float]]]    # [image][step], only for a batch of several
    probability: List[Optional[float]]        # mean noise probability, None without a regulariser
    stop_reason: str = ""


def _finite(x) -> Optional[float]:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _mean(values: Sequence) -> Optional[float]:
    finite = [v for v in (_finite(x) for x in values) if v is not None]
    return sum(finite) / len(finite) if finite and len(finite) == len(values) else None


def _as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def series_from_history(history: dict) -> Series:
    """The plotted series of a reward history as the DNO nodes write it (``{"steps": [{"step",
    "reward": [per image], "probability": [per image] or null}, ...], "stop_reason"}``)."""
    steps, rewards, probabilities = [], [], []
    for record in history.get("steps") or []:
        steps.append(int(record["step"]))
        rewards.append([_finite(r) for r in _as_list(record.get("reward"))])
        probability = record.get("probability")
        probabilities.append(None if probability is None else _mean(_as_list(probability)))
    batch = max((len(r) for r in rewards), default=0)
    best_per_image: List[Optional[float]] = [None] * batch
    best = []
    for row in rewards:
        for i, r in enumerate(row):
            if r is not None and (best_per_image[i] is None or r > best_per_image[i]):
                best_per_image[i] = r
        best.append(_mean(best_per_image) if None not in best_per_image else None)
    per_image = [[row[i] if i < len(row) else None for row in rewards] for i in range(batch)] if batch > 1 else []
    return Series(steps=steps, reward=[_mean(r) for r in rewards], best=best, per_image=per_image,
                  probability=probabilities, stop_reason=str(history.get("stop_reason") or ""))


@dataclass(frozen=True)
class PlotFrame:
    """The frame's edges, and where the data lands: steps ``0..last_step`` on the columns
    ``left + INSET .. right - INSET``, rewards ``low..high`` on the rows ``bottom - INSET .. top + INSET``."""
    left: int
    top: int
    right: int
    bottom: int
    last_step: int
    low: float
    high: float

    def x(self, step: float) -> float:
        return self.left + INSET + (self.right - self.left - 2 * INSET) * step / self.last_step

    def _row(self, fraction: float) -> float:
        return self.bottom - INSET - (self.bottom - self.top - 2 * INSET) * fraction

    def y(self, reward: float) -> float:
        return self._row((reward - self.low) / (self.high - self.low))

    def y_probability(self, p: float) -> float:
        return self._row(min(max(p, 0.0), 1.0))


def value_range(series: Series) -> Tuple[float, float]:
    """Lowest and highest plotted reward; a flat (or empty) series gets a small span around it."""
    values = [v for v in (*series.reward, *series.best, *(v for row in series.per_image for v in row))
              if v is not None]
    if not values:
        return 0.0, 1.0
    low, high = min(values), max(values)
    if high > low:
        return low, high
    pad = max(abs(high) * 0.05, 1e-3)
    return low - pad, high + pad


def plot_frame(series: Series, width: int, height: int) -> PlotFrame:
    low, high = value_range(series)
    last = max(series.steps, default=0)
    return PlotFrame(left=72, top=44, right=width - 48, bottom=height - 36, last_step=max(last, 1),
                     low=low, high=high)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:   # Pillow < 10.1: one bitmap size
        return ImageFont.load_default()


def _label(value: float) -> str:
    return f"{value:.4g}"


def _polyline(draw, points: Sequence[Tuple[float, Optional[float]]], color: Color, width: int) -> None:
    """Segments between consecutive defined points (an undefined value breaks the line)."""
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if y0 is not None and y1 is not None:
            draw.line([(x0, y0), (x1, y1)], fill=color, width=width)


def plot_reward_history(history: dict, width: int = 768, height: int = 432) -> np.ndarray:
    """The reward history as an RGB image, ``(height, width, 3)`` uint8."""
    if width < 200 or height < 150:
        raise ValueError(f"the plot needs at least 200 x 150 pixels, got {width} x {height}")
    series = series_from_history(history)
    frame = plot_frame(series, width, height)
    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    font, small = _font(13), _font(11)

    for i in range(5):
        gy = frame._row(i / 4)
        draw.line([(frame.left, gy), (frame.right, gy)], fill=GRID_COLOR, width=1)
    draw.rectangle([frame.left, frame.top, frame.right, frame.bottom], outline=FRAME_COLOR, width=1)

    has_probability = any(p is not None for p in series.probability)
    draw.text((frame.left - 4, frame.y(frame.high)), _label(frame.high), fill=TEXT_COLOR, font=small, anchor="rm")
    draw.text((frame.left - 4, frame.y(frame.low)), _label(frame.low), fill=TEXT_COLOR, font=small, anchor="rm")
    draw.text((frame.x(0), frame.bottom + 4), "0", fill=TEXT_COLOR, font=small, anchor="mt")
    draw.text((frame.x(frame.last_step), frame.bottom + 4), str(frame.last_step), fill=TEXT_COLOR, font=small,
              anchor="mt")
    draw.text(((frame.left + frame.right) / 2, frame.bottom + 6), "optimisation step", fill=TEXT_COLOR,
              font=small, anchor="mt")
    if has_probability:
        draw.text((frame.right + 4, frame.y_probability(1)), "p 1", fill=PROBABILITY_COLOR, font=small, anchor="lm")
        draw.text((frame.right + 4, frame.y_probability(0)), "p 0", fill=PROBABILITY_COLOR, font=small, anchor="lm")

    title = "DNO reward per step"
    if series.reward and series.reward[0] is not None and series.best and series.best[-1] is not None:
        title += f": start {_label(series.reward[0])}, best {_label(series.best[-1])}"
    if series.stop_reason:
        title += f" ({series.stop_reason})"
    while len(title) > 8 and draw.textlength(title, font=font) > width - 16:
        title = title[:-2].rstrip() + "…"
    draw.text((8, 6), title, fill=TEXT_COLOR, font=font)
    legend = [("reward (mean)", REWARD_COLOR), ("best so far", BEST_COLOR)]
    if has_probability:
        legend.append(("noise probability", PROBABILITY_COLOR))
    lx = frame.left
    for text, color in legend:
        draw.rectangle([lx, 28, lx + 9, 37], fill=color)
        draw.text((lx + 13, 26), text, fill=TEXT_COLOR, font=small)
        lx += 13 + int(draw.textlength(text, font=small)) + 18

    xs = [frame.x(s) for s in series.steps]

    def scaled(values, scale):
        return [(x, None if v is None else scale(v)) for x, v in zip(xs, values)]

    for row in series.per_image:
        _polyline(draw, scaled(row, frame.y), IMAGE_COLOR, 1)
    if has_probability:
        _polyline(draw, scaled(series.probability, frame.y_probability), PROBABILITY_COLOR, 1)
    _polyline(draw, scaled(series.best, frame.y), BEST_COLOR, 1)
    reward_points = scaled(series.reward, frame.y)
    _polyline(draw, reward_points, REWARD_COLOR, 2)
    for x, y in reward_points:
        if y is not None:
            draw.ellipse([x - DOT_RADIUS, y - DOT_RADIUS, x + DOT_RADIUS, y + DOT_RADIUS], fill=REWARD_COLOR)
    if not series.steps:
        draw.text(((frame.left + frame.right) / 2, (frame.top + frame.bottom) / 2), "no optimisation steps",
                  fill=TEXT_COLOR, font=font, anchor="mm")
    return np.asarray(image, dtype=np.uint8).copy()
