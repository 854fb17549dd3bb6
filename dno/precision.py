"""Mixed precision for the differentiable sampler.

The noise and the optimiser state stay in fp32; the denoiser, decoder and
reward run under autocast. fp16 needs a gradient scaler (its range is too
small for the tiny gradients of long sampling chains); bf16 does not.
"""
from __future__ import annotations

import contextlib

import torch

from .errors import DNOError

PRECISIONS = ("fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise DNOError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return precision


def autocast(precision: str, device: torch.device):
    """Autocast context for ``precision`` on ``device`` (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=_DTYPES[precision])


def grad_scaler(precision: str, device: torch.device):
    """A GradScaler for fp16, ``None`` otherwise."""
    if precision != "fp16":
        return None
    return torch.amp.GradScaler(torch.device(device).type, init_scale=2.0 ** 13)
