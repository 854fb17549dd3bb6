"""Memory-aware checkpointing: store as many sampling steps as a memory budget allows.

Exact gradients through S sampling steps need each step's activations in the
backward pass. Storing them all is fastest (forward + backward) but costs S
times one step's activations; recomputing them (per-step checkpointing) costs
one extra forward. ``checkpoint="auto"`` measures one step's activations and
one decode's on the device, then stores as many steps as fit into the budget
and recomputes the rest. When not even full recomputation fits, the model's
blocks are checkpointed inside each recomputed step as well (see
``checkpointing.py``): slowest, smallest.

The budget is a cap on the memory the framework allocates on the device (what
``torch.cuda.max_memory_allocated`` reports), in bytes here and in GiB in
:class:`dno.optimize.DNOConfig`.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Tuple

import torch

GIB = 1024 ** 3
# Left free of the device's memory when the user sets no budget: the host's
# own bookkeeping (ComfyUI splits the CFG batch when little memory is free)
# and the allocator's fragmentation need some room.
DEFAULT_RESERVE_FRACTION = 0.1
MIN_RESERVE_BYTES = 2 * GIB
# Stored activations "auto" keeps when the user sets no budget. With the render replayed as CUDA
# graphs (graphed.py) a stored step saves one forward and nothing else: on the H200, storing all
# 50 SD1.5 steps (65 GiB) took an update from 2.01 to 1.39 s, about 12 ms per 1.2 GiB step,
# while SDXL's 9.4 GiB steps would each cost a 24 GB card its room. Past this the memory buys
# too little time to be taken by default; an explicit memory_budget_gb lifts it.
DEFAULT_STORED_BYTES = 8 * GIB


@dataclass
class MemoryPlan:
    stored_steps: int          # window steps that keep their activations
    block_checkpointing: bool  # also checkpoint the model's blocks inside recomputed steps
    step_bytes: int            # activations of one stored sampling step
    decode_bytes: int          # activations of one decode
    in_use_bytes: int          # allocated when the plan was made (weights, noise, ...)
    budget_bytes: int
    # held back for the backward of one recomputed step or decode (its activations, their
    # gradients and temporaries) and for what the optimisation allocates later (noise gradients,
    # optimiser moments)
    reserve_bytes: int = 0
    # why the plan is what it is, when the measurement itself decided it (see measure_within)
    note: str = ""

    def describe(self) -> str:
        if self.note:
            return (f"{self.note}; {self.in_use_bytes / GIB:.2f} GiB in use, budget "
                    f"{self.budget_bytes / GIB:.2f} GiB")
        return (f"store {self.stored_steps} steps of {self.step_bytes / GIB:.2f} GiB, "
                f"{'block' if self.block_checkpointing else 'step'} checkpointing for the rest; "
                f"{self.in_use_bytes / GIB:.2f} GiB in use, {self.reserve_bytes / GIB:.2f} GiB held back for "
                f"the backward pass, budget {self.budget_bytes / GIB:.2f} GiB")


def plan_stored_steps(budget_bytes: int, in_use_bytes: int, step_bytes: int, decode_bytes: int,
                      window: int, can_checkpoint_blocks: bool = False, working_bytes: Optional[int] = None,
                      state_bytes: int = 0, max_stored_bytes: Optional[int] = None) -> MemoryPlan:
    """How many of ``window`` steps keep activations within ``budget_bytes``.

    Recomputing one step (or the decode) during the backward pass needs its
    activations, their gradients and the temporaries of both: ``working_bytes``
    as measured (see :func:`activation_cost`), else about twice the stored
    activations. That, and ``state_bytes`` the run allocates after planning
    (noise gradients, optimiser moments), is held back before stored steps
    are counted; ``max_stored_bytes`` caps what the stored steps may take.
    """
    window = max(0, int(window))
    working = 2 * max(int(step_bytes), int(decode_bytes)) if working_bytes is None else int(working_bytes)
    # and an eighth of it for what one measured call does not show: the allocator's rounding and
    # the temporaries of the render's two-part backward (measured 1.5 % of a 330 MB peak, H200)
    reserve = working + working // 8 + int(state_bytes)
    room = int(budget_bytes) - int(in_use_bytes) - reserve
    if step_bytes <= 0:
        stored = window
    else:
        fits = room if max_stored_bytes is None else min(room, int(max_stored_bytes))
        stored = max(0, min(window, fits // int(step_bytes)))
    blocks = bool(can_checkpoint_blocks) and room < 0
    return MemoryPlan(stored, blocks, int(step_bytes), int(decode_bytes), int(in_use_bytes),
                      int(budget_bytes), reserve)


def budget_from_free(allocated_bytes: int, free_bytes: int, total_bytes: int, host_reserve_bytes: int = 0) -> int:
    """The budget "auto" plans in when the user sets none: what is allocated now plus what is
    still free (the driver's free memory and the allocator's cached, unused blocks), less a
    reserve: the larger of ours (a tenth of the device, at least 2 GiB) and what the host keeps
    back for other programs (ComfyUI's ``--reserve-vram``)."""
    reserve = max(MIN_RESERVE_BYTES, int(DEFAULT_RESERVE_FRACTION * total_bytes), int(host_reserve_bytes))
    return max(0, int(allocated_bytes) + int(free_bytes) - reserve)


def default_budget_bytes(device: torch.device) -> Optional[int]:
    """What the framework can still allocate on ``device``, less a reserve; None off CUDA.

    A host that keeps its own account of free memory (ComfyUI) passes its number instead
    (``DNOConfig.auto_budget_bytes``, from :func:`budget_from_free`).
    """
    device = torch.device(device)
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    allocated = torch.cuda.memory_allocated(device)
    cached_unused = torch.cuda.memory_reserved(device) - allocated
    return budget_from_free(allocated, cached_unused + free, total)


def planned_working_set(checkpoint, window: int, step_bytes: int, decode_bytes: int,
                        budget_bytes: Optional[int] = None, weights_bytes: int = 0,
                        max_stored_bytes: int = DEFAULT_STORED_BYTES) -> int:
    """What a run is expected to allocate beyond the weights, in bytes, before anything is measured.

    For a host that makes room ahead of the run (ComfyUI unloads other models until this much is
    free): ``step_bytes`` and ``decode_bytes`` are estimates of one stored step's and one
    decode's activations. The run's own plan (:func:`plan_stored_steps`) measures them later and
    stays within the memory it then finds, so an estimate that is off costs time (fewer stored
    steps, or other models unloaded needlessly), not an out-of-memory error.

    ``checkpoint`` as in ``DNOConfig``: True / "blocks" store nothing (one step or the decode is
    recomputed at a time: about twice its activations, as :func:`plan_stored_steps` assumes
    unmeasured), False stores the whole ``window``, n stores n steps, "auto" what
    ``budget_bytes`` allows (the user's budget covers the ``weights_bytes`` already in it) or,
    without one, up to ``max_stored_bytes``.
    """
    step, decode = max(0, int(step_bytes)), max(0, int(decode_bytes))
    working = 2 * max(step, decode)
    reserve = working + working // 8
    window = max(0, int(window))
    if checkpoint is True or checkpoint == "blocks":
        stored = 0
    elif checkpoint is False:
        stored = window * step
    elif checkpoint == "auto":
        if budget_bytes is not None:
            return max(reserve, int(budget_bytes) - int(weights_bytes))
        stored = min(window * step, int(max_stored_bytes))
    else:
        stored = min(window, int(checkpoint)) * step
    return reserve + stored


def activation_cost(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> Tuple[int, int]:
    """``(kept, working)`` bytes of ``fn(x)`` on CUDA (0, 0 elsewhere): what the call keeps alive
    for its backward pass, and the most it allocates at once over the call and that backward.

    Runs ``fn`` once with autograd on and ``x`` as a leaf, reads the allocator's
    counter with the output still alive, backpropagates a gradient of ones, and
    frees everything. Resets the device's peak-memory counter.
    """
    if x.device.type != "cuda":
        return 0, 0
    leaf = x.detach().requires_grad_(True)
    torch.cuda.synchronize(x.device)
    torch.cuda.reset_peak_memory_stats(x.device)
    before = torch.cuda.memory_allocated(x.device)
    with torch.enable_grad():
        out = fn(leaf)
        kept = torch.cuda.memory_allocated(x.device) - before
        if out.requires_grad:
            torch.autograd.grad(out, leaf, torch.ones_like(out))
    working = torch.cuda.max_memory_allocated(x.device) - before
    del out, leaf
    return max(0, int(kept)), max(0, int(working))


@contextlib.contextmanager
def allocation_cap(device: torch.device, cap_bytes: Optional[int]) -> Iterator[None]:
    """While active, the caching allocator reserves at most ``cap_bytes`` on ``device``: past it an
    allocation raises ``torch.cuda.OutOfMemoryError`` (after the allocator has freed its cache), as
    on a card of that size. A no-op off CUDA, without a cap, or where torch cannot read the
    process's memory fraction back to restore it."""
    device = torch.device(device)
    if (cap_bytes is None or device.type != "cuda"
            or not hasattr(torch.cuda, "get_per_process_memory_fraction")):
        yield
        return
    if device.index is None:        # the fraction calls want an index
        device = torch.device("cuda", torch.cuda.current_device())
    total = torch.cuda.get_device_properties(device).total_memory
    previous = torch.cuda.get_per_process_memory_fraction(device)
    torch.cuda.set_per_process_memory_fraction(max(0.0, min(previous, int(cap_bytes) / total)), device)
    try:
        yield
    finally:
        torch.cuda.set_per_process_memory_fraction(previous, device)


def measure_within(budget_bytes: Optional[int], device: torch.device,
                   measure: Callable[[], Tuple[int, ...]]) -> Optional[Tuple[int, ...]]:
    """``measure()`` with the device capped at ``budget_bytes``; None if it did not fit.

    Measuring a stored step means running one with all its activations, which on a small card
    (or under a user's budget) is itself what does not fit: measured under the cap, a step that
    cannot be stored runs out of memory here, cleanly, instead of overshooting the budget or
    failing the run.
    """
    device = torch.device(device)
    failed = False
    try:
        with allocation_cap(device, budget_bytes):
            return tuple(measure())
    except torch.cuda.OutOfMemoryError:
        failed = True       # leave the except block first: its traceback holds the step's tensors
    if failed and device.type == "cuda":
        torch.cuda.empty_cache()
    return None
