"""Convolution weights in channels-last (NHWC) memory layout for a run.

cuDNN's fast convolution kernels on recent NVIDIA GPUs work on NHWC tensors;
given NCHW weights and activations it converts them around every call
(6.7 % of a DNO step's GPU time in the issue-12 profile). A convolution with
a channels-last weight produces a channels-last output, and the layout then
carries through the network. Values are the same in either layout; only the
kernels cuDNN picks differ, so results agree to rounding.

The weights belong to the host's model: ``channels_last_weights`` changes
their layout in place (the same Parameter objects, so the host's references
and weight backups stay valid) and restores the original strides afterwards,
also on errors.
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch


# Channels-last pays where convolutions carry the model: measured on the H200 (bf16, CUDA graphs,
# one process each), SD1.5's UNet (68 % of its weights in Conv2d) took DNO steps from 1.94 to
# 1.70 s, SDXL's (13 %: mostly transformer blocks) from 7.05 to 7.43 s.
CONV_SHARE_FOR_CHANNELS_LAST = 0.5


def conv_weight_share(module: torch.nn.Module) -> float:
    """The fraction of ``module``'s parameters that are ``Conv2d`` weights (0 for none)."""
    total = sum(p.numel() for p in module.parameters())
    conv = sum(m.weight.numel() for m in module.modules()
               if isinstance(m, torch.nn.Conv2d) and isinstance(m.weight, torch.Tensor))
    return conv / total if total else 0.0


@contextlib.contextmanager
def channels_last_weights(modules: Iterable, enabled: bool = True) -> Iterator[int]:
    """While active, the 4-D weights of the modules' ``Conv2d`` layers (non-modules are skipped)
    are channels-last. Yields how many were changed; restores the original strides."""
    changed = []
    seen = set()
    try:
        if enabled:
            for root in modules:
                if not isinstance(root, torch.nn.Module):
                    continue
                for module in root.modules():
                    weight = getattr(module, "weight", None)
                    if (not isinstance(module, torch.nn.Conv2d) or not isinstance(weight, torch.Tensor)
                            or weight.dim() != 4 or id(weight) in seen
                            or weight.is_contiguous(memory_format=torch.channels_last)):
                        continue
                    seen.add(id(weight))
                    # converted one weight at a time and back the same way: holding the originals
                    # would cost the convolutions' weights twice over for the whole run
                    changed.append((weight, weight.stride()))
                    weight.data = weight.data.contiguous(memory_format=torch.channels_last)
        yield len(changed)
    finally:
        for weight, stride in reversed(changed):
            restored = torch.empty_strided(weight.shape, stride, dtype=weight.dtype, device=weight.device)
            restored.copy_(weight.data)
            weight.data = restored
