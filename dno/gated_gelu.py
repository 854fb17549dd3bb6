"""GEGLU feed-forwards that keep a third less for the backward pass.

A GEGLU (the feed-forward of SD1.x/SDXL transformer blocks) computes
``a * gelu(gate)`` from one projection split in two. For its backward,
autograd keeps the projection (``a`` for the product, ``gate`` for the GELU)
and also ``gelu(gate)``, as large as ``a``. That last one is a pointwise
function of the kept ``gate``, so recomputing it in the backward costs one
GELU and frees it: 1.56 of the 9.5 GiB an SDXL sampling step keeps at 1024²
in bf16 (``bench/live_bytes.py``), which decides how many steps fit. The
backward runs the same ops on the same values as autograd's, so the gradients
are identical.

``lean_gated_gelus(modules)`` switches modules that follow the GEGLU contract
(``a, gate = module.proj(x).chunk(2, dim=-1)``, output ``a * gelu(gate)``) for
the duration; the host adapter knows which modules those are. Code that
torch.compile traces keeps the stock path (AOTAutograd plans its own saves).
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch
import torch.nn.functional as F


class GatedGELU(torch.autograd.Function):
    """``a * gelu(gate)`` that saves ``a`` and ``gate`` only and recomputes ``gelu(gate)``."""

    @staticmethod
    def forward(ctx, a, gate, approximate):
        ctx.save_for_backward(a, gate)
        ctx.approximate = approximate
        return a * F.gelu(gate, approximate=approximate)

    @staticmethod
    def backward(ctx, grad):
        a, gate = ctx.saved_tensors
        grad_a = grad_gate = None
        if ctx.needs_input_grad[0]:
            grad_a = grad * F.gelu(gate, approximate=ctx.approximate)
        if ctx.needs_input_grad[1]:
            grad_gate = torch.ops.aten.gelu_backward(grad * a, gate, approximate=ctx.approximate)
        return grad_a, grad_gate, None


def gated_gelu(a: torch.Tensor, gate: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """``a * gelu(gate)``; through :class:`GatedGELU` when autograd records it."""
    records = torch.is_grad_enabled() and (a.requires_grad or gate.requires_grad)
    if torch.compiler.is_compiling() or not records:
        return a * F.gelu(gate, approximate=approximate)
    return GatedGELU.apply(a, gate, approximate)


def _lean_forward(module: torch.nn.Module):
    approximate = getattr(module, "approximate", "none")     # diffusers' GEGLU has one; ComfyUI's is exact

    def forward(x):
        a, gate = module.proj(x).chunk(2, dim=-1)
        return gated_gelu(a, gate, approximate)
    return forward


@contextlib.contextmanager
def lean_gated_gelus(modules: Iterable[torch.nn.Module]) -> Iterator[int]:
    """While active, the given GEGLU modules recompute ``gelu(gate)`` in the backward pass
    instead of keeping it; restored afterwards, also on errors. Yields how many were switched."""
    patched = []
    try:
        for module in modules:
            if "forward" in vars(module) or any(module is m for m in patched):
                continue       # already patched by someone else, or listed twice: leave it
            module.forward = _lean_forward(module)
            patched.append(module)
        yield len(patched)
    finally:
        for module in patched:
            del module.forward
