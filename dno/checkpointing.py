"""Block-level activation checkpointing inside a model, for the lowest-memory mode.

Per-step checkpointing recomputes one whole sampling step in the backward
pass, so the peak holds one step's activations. For large models at high
resolution that alone can exceed a small card. Checkpointing the model's
blocks (chosen by the host adapter, which knows the architecture) inside the
recomputed step keeps only the block inputs, at the price of one more
forward. Gradients are unchanged.

The adapter exposes the blocks as ``checkpoint_segments`` (a sequence of
``torch.nn.Module``) on its denoiser or decode callable.
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator, List

import torch
from torch.utils.checkpoint import checkpoint as _checkpoint

from .graphed import capturing


def segments_of(fn) -> List[torch.nn.Module]:
    """The modules ``fn`` offers for block checkpointing (none if it offers none)."""
    segments = getattr(fn, "checkpoint_segments", None)
    if callable(segments):
        segments = segments()
    return [m for m in (segments or ()) if isinstance(m, torch.nn.Module)]


def _snapshot(value):
    # A host passes option dicts by reference and updates them as the model runs (ComfyUI's
    # transformer_options names the current block); the recompute in the backward pass must see
    # them as this call did, not as the last block left them.
    return dict(value) if type(value) is dict else value


def checkpoint(fn, *args, **kwargs):
    """``torch.utils.checkpoint`` as DNO uses it: non-reentrant, and with no RNG state to restore
    while a CUDA graph is captured (graphed.py): the graph's RNG is the capture's own, and DNO's
    denoisers and decoders draw no random numbers."""
    return _checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=not capturing(), **kwargs)


def _checkpointed(forward):
    def run(*args, **kwargs):
        if torch.is_grad_enabled():
            args = tuple(_snapshot(a) for a in args)
            kwargs = {k: _snapshot(v) for k, v in kwargs.items()}
            return checkpoint(forward, *args, **kwargs)
        return forward(*args, **kwargs)
    return run


@contextlib.contextmanager
def checkpointed_blocks(modules: Iterable[torch.nn.Module]) -> Iterator[int]:
    """While active, each module's forward runs under activation checkpointing when
    autograd records; restored afterwards, also on errors. Yields the count."""
    patched = []
    try:
        for module in modules:
            own = module.__dict__.get("forward")
            module.forward = _checkpointed(module.forward)
            patched.append((module, own))
        yield len(patched)
    finally:
        for module, own in reversed(patched):
            if own is None:
                del module.forward
            else:
                module.forward = own
