"""What is allocated at a run's peak GPU memory, by the code that allocated it.

``torch.cuda.memory._record_memory_history`` logs every allocation and free
with its Python stack. Replaying that log finds the moment the allocated
bytes peak and the blocks alive then; grouping them by the innermost frame
in the model, the node pack or autograd says what the peak is made of
(kept activations of which layers, workspaces, gradients), which the peak
counter alone does not.

    start_recording(device)
    run()
    text = breakdown(torch.cuda.memory._snapshot(), baseline_bytes)
    stop_recording(device)
"""
from __future__ import annotations

from collections import defaultdict
from typing import List, Tuple

import torch

MIB = 1024 ** 2
# frames worth naming, innermost first: the model's layers, the pack, then torch's machinery
INTERESTING = ("/comfy/ldm/", "/comfy/ops", "/dno/", "/nodes/", "torch/utils/checkpoint",
               "torch/autograd", "torch/nn/functional", "torch/cuda/graphs")


def start_recording(device, max_entries: int = 1_000_000) -> None:
    """Log allocations and frees with Python stacks (a ring of ``max_entries``: keep runs short)."""
    torch.cuda.memory._record_memory_history(enabled="all", context="alloc", stacks="python",
                                             max_entries=max_entries, device=device)


def stop_recording(device) -> None:
    torch.cuda.memory._record_memory_history(enabled=None, device=device)


def _site(frames: List[dict]) -> str:
    for frame in frames:
        name = frame.get("filename", "")
        if any(key in name for key in INTERESTING):
            short = name.split("site-packages/")[-1].split("comfyui/")[-1]
            return f"{short}:{frame.get('line')} {frame.get('name')}"
    return "other" if not frames else f"{frames[0].get('filename', '?').split('/')[-1]}:{frames[0].get('line')}"


def peak_blocks(trace: List[dict]) -> Tuple[int, float, dict]:
    """(peak bytes above the recording's start, its time in µs, live blocks then: addr -> event)."""
    live, total, peak, peak_at, at_peak = {}, 0, 0, 0.0, {}
    for event in trace:
        action = event.get("action")
        if action == "alloc":
            live[event["addr"]] = event
            total += event["size"]
            if total > peak:
                peak, peak_at = total, event.get("time_us", 0)
                at_peak = dict(live)
        elif action == "free_requested" and event["addr"] in live:
            total -= live.pop(event["addr"])["size"]
    return peak, peak_at, at_peak


def breakdown(snapshot: dict, baseline_bytes: int, device_index: int = 0, top: int = 30) -> str:
    traces = snapshot.get("device_traces") or [[]]
    trace = traces[device_index] if device_index < len(traces) else []
    peak, _, at_peak = peak_blocks(trace)
    groups = defaultdict(lambda: [0, 0])
    for event in at_peak.values():
        group = groups[_site(event.get("frames") or [])]
        group[0] += event["size"]
        group[1] += 1
    lines = [f"peak {(baseline_bytes + peak) / MIB:.0f} MiB = {baseline_bytes / MIB:.0f} MiB allocated before "
             f"+ {peak / MIB:.0f} MiB in {len(at_peak)} blocks allocated during the run "
             f"({len(trace)} events recorded)"]
    for site, (size, count) in sorted(groups.items(), key=lambda kv: -kv[1][0])[:top]:
        lines.append(f"{size / MIB:9.1f} MiB {count:6d}  {site}")
    return "\n".join(lines)
