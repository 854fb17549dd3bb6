"""DNO speed and memory benchmark through ComfyUI's own code path.

For each model (SD1.5 512², SDXL 1024², or a DiT family of bench/dit_models.py: Flux.1
dev/schnell/Kontext, Flux.2, Chroma, Qwen-Image, Z-Image, SD3.5 large/medium, at 1024² with the
family's steps, CFG and scheduler) and configuration ``precision:mode`` it measures, in one process:

* a plain generation with ComfyUI's own sampler (``comfy.sample.sample``,
  euler_ancestral = DDIM eta 1, the same sampler family DNO differentiates; on flow models
  ComfyUI runs it as euler_ancestral_RF), same steps, CFG and scheduler, plus one VAE decode;
* DNO through the node pack's real path (``nodes.engine.run_ksampler``:
  CFGGuider, ModelPatcher, the DNO host sampler, differentiable VAE decode)
  with the regulariser on: the median time of one optimisation step after a
  warm-up step, and the peak GPU memory (``torch.cuda.max_memory_allocated``);
* the memory allocated before and after each run (a second run must start
  from the same baseline).

Modes: ``auto`` (store as many steps as fit; ``auto=<GiB>`` with a budget),
``step`` (recompute every step), ``blocks`` (recompute every step and
checkpoint the model's blocks inside it: least memory), ``store`` (store all).

One JSON line per configuration goes to stdout and to ``--out``. The reward
is the mean brightness of the decoded image: cheap and differentiable, so
the numbers are the sampler's and the VAE's, not a reward model's.

    python bench/run.py --model sd15 --configs bf16:auto,bf16:step --out bench/results/x.jsonl
    python bench/run.py --model sd15 --tiny --device cpu --steps 4 --opt-steps 3   # smoke test
    python bench/run.py --model flux-dev --configs bf16:step      # 28 steps, cfg 1, guidance 3.5
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from comfy_env import import_comfy, load_node_pack  # noqa: E402
from dit_models import FAMILIES  # noqa: E402

MODELS = ("sd15", "sdxl") + tuple(FAMILIES)

GIB = 1024 ** 3
SAMPLER = "euler_ancestral"   # DDIM eta=1 in sigma space is exactly this sampler for VP models


class Brightness(torch.nn.Module):
    """Mean brightness: a cheap differentiable stand-in for a reward model."""
    name = "brightness"
    differentiable = True

    def forward(self, images, prompts=None):
        return images.float().mean(dim=(1, 2, 3))


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def allocated(device) -> int:
    return torch.cuda.memory_allocated(device) if torch.device(device).type == "cuda" else 0


def allocator_counts(device) -> dict:
    """The caching allocator's counters whose growth during a run costs time: retries (every
    cached block freed, a device sync, then cudaMalloc again) and raw cudaMalloc/cudaFree calls."""
    if torch.device(device).type != "cuda":
        return {}
    stats = torch.cuda.memory_stats(device)
    return {k: stats.get(k, 0) for k in ("num_alloc_retries", "num_device_alloc", "num_device_free",
                                         "num_sync_all_streams")}


def parse_mode(mode: str):
    """'auto' | 'auto=<GiB>' | 'step' | 'blocks' | 'store' -> (checkpoint, budget GiB)."""
    if mode == "auto":
        return "auto", None
    if mode.startswith("auto="):
        return "auto", float(mode.split("=", 1)[1])
    return {"step": (True, None), "blocks": ("blocks", None), "store": (False, None)}[mode]


def plain_generation(bench, steps: int, seed: int, device, repeats: int) -> dict:
    """ComfyUI's own sampler and VAE decode, as KSampler + VAEDecode run them (inference mode)."""
    import comfy.sample
    # the family's Empty*LatentImage, then what KSampler does to it (5-D for Qwen-Image's Wan latent)
    latent = comfy.sample.fix_empty_latent_channels(bench.model, bench.empty_latent())
    sampling, decoding = [], []
    with torch.inference_mode():
        for _ in range(repeats + 1):          # the first run warms up
            noise = comfy.sample.prepare_noise(latent, seed)
            sync(device)
            t0 = time.perf_counter()
            samples = comfy.sample.sample(bench.model, noise, steps, bench.cfg, SAMPLER, bench.scheduler,
                                          bench.positive, bench.negative, latent, denoise=1.0, seed=seed,
                                          disable_pbar=True)
            sync(device)
            t1 = time.perf_counter()
            images = bench.vae.decode(samples)
            sync(device)
            t2 = time.perf_counter()
            sampling.append(t1 - t0)
            decoding.append(t2 - t1)
        finite = bool(torch.isfinite(samples).all() and torch.isfinite(images).all())
    s, d = statistics.median(sampling[1:]), statistics.median(decoding[1:])
    return {"plain_sampling_s": round(s, 4), "plain_decode_s": round(d, 4),
            "plain_generation_s": round(s + d, 4), "plain_finite": finite}


def dno_run(pack, bench, precision: str, mode: str, steps: int, opt_steps: int, seed: int, device,
            profile_to: str = None, cuda_graphs: bool = True, keep_latent: bool = False,
            snapshot_to: str = "") -> dict:
    """One DNO run through the node pack's KSampler path; step times from its history."""
    engine = sys.modules[pack.__name__ + ".nodes.engine"]
    dno = sys.modules[pack.__name__ + ".dno"]
    checkpoint, budget = parse_mode(mode)
    config = dno.DNOConfig(steps=opt_steps, lr=0.01, method="autograd", precision=precision,
                           checkpoint=checkpoint, memory_budget_gb=budget, cuda_graphs=cuda_graphs)
    settings = engine.DNORunSettings(reward=Brightness(), vae=bench.vae, config=config, eta=1.0,
                                     regularizer=dno.ProbabilityRegularizer(gamma=1.0, k=1, permutations=16),
                                     preview_every=0)
    latent = {"samples": bench.empty_latent()}
    gc.collect()
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    stats_before = allocator_counts(device)
    before = allocated(device)
    profiler = None
    if profile_to:
        from torch.profiler import ProfilerActivity, profile
        profiler = profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else []))
        profiler.__enter__()
    if snapshot_to and cuda:
        import peak_breakdown
        peak_breakdown.start_recording(device)
    sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        _, sampler = engine.run_ksampler(bench.model, bench.positive, bench.negative, latent, settings, seed,
                                         steps, bench.cfg, bench.scheduler, 1.0)
    sync(device)
    wall = time.perf_counter() - t0
    if profiler is not None:
        profiler.__exit__(None, None, None)
        write_profile(profiler, profile_to, wall, cuda)
    if snapshot_to and cuda:
        snapshot = torch.cuda.memory._snapshot()
        peak_breakdown.stop_recording(device)
        text = peak_breakdown.breakdown(snapshot, before, torch.device(device).index or 0)
        del snapshot
        with open(snapshot_to, "a") as f:
            f.write(f"== {precision}:{mode} graphs={cuda_graphs}\n{text}\n")
        print(text, flush=True)
    result = sampler.result
    peak = torch.cuda.max_memory_allocated(device) if cuda else 0
    peak_reserved = torch.cuda.max_memory_reserved(device) if cuda else 0
    latent_out = result.latent.detach().float().cpu() if keep_latent else None
    stats = {k: v - stats_before[k] for k, v in allocator_counts(device).items()}
    del sampler
    gc.collect()
    after = allocated(device)
    elapsed = [h.elapsed for h in result.history]
    intervals = [b - a for a, b in zip(elapsed, elapsed[1:])]
    # interval k = backward of sample k + update + graph render of sample k+1; the first one
    # warms up, the last one renders without a graph (the final scoring): both left out.
    timed = intervals[1:-1]
    warm_inclusive = not timed and bool(intervals[:-1])
    if warm_inclusive:     # a 2-update run: its only full step includes the warm-up
        timed = intervals[:1]
    rewards = [h.reward[0] for h in result.history]
    plan = result.memory_plan
    info = dict(result.render_info)
    record = {
        "cuda_graphs": bool(info.get("cuda_graphs")), "render": info,
        "first_update_s": round(intervals[0], 4) if intervals else None,
        "checkpoint": str(checkpoint), "memory_budget_gb": budget,
        "sampler_autocast": engine.sampler_config(config, bench.model.model).autocast_sampler,
        "plan": None if plan is None else {"stored_steps": plan.stored_steps,
                                           "block_checkpointing": plan.block_checkpointing,
                                           "step_gib": round(plan.step_bytes / GIB, 3),
                                           "decode_gib": round(plan.decode_bytes / GIB, 3),
                                           "in_use_gib": round(plan.in_use_bytes / GIB, 3),
                                           "budget_gib": round(plan.budget_bytes / GIB, 3)},
        "opt_steps": opt_steps, "dno_step_s": round(statistics.median(timed), 4) if timed else None,
        "step_time_includes_warmup": warm_inclusive,
        "dno_step_s_all": [round(t, 4) for t in intervals], "dno_wall_s": round(wall, 3),
        "peak_gib": round(peak / GIB, 3), "peak_reserved_gib": round(peak_reserved / GIB, 3),
        "allocated_before_gib": round(before / GIB, 3),
        "allocated_after_gib": round(after / GIB, 3),
        "released": abs(after - before) < 64 * 1024 ** 2,
        "weight_grads_left": sum(p.grad is not None for p in bench.model.model.parameters()),
        "reward_first": rewards[0], "reward_last": rewards[-1], "stop_reason": result.stop_reason,
        "finite": all(map(lambda r: r == r and abs(r) != float("inf"), rewards)),
        "allocator": {"conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""), **stats},
    }
    if keep_latent:
        record["_latent"] = latent_out
        record["_rewards"] = rewards
    return record


def compare_runs(graphed: dict, eager: dict) -> dict:
    """The same-process A/B of the graphed render against the eager one: the same seed and
    settings, so the whole trajectories (every update's gradient) must agree to bf16 rounding."""
    a, b = graphed.pop("_latent"), eager.pop("_latent")
    ra, rb = graphed.pop("_rewards"), eager.pop("_rewards")
    return {"latent_rel_err": float((a - b).norm() / b.norm().clamp_min(1e-30)),
            "reward_max_abs_diff": max(abs(x - y) for x, y in zip(ra, rb)),
            "rewards_graphed": ra, "rewards_eager": rb,
            "step_s_graphed": graphed.get("dno_step_s"), "step_s_eager": eager.get("dno_step_s"),
            "speedup": (round(eager["dno_step_s"] / graphed["dno_step_s"], 3)
                        if graphed.get("dno_step_s") and eager.get("dno_step_s") else None)}


def memory_format(bench, layout) -> None:
    """UNet and VAE weights in ``layout`` (channels-last: cuDNN's Hopper kernels take NHWC)."""
    bench.model.model.diffusion_model.to(memory_format=layout)
    bench.vae.first_stage_model.to(memory_format=layout)


def engine_layout(pack, bench, device) -> bool:
    """Whether the pack ran that DNO run with channels-last convolution weights."""
    return bool(sys.modules[pack.__name__ + ".nodes.engine"].channels_last_wanted(
        device, bench.model.model.diffusion_model))


def git_commit() -> str:
    """The benchmarked commit (with '+dirty' when the tree differs from it)."""
    import subprocess
    if os.environ.get("DNO_COMMIT"):       # the device machine's copy of the tree has no history
        return os.environ["DNO_COMMIT"]
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("DNO_COMMIT", "unknown")


def switch_off(pack, context_name: str) -> None:
    """Replace one part of ``noise_only_backward`` (dno/frozen.py), which the core and the host
    sampler enter around a run, by a no-op, for an A/B: ``frozen_parameters`` (``--weight-grads``,
    as before a5be112) or ``input_grad_convolutions`` (``--stock-conv``, autograd's own
    convolution)."""
    import contextlib

    @contextlib.contextmanager
    def no_op(modules):
        yield 0
    setattr(sys.modules[f"{pack.__name__}.dno.frozen"], context_name, no_op)


def write_profile(profiler, path: str, wall: float, cuda: bool) -> None:
    """Top operators by device (or CPU) time, and how busy the GPU was over the run."""
    averages = profiler.key_averages()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    table = averages.table(sort_by=key, row_limit=40, max_name_column_width=60)
    busy = None
    if cuda:
        kernel_us = sum(getattr(e, "self_device_time_total", 0) for e in averages)
        busy = kernel_us / 1e6 / wall
    # the host side: where the Python and launch time goes (the GPU idles when this dominates)
    host = averages.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60) if cuda else ""
    with open(path, "w") as f:
        f.write(f"wall {wall:.3f} s; GPU kernel time / wall = {busy}\n{table}\n{host}\n")
    print(f"profile: wall {wall:.3f} s, GPU busy fraction {busy}", flush=True)
    print(table[:3500], flush=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=MODELS, required=True,
                    help="sd15, sdxl or a DiT family of bench/dit_models.py (full size unless --tiny)")
    ap.add_argument("--configs", default="bf16:auto,fp16:auto,fp32:auto,bf16:step,fp16:step",
                    help="comma-separated precision:mode[@updates][/eager][/nchw] (modes: auto, auto=<GiB>, step, "
                         "blocks, store; /eager turns the CUDA-graph render off; /nchw keeps the weights' NCHW "
                         "layout for that DNO run (DNO_CHANNELS_LAST=0): an A/B of dno/layout.py in one process)")
    ap.add_argument("--compare", action="store_true",
                    help="run every configuration twice in this process, CUDA graphs on and off, and compare "
                         "the trajectories (the A/B of dno/graphed.py)")
    ap.add_argument("--steps", type=int, default=0,
                    help="sampling steps (default: the family's: 50 for SD1.5/SDXL, 28 for Flux.1 dev, 4 schnell...)")
    ap.add_argument("--cfg", type=float, default=None, help="CFG scale (default: the family's: 5 for SD, 1 for "
                    "Flux.1 dev with FluxGuidance 3.5, 4 for Chroma and Qwen-Image, 4.5 for SD3.5...)")
    ap.add_argument("--opt-steps", type=int, default=5, help="DNO updates per run (timed: all but first and last)")
    ap.add_argument("--opt-steps-fp32", type=int, default=3)
    ap.add_argument("--plain-repeats", type=int, default=2)
    ap.add_argument("--profile", default="", help="precision:mode to profile with torch.profiler")
    ap.add_argument("--profile-out", default="profile.txt")
    ap.add_argument("--profile-steps", type=int, default=10,
                    help="sampling steps of the profiled run (2 updates): every step does the same work, "
                         "and the profiler's tables over 50 steps take longer than the run")
    ap.add_argument("--tiny", action="store_true", help="tiny UNet, 64x64 images (CPU smoke test)")
    ap.add_argument("--resolution", type=int, default=0,
                    help="image side in pixels (default: 512 for SD1.5, 1024 for SDXL and the DiTs, 64 with --tiny)")
    ap.add_argument("--weight-grads", action="store_true",
                    help="reproduce the runs before a5be112: leave requires_grad on the weights, so "
                         "every backward also computes weight gradients (A/B of dno/frozen.py)")
    ap.add_argument("--stock-conv", action="store_true",
                    help="let autograd's convolution save its inputs, as before input_grad_conv.py (A/B)")
    ap.add_argument("--channels-last", action="store_true",
                    help="UNet and VAE weights in channels-last (NHWC) memory format, for the plain "
                         "generation and DNO alike (cuDNN converts NCHW tensors for its Hopper kernels)")
    ap.add_argument("--compile", default="", metavar="BACKEND",
                    help="compile the UNet the way ComfyUI's TorchCompileModel node does "
                         "(set_torch_compile_wrapper; inductor, cudagraphs, aot_eager...), "
                         "for the plain generation and DNO alike")
    ap.add_argument("--memory-snapshot", default="", metavar="PATH",
                    help="record every allocation of each DNO run and append what is allocated at its peak, "
                         "by allocating code, to PATH (bench/peak_breakdown.py)")
    ap.add_argument("--card-gb", type=float, default=0,
                    help="emulate a card of this many GiB (bench/card.py): the allocator capped, and ComfyUI's "
                         "model management told that total and free memory")
    ap.add_argument("--weight-dtype", default="", choices=("", "fp8_e4m3fn"),
                    help="the diffusion model's weights in fp8 (computed in bf16), as ComfyUI's loaders' weight_dtype")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)

    card = {}
    if args.card_gb:       # before ComfyUI's model management reads the card's memory
        from card import emulate_card
        card = emulate_card(args.card_gb)
    import_comfy(cpu=args.device == "cpu")
    pack = load_node_pack()
    if args.weight_grads:
        switch_off(pack, "frozen_parameters")
    if args.stock_conv:
        switch_off(pack, "input_grad_convolutions")
    from models import build
    device = torch.device(args.device)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    configs = [c.split(":", 1) for c in args.configs.split(",") if c]
    command = "python " + " ".join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:]))
    commit = git_commit()
    out = open(args.out, "a") if args.out else None
    profiled = [args.profile.split(":")[0]] if args.profile else []
    for precision in dict.fromkeys([p for p, _ in configs] + profiled):
        bench = build(args.model, precision, device, tiny=args.tiny, resolution=args.resolution,
                      weights=args.weight_dtype)
        if args.cfg is not None:
            bench.cfg = args.cfg
        steps = args.steps or bench.steps
        if args.channels_last:     # NHWC weights: cuDNN's Hopper kernels need no layout conversion
            memory_format(bench, torch.channels_last)
        if args.compile:
            from comfy_api.torch_helpers import set_torch_compile_wrapper
            set_torch_compile_wrapper(model=bench.model, backend=args.compile)
        plain = plain_generation(bench, steps, args.seed, device, args.plain_repeats)
        print(json.dumps({"model": args.model, "precision": precision, "params": bench.params,
                          "vae": type(bench.vae.first_stage_model).__name__, "steps": steps, "cfg": bench.cfg,
                          "scheduler": bench.scheduler, "resolution": bench.width, **plain}), flush=True)
        runs = [m for p, m in configs if p == precision]
        if args.profile and args.profile.split(":")[0] == precision:
            runs.append("profile")
        for mode in runs:
            profiling = mode == "profile"
            if profiling:
                mode = args.profile.split(":", 1)[1]
            opt_steps = args.opt_steps_fp32 if precision == "fp32" else args.opt_steps
            nchw = mode.endswith("/nchw")
            mode = mode[:-len("/nchw")] if nchw else mode
            graphs = not mode.endswith("/eager")
            mode = mode[:-len("/eager")] if not graphs else mode
            if "@" in mode:        # precision:mode@updates overrides the number of updates
                mode, updates = mode.split("@")
                opt_steps = int(updates)
            try:
                if profiling:
                    dno_run(pack, bench, precision, mode, args.profile_steps, 2, args.seed, device,
                            args.profile_out, cuda_graphs=graphs)
                    continue
                # the pack's own choice of layout (nodes/engine.py), or NCHW for an A/B
                os.environ["DNO_CHANNELS_LAST"] = "0" if nchw else os.environ.get("BENCH_CHANNELS_LAST", "")
                record = dno_run(pack, bench, precision, mode, steps, opt_steps, args.seed, device,
                                 cuda_graphs=graphs, keep_latent=args.compare, snapshot_to=args.memory_snapshot)
                record["dno_channels_last"] = engine_layout(pack, bench, device)
                if args.compare:
                    other = dno_run(pack, bench, precision, mode, steps, opt_steps, args.seed, device,
                                    cuda_graphs=not graphs, keep_latent=True)
                    ab = compare_runs(record, other) if graphs else compare_runs(other, record)
                    print(json.dumps({"eager_run": other}), flush=True)
                    record["compare"] = ab
            except torch.cuda.OutOfMemoryError as error:
                record = {"error": f"out of memory: {str(error)[:200]}"}
            except Exception as error:  # keep measuring the other configurations
                record = {"error": f"{type(error).__name__}: {str(error)[:400]}"}
            if profiling:     # the profile went to its file; only a failure is reported here
                print(json.dumps({"profile": args.profile, **record}), flush=True)
                continue
            record = {"date": datetime.date.today().isoformat(), "gpu": gpu, "torch": torch.__version__,
                      "model": args.model, "tiny": args.tiny, "weight_grads": args.weight_grads,
                      "stock_conv": args.stock_conv, "channels_last": args.channels_last,
                      "compile": args.compile or None, "resolution": bench.width, "steps": steps,
                      "params": bench.params, "cfg": bench.cfg,
                      "sampler": f"DDIM eta=1 (ComfyUI {SAMPLER}/{bench.scheduler})",
                      "regularizer": "gamma=1 k=1 permutations=16", "reward": "mean brightness",
                      "precision": precision, "weights": args.weight_dtype or precision, **card,
                      "mode": mode, "commit": commit, **plain, **record}
            if record.get("dno_step_s"):
                record["ratio_to_plain"] = round(record["dno_step_s"] / plain["plain_generation_s"], 3)
            record["command"] = command
            line = json.dumps(record)
            print(line, flush=True)
            if out:
                out.write(line + "\n")
                out.flush()
        del bench
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if out:
        out.close()


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")) if "--device" in sys.argv and "cpu" in sys.argv
                          else torch.get_num_threads())
    main()
