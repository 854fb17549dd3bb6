"""The reward history of a DNO run as ComfyUI values: JSON text, a handle, a plot.

The DNO KSampler returns the history itself. The DNO Sampler is only a SAMPLER: it runs later,
inside SamplerCustomAdvanced, so it outputs a ``DNO_HISTORY`` handle that its runs write into.
**DNO Reward History** takes that handle *and* the LATENT that SamplerCustomAdvanced returned:
the LATENT input makes ComfyUI run it after the sampling, and picks the run that made that latent
(one DNO Sampler may feed several SamplerCustomAdvanced nodes).
"""
from __future__ import annotations

import json
import threading
from collections import deque
from typing import Deque, Tuple

import torch

from ..dno import DNOError
from ..dno.plot import plot_reward_history


def history_record(result) -> dict:
    """What a DNO run did, as plain JSON values: per step the reward, regulariser and noise
    probability of every image, and why the run stopped."""
    if result is None:
        return {}
    return {
        "stop_reason": result.stop_reason,
        "initial_reward": result.initial_reward.tolist(),
        "best_reward": result.best_reward.tolist(),
        "best_step": result.best_step.tolist(),
        "steps": [{"step": h.step, "reward": h.reward, "regularizer": h.regularizer,
                   "probability": h.probability, "elapsed": round(h.elapsed, 3)} for h in result.history],
    }


def history_json(result) -> str:
    return json.dumps(history_record(result))


class RunHistories:
    """The ``DNO_HISTORY`` handle of one DNO Sampler node: the latest runs' histories, each with
    the latent that run handed back to SamplerCustomAdvanced (as that node outputs it)."""

    keep = 16

    def __init__(self):
        self._runs: Deque[Tuple[torch.Tensor, str]] = deque(maxlen=self.keep)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._runs)

    def record(self, samples: torch.Tensor, text: str) -> None:
        with self._lock:
            self._runs.append((samples.detach().to("cpu", torch.float32).clone(), text))

    def lookup(self, samples: torch.Tensor) -> str:
        """The history of the run whose output latent ``samples`` is (the latest such run)."""
        samples = samples.detach().to("cpu", torch.float32)
        with self._lock:
            runs = list(self._runs)
        if not runs:
            raise DNOError("DNO Reward History: its DNO Sampler has not sampled anything yet. Connect that DNO "
                           "Sampler's sampler output to a SamplerCustomAdvanced, and that node's output latent "
                           "to this node's latent input")
        for recorded, text in reversed(runs):
            if recorded.shape == samples.shape and torch.allclose(recorded, samples, rtol=1e-4, atol=1e-5):
                return text
        raise DNOError("DNO Reward History: the latent is not one that its DNO Sampler produced. Connect the "
                       "output (or denoised_output) of the SamplerCustomAdvanced that samples with this DNO "
                       "Sampler straight to the latent input, not a latent changed by another node")


def parse_history(text: str) -> dict:
    """A reward history from its JSON text, or a DNOError naming the input and the fix."""
    try:
        history = json.loads(text)
    except (TypeError, ValueError) as error:
        raise DNOError(f"reward_history is not the JSON a DNO node writes ({error}): connect the reward_history "
                       "output of a DNO KSampler or of DNO Reward History") from None
    if not isinstance(history, dict) or not isinstance(history.get("steps", []), list):
        raise DNOError("reward_history is not the JSON a DNO node writes (no list of steps): connect the "
                       "reward_history output of a DNO KSampler or of DNO Reward History")
    return history


class DNORewardHistory:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "history": ("DNO_HISTORY", {"tooltip": "The history output of the DNO Sampler that sampled the latent."}),
            "latent": ("LATENT", {"tooltip": "The output (or denoised_output) of the SamplerCustomAdvanced that "
                                             "sampled with that DNO Sampler. It makes this node run after the "
                                             "sampling and picks that run's history."}),
        }}

    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("reward_history",)
    OUTPUT_TOOLTIPS = ("JSON: reward, regulariser and noise probability per optimisation step, and why the "
                       "run stopped (as the DNO KSampler's reward_history).",)
    FUNCTION = "read"
    CATEGORY = "DNO"
    DESCRIPTION = ("The reward history of a DNO Sampler run inside SamplerCustomAdvanced, as the DNO KSampler "
                   "returns it. Connect the DNO Sampler's history and the latent SamplerCustomAdvanced returned.")

    def read(self, history, latent):
        if not isinstance(history, RunHistories):
            raise DNOError("DNO Reward History: connect the history output of a DNO Sampler to its history input")
        return (history.lookup(latent["samples"]),)


class DNOPlotRewardHistory:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "reward_history": ("STRING", {"forceInput": True,
                                          "tooltip": "The reward_history of a DNO KSampler or of DNO Reward History."}),
            "width": ("INT", {"default": 768, "min": 200, "max": 4096, "step": 8,
                              "tooltip": "Width of the plot in pixels."}),
            "height": ("INT", {"default": 432, "min": 150, "max": 4096, "step": 8,
                               "tooltip": "Height of the plot in pixels."}),
        }}

    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("plot",)
    OUTPUT_TOOLTIPS = ("The plot as an IMAGE, to save or preview: mean reward per step (dots), best so far, "
                       "noise probability (0..1, right scale) when a regulariser ran.",)
    FUNCTION = "plot"
    OUTPUT_NODE = True
    CATEGORY = "DNO"
    DESCRIPTION = ("Plots a DNO reward history (reward per optimisation step, best so far, noise probability) "
                   "as an image, shown on the node and returned as an IMAGE.")

    def plot(self, reward_history, width, height):
        pixels = plot_reward_history(parse_history(reward_history), int(width), int(height))
        image = torch.from_numpy(pixels).float().div(255.0).unsqueeze(0)    # ComfyUI IMAGE: (B, H, W, C)
        # the plotted history goes with the preview, so API clients (/history) can read the numbers
        return {"ui": {**preview_ui(image), "dno_reward_history": [reward_history]}, "result": (image,)}


def preview_ui(image: torch.Tensor) -> dict:
    """The node's own preview, written to the temp folder as ComfyUI's PreviewImage does."""
    try:
        from nodes import PreviewImage     # ComfyUI's nodes.py (this pack is loaded as a package)
    except ImportError:                    # no ComfyUI (scripts): no preview
        return {}
    return PreviewImage().save_images(image, filename_prefix="DNO_reward_history")["ui"]


NODE_CLASS_MAPPINGS = {
    "DNORewardHistory": DNORewardHistory,
    "DNOPlotRewardHistory": DNOPlotRewardHistory,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "DNORewardHistory": "DNO Reward History",
    "DNOPlotRewardHistory": "DNO Plot Reward History",
}
