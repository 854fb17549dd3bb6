"""A memory budget below one stored step, in a process of its own (test_gpu_memory.py runs it).

The planner's cap holds back new device memory, not memory the caching allocator has cached
already, so what other tests left cached in a shared pytest process would let a measurement
pass the cap: a fresh CUDA context is the card the budget describes. Prints one JSON line.
"""
from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]

import torch  # noqa: E402

from dno import DNOConfig, DNONoise, VP, optimize  # noqa: E402
from dno.memory import GIB  # noqa: E402
from toy_models import Brightness, DeepBlockDenoiser, block_decode, vp_sigmas  # noqa: E402


def main() -> None:
    device = torch.device("cuda", 0)
    den = DeepBlockDenoiser(hidden=64, depth=4).to(device)
    nz = DNONoise.from_seed((2, 4, 256, 256), 8, seed=0, sde=True, device=device)

    def run(**config):
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        res = optimize(den, vp_sigmas(8), Brightness(), block_decode, nz, VP, 1.0,
                       config=DNOConfig(steps=1, cuda_graphs=False, **config))
        return res, torch.cuda.max_memory_allocated(device)

    run(checkpoint=True)                     # the library workspaces a backward creates
    full, _ = run(checkpoint="auto")
    blocks, blocks_peak = run(checkpoint="blocks")
    in_use, reserve = full.memory_plan.in_use_bytes, full.memory_plan.reserve_bytes
    budget = (blocks_peak + in_use + reserve * 3 // 4) // 2
    capped, capped_peak = run(checkpoint="auto", memory_budget_gb=budget / GIB)
    plan = capped.memory_plan
    print(json.dumps({
        "in_use": in_use, "full_reserve": reserve, "blocks_peak": blocks_peak, "budget": budget,
        "capped_peak": capped_peak, "blocks": plan.block_checkpointing, "stored": plan.stored_steps,
        "describe": plan.describe(),
        "x_T_max_diff": float((capped.noise.x_T - blocks.noise.x_T).abs().max()),
        "fraction_after": torch.cuda.get_per_process_memory_fraction(device)}))


if __name__ == "__main__":
    main()
