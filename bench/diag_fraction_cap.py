"""Does torch.cuda.set_per_process_memory_fraction cap allocations in this process, and does the
memory planner fall back to block checkpointing under a small budget? A one-off check on the GPU:

    python3 bench/diag_fraction_cap.py   # output: results/2026-12-03-h200-fraction-cap.txt
"""
import gc
import torch

dev = torch.device("cuda", 0)
total = torch.cuda.get_device_properties(dev).total_memory
keep = torch.empty(200 * 2**20, dtype=torch.uint8, device=dev)
print("fraction before", torch.cuda.get_per_process_memory_fraction(dev), "reserved", torch.cuda.memory_reserved(dev))
torch.cuda.set_per_process_memory_fraction(0.5 * 2**30 / total, dev)
print("fraction now", torch.cuda.get_per_process_memory_fraction(dev))
chunks = []
try:
    for i in range(40):
        chunks.append(torch.empty(33 * 2**20, dtype=torch.uint8, device=dev))
    print("NO OOM: allocated", torch.cuda.memory_allocated(dev) / 2**30, "GiB")
except torch.cuda.OutOfMemoryError as e:
    print("OOM after", len(chunks), "chunks; allocated", torch.cuda.memory_allocated(dev) / 2**30)
chunks.clear(); gc.collect(); torch.cuda.empty_cache()
torch.cuda.set_per_process_memory_fraction(1.0, dev)
# the same through the planner on the test's toy
import sys; sys.path[:0] = ["tests", "."]
from toy_models import DeepBlockDenoiser, Brightness, block_decode, vp_sigmas
from dno import DNOConfig, DNONoise, VP, optimize
from dno.memory import GIB
den = DeepBlockDenoiser(hidden=64, depth=4).to(dev)
nz = DNONoise.from_seed((2, 4, 256, 256), 8, seed=0, sde=True, device=dev)
for budget in (None, 0.45, 0.66):
    gc.collect(); torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats(dev)
    r = optimize(den, vp_sigmas(8), Brightness(), block_decode, nz, VP, 1.0,
                 config=DNOConfig(steps=1, cuda_graphs=False, checkpoint="auto", memory_budget_gb=budget))
    print(budget, r.memory_plan, "peak", torch.cuda.max_memory_allocated(dev) / GIB, "reserved", torch.cuda.memory_reserved(dev) / GIB)
