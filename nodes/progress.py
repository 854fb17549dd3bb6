"""Progress, previews, live chart messages and Cancel for a DNO run in ComfyUI."""
from __future__ import annotations

import bisect
import logging
import time
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image

import comfy.model_management
import comfy.utils
from comfy.cli_args import args

from ..dno import StepInfo, StopOptimization
from .host import HostDenoiser

log = logging.getLogger("DNO")

PROGRESS_EVENT = "dno.progress"
DONE_EVENT = "dno.done"


def _server():
    try:
        from server import PromptServer
        return PromptServer.instance
    except Exception:  # running without the web server (scripts, tests)
        return None


def send(event: str, data: dict) -> None:
    server = _server()
    if server is not None:
        server.send_sync(event, data, getattr(server, "client_id", None))


def preview_image(image: torch.Tensor) -> Image.Image:
    """First image of a (B, 3, H, W) batch in [0, 1] as PIL, for the preview channel."""
    array = (image[0].detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round()
    return Image.fromarray(array.astype(np.uint8))


class RunReporter:
    """The per-step callback: progress bar, previews, chart messages, Cancel.

    The decoded image of every step is already computed for the reward, so a
    preview costs a JPEG encode, not a VAE decode; ``preview_every`` (0 = off)
    limits how often it is sent.
    """

    # While one DNO step runs longer than this (a large model on a CPU), the log gets a line
    # this often saying which sampling step the model is at, so a console shows progress.
    heartbeat_every = 15.0

    def __init__(self, node_id: Optional[str], total_steps: int, preview_every: int = 1):
        self.node_id = None if node_id is None else str(node_id)
        self.total = int(total_steps) + 1
        self.preview_every = int(preview_every)
        self.pbar = comfy.utils.ProgressBar(self.total)
        self.last: Optional[StepInfo] = None
        self.step_started = time.monotonic()
        self.heartbeat_due = self.step_started + self.heartbeat_every
        send(PROGRESS_EVENT, {"node": self.node_id, "step": -1, "steps": int(total_steps), "reset": True})

    def model_call(self, sigma, sigmas: Sequence[float]) -> None:
        """Called before every model call of the render; logs the heartbeat when it is due."""
        now = time.monotonic()
        if now < self.heartbeat_due:
            return
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            return  # no host reads while a CUDA graph is captured
        self.heartbeat_due = now + self.heartbeat_every
        value = float(sigma.flatten()[0]) if isinstance(sigma, torch.Tensor) else float(sigma)
        # sigmas fall from sigmas[0] to sigmas[-1]; the call at sigmas[i] runs sampling step i + 1
        descending = [-s for s in sigmas[:-1]]
        index = min(max(bisect.bisect_left(descending, -value - 1e-6), 0), len(descending) - 1)
        step = 0 if self.last is None else self.last.step + 1
        log.info("DNO: step %d/%d in progress, model call at sampling step %d/%d, %.0f s into this step",
                 step, self.total - 1, index + 1, len(descending), now - self.step_started)

    def __call__(self, info: StepInfo) -> None:
        self.last = info
        self.step_started = time.monotonic()
        self.heartbeat_due = self.step_started + self.heartbeat_every
        reward = info.reward.float().mean().item()
        best = info.best_reward.float().mean().item()
        probability = None if info.regularizer is None else info.regularizer.probability.float().mean().item()
        log.info("DNO step %d/%d  reward %.4f  best %.4f%s", info.step, info.total_steps, reward, best,
                 "" if probability is None else f"  noise probability {probability:.3g}")
        send(PROGRESS_EVENT, {"node": self.node_id, "step": info.step, "steps": info.total_steps,
                              "reward": reward, "best": best, "probability": probability,
                              "rewards": info.reward.float().tolist(), "elapsed": info.elapsed})
        preview = None
        due = self.preview_every > 0 and (info.step % self.preview_every == 0 or info.step == info.total_steps)
        if due:
            image = preview_image(info.image)
            # ComfyUI scales a preview *up* to the size given; never ask for more than we have.
            preview = ("JPEG", image, min(args.preview_size, max(image.size)))
        try:
            self.pbar.update_absolute(info.step + 1, self.total, preview)
            comfy.model_management.throw_exception_if_processing_interrupted()
        except comfy.model_management.InterruptProcessingException:
            # Cancel ends the optimisation, not the graph: the node returns the
            # best latent found so far and downstream nodes (decode, save) run.
            raise StopOptimization("cancelled by the user")

    def finish(self, result) -> None:
        if result is None:
            return
        send(DONE_EVENT, {"node": self.node_id, "best": result.best_reward.float().mean().item(),
                          "initial": result.initial_reward.float().mean().item(),
                          "stop_reason": result.stop_reason,
                          "probability": None if not result.history or result.history[-1].probability is None
                          else float(np.mean(result.history[-1].probability))})


class WatchedDenoiser(HostDenoiser):
    """The host denoiser, telling the reporter about each model call (the in-step heartbeat)."""

    def __init__(self, reporter: RunReporter, model_wrap, sigmas, *args):
        super().__init__(model_wrap, sigmas, *args)
        self.reporter = reporter
        self.sigma_list = [float(s) for s in sigmas]

    def __call__(self, x, sigma):
        self.reporter.model_call(sigma, self.sigma_list)
        return super().__call__(x, sigma)
