"""Keep autograd off the model weights while DNO differentiates with respect to the noise.

DNO needs gradients for the noise only. A weight that requires grad makes
every backward pass also compute its gradient (as many FLOPs again as the
input gradients), store every layer input for it, and accumulate a ``.grad``
as large as the weights that outlives the run. Weights loaded the usual way
in ComfyUI are inference tensors that the host adapter replaces by
non-grad clones, but a model built or loaded outside inference mode keeps
``requires_grad=True``; so the flags are switched off for the run and
restored afterwards. ``noise_only_backward`` is what a run enters: the freezing
together with the input-gradient convolutions that frozen weights allow.
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch

from .input_grad_conv import input_grad_convolutions


@contextlib.contextmanager
def frozen_parameters(modules: Iterable) -> Iterator[int]:
    """Set ``requires_grad=False`` on every parameter of the given modules (non-modules are
    skipped) for the duration; restore the flags afterwards. Yields how many were frozen."""
    changed = []
    seen = set()
    try:
        for module in modules:
            if not isinstance(module, torch.nn.Module):
                continue
            for p in module.parameters():
                if id(p) in seen:
                    continue
                seen.add(id(p))
                if p.requires_grad:
                    p.requires_grad_(False)
                    changed.append(p)
        yield len(changed)
    finally:
        for p in changed:
            p.requires_grad_(True)


@contextlib.contextmanager
def noise_only_backward(modules: Iterable) -> Iterator[int]:
    """The backward pass DNO needs, for the gradient of the noise alone: the modules' weights
    frozen (above), and their frozen convolutions saving the weight rather than the input
    (``input_grad_conv.py``). Yields how many parameters were frozen."""
    modules = tuple(modules)
    with frozen_parameters(modules) as frozen, input_grad_convolutions(modules):
        yield frozen
