"""Mixed precision for the differentiable sampler.

The noise and the optimiser state stay in fp32; the denoiser, decoder and
reward run under autocast. fp16 needs a gradient scaler (its range is too
small for the tiny gradients of long sampling chains); bf16 does not.

``"auto"`` picks one of them for the device and the model (:func:`resolve_precision`):
fp32 on a CPU, the model's own compute dtype on a GPU.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

from .errors import DNOError

AUTO = "auto"
PRECISIONS = ("fp32", "bf16", "fp16")
CHOICES = (AUTO,) + PRECISIONS
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def check_precision(precision: str) -> str:
    if precision not in CHOICES:
        raise DNOError(f"precision must be one of {CHOICES}, got {precision!r}")
    return precision


def resolve_precision(precision: str, device, model_dtype: Optional[torch.dtype] = None) -> str:
    """The concrete precision (fp32 | bf16 | fp16) that ``precision`` means on ``device``.

    An explicit choice is kept. ``"auto"`` is fp32 on a CPU: CPU autocast to bf16/fp16 runs
    the model far slower than fp32 (about 30x on the demo's 2-core machine). On a GPU it is
    the precision the model computes in (``model_dtype``: its weights' dtype, or the dtype a
    host casts them to), so DNO's pass runs as the model's plain sampling does; a model in
    fp32, in another dtype (fp8 weights without a cast dtype, fp64) or of unknown dtype gets fp32.
    """
    check_precision(precision)
    if precision != AUTO:
        return precision
    if torch.device(device).type == "cpu":
        return "fp32"
    return _NAMES.get(model_dtype, "fp32")


def module_dtype(fn) -> Optional[torch.dtype]:
    """The dtype of the first floating-point parameter of ``fn`` if it is a module, else None."""
    if isinstance(fn, torch.nn.Module):
        for p in fn.parameters():
            if p.is_floating_point():
                return p.dtype
    return None


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
