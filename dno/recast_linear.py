"""Linear layers whose weight is cast for each call: the backward casts it again.

A host that stores weights in fp8 (ComfyUI's ``weight_dtype`` fp8_e4m3fn) or keeps part of a
model on the CPU (its low-VRAM partial load) makes each layer's weight for the call: a copy in
the compute dtype, on the GPU. Autograd's linear keeps that copy for the input gradient, so a
recomputed sampling step holds a compute-dtype copy of every weight it used until its backward
pass: for Flux.1 in fp8 (12 GB), another 24 GB. :class:`RecastLinear` keeps the recipe instead
and casts again in the backward pass (one more cast per layer, no matmul): the gradient is the
same, the copies live one layer at a time.

The host adapter supplies ``cast() -> (weight, bias, release)``: the weight and bias for this
call, and what to call when they are no longer needed (a host may stream them on another CUDA
stream and must know when it may reuse the memory).
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F

Cast = Callable[[], Tuple[torch.Tensor, Optional[torch.Tensor], Callable[[], None]]]


class RecastLinear(torch.autograd.Function):
    """``F.linear(input, *cast())`` for a frozen weight: only the input gradient, from a fresh cast."""

    @staticmethod
    def forward(ctx, input: torch.Tensor, cast: Cast):
        weight, bias, release = cast()
        out = F.linear(input, weight, bias)
        release()
        ctx.cast = cast
        ctx.input_dtype = input.dtype
        ctx.compute_dtype = out.dtype     # autocast may have run the matmul in another dtype
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None
        weight, _, release = ctx.cast()
        grad_input = torch.matmul(grad_out.to(ctx.compute_dtype), weight.to(ctx.compute_dtype))
        release()
        return grad_input.to(ctx.input_dtype), None
