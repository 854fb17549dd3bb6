"""Convolutions that keep only what the input gradient needs.

Autograd's convolution saves its input for the backward pass whatever needs
a gradient: one formula computes the input, weight and bias gradients
together, so the input is kept even when the weights are frozen. DNO only
ever needs the input gradient (the noise's), and that needs the weight
alone. In a VAE decoder at 1024² the saved convolution inputs are about 40 %
of everything the decode keeps for backward (5 of 13 GiB), and a good part
of a UNet step's; the values are the same, only the memory differs.

``input_grad_convolutions(modules)`` makes every ``Conv2d`` in the modules
whose weight and bias do not require grad use :class:`InputGradConv2d` for
the duration (a module with a trainable weight keeps the stock path), and
restores them afterwards. Code that torch.compile traces keeps the stock path.
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch
import torch.nn.functional as F


def _autocast_dtype(tensor: torch.Tensor):
    """The dtype autocast runs a convolution in on this tensor's device, or None."""
    kind = tensor.device.type
    if not torch.amp.is_autocast_available(kind):     # e.g. meta tensors
        return None
    if tensor.is_floating_point() and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return None


class InputGradConv2d(torch.autograd.Function):
    """``F.conv2d`` whose backward returns the input gradient only, from the saved weight."""

    @staticmethod
    def forward(ctx, input, weight, bias, stride, padding, dilation, groups):
        out = F.conv2d(input, weight, bias, stride, padding, dilation, groups)
        ctx.save_for_backward(weight)
        # the dtype the convolution really ran in (autocast casts inside F.conv2d)
        ctx.compute_dtype = _autocast_dtype(input) or out.dtype
        ctx.input_shape, ctx.input_dtype = input.shape, input.dtype
        ctx.conv_args = (stride, padding, dilation, groups)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        if not ctx.needs_input_grad[0]:
            return (None,) * 7
        (weight,) = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv_args
        grad_out = grad_out.to(ctx.compute_dtype)
        # the input only gives the gradient its shape: an expanded one-element tensor, no memory
        shape_only = grad_out.new_empty(1).expand(ctx.input_shape)
        grad_input = torch.ops.aten.convolution_backward(
            grad_out, shape_only, weight.to(ctx.compute_dtype), None, stride, padding, dilation,
            False, [0, 0], groups, (True, False, False))[0]
        return (grad_input.to(ctx.input_dtype),) + (None,) * 6


def _input_grad_conv_forward(module: torch.nn.Conv2d):
    stock = module._conv_forward

    def conv_forward(input, weight, bias):
        frozen = not (weight.requires_grad or (bias is not None and bias.requires_grad))
        # Under torch.compile (ComfyUI's TorchCompileModel) the stock path: AOTAutograd plans
        # what the compiled backward saves itself, and a custom Function there broke the graph
        # at every convolution (dynamo then recompiled per weight shape and fell back to eager).
        if torch.compiler.is_compiling() or not (torch.is_grad_enabled() and input.requires_grad and frozen):
            return stock(input, weight, bias)
        return InputGradConv2d.apply(input, weight, bias, module.stride, module.padding, module.dilation,
                                     module.groups)
    return conv_forward


def _supported(module: torch.nn.Module) -> bool:
    # padding modes other than zeros pad in _conv_forward itself, and "same"/"valid" are strings
    return (isinstance(module, torch.nn.Conv2d) and module.padding_mode == "zeros"
            and not isinstance(module.padding, str))


@contextlib.contextmanager
def input_grad_convolutions(modules: Iterable) -> Iterator[int]:
    """While active, the frozen ``Conv2d`` layers of ``modules`` (non-modules are skipped) save
    their weight, not their input, for backward. Yields how many layers were switched."""
    patched = []
    seen = set()
    try:
        for root in modules:
            if not isinstance(root, torch.nn.Module):
                continue
            for module in root.modules():
                if id(module) in seen or not _supported(module) or "_conv_forward" in vars(module):
                    continue
                seen.add(id(module))
                module._conv_forward = _input_grad_conv_forward(module)
                patched.append(module)
        yield len(patched)
    finally:
        for module in patched:
            del module._conv_forward
