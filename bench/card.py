"""An emulated smaller card on a big GPU: the allocator capped, and ComfyUI told the same.

``emulate_card(gib)`` must run before ``comfy.model_management`` is imported (it reads the card's
total memory once, at import). Two things make the emulation faithful:

* ``torch.cuda.set_per_process_memory_fraction``: an allocation past the cap fails with the same
  ``OutOfMemoryError`` a real card of that size gives;
* ``torch.cuda.mem_get_info`` answers as that card would: total = the cap, free = the cap less
  what this process's allocator holds. ComfyUI's model management reads its total and free memory
  only through this call (plus the allocator's own statistics), so its automatic budget, its
  choice to load a model partially (low VRAM) and its offloading act as on the smaller card.
"""
from __future__ import annotations

import sys

import torch

GIB = 1 << 30


def emulate_card(gib: float, device: int = 0) -> dict:
    """Cap this process to ``gib`` GiB of GPU ``device`` and report that card to everyone who asks."""
    if "comfy.model_management" in sys.modules:
        raise RuntimeError("emulate_card must run before comfy.model_management is imported")
    real_free, real_total = torch.cuda.mem_get_info(device)
    cap = int(gib * GIB)
    if cap > real_free:
        raise ValueError(f"cannot emulate a {gib} GiB card: only {real_free / GIB:.1f} GiB of the GPU is free")
    torch.cuda.set_per_process_memory_fraction(cap / real_total, device)

    def mem_get_info(dev=None):
        # free as the small card would have it: its size less what this process's allocator holds
        index = torch.device("cuda", device if dev is None else torch.device(dev).index or 0)
        return max(0, cap - torch.cuda.memory_reserved(index)), cap

    torch.cuda.mem_get_info = mem_get_info
    return {"card_gib": gib, "gpu_total_gib": round(real_total / GIB, 1)}
