"""``python -m dno run``: every prompt x seed of a file through ``optimize_pipeline``, resumable,
on one process or many (``dno.distributed``).

A job is one prompt with one seed (one image). Rank 0 keeps the run's folder (``dno.results``):
it reads which jobs are done, tells every process the jobs left, and writes each finished job's
images and result line as the results arrive. With ``--parallel prompts`` the jobs go out in
rounds, one per process, and rank 0 gathers each round; with ``--parallel estimator`` every
process runs every job and renders its share of the estimator's perturbations.
"""
from __future__ import annotations

import io
import json
import logging
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import torch

from .. import distributed
from ..errors import DNOError
from ..optimize import resolve_method
from ..regularizer import ProbabilityRegularizer
from ..results import IMAGES, PLOT, ResultStore, plot_rewards

log = logging.getLogger("DNO")

RUN_SUMMARY = "run_summary.json"
# what shapes a result: resuming with any of these changed is refused (dno.results)
RESULT_SETTINGS = ("pipeline", "reward", "reward_file", "clip_file", "quick_gelu", "jpeg_quality", "opt_steps",
                   "time_budget", "target", "lr", "gamma", "method", "grad_samples", "perturbation",
                   "estimator_batch", "opt_window", "precision", "steps", "mode", "guidance_scale",
                   "negative_prompt", "height", "width", "noise", "dtype")
FLOW_PIPELINES = ("FluxPipeline", "StableDiffusion3Pipeline")


@dataclass(frozen=True)
class Job:
    prompt_index: int
    prompt: str
    seed: int

    @property
    def key(self) -> str:
        return f"{self.prompt_index}:{self.seed}"

    @property
    def image_name(self) -> str:
        return f"{self.prompt_index:04d}-s{self.seed}.png"


def read_prompts(path: str) -> List[str]:
    file = Path(path)
    if not file.is_file():
        raise DNOError(f"--prompts {path}: no such file; give a text file with one prompt per line")
    prompts = [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise DNOError(f"--prompts {path} holds no prompt; write one prompt per line")
    return prompts


def jobs_of(prompts: List[str], seeds: List[int]) -> List[Job]:
    """Prompt-major: every seed of the first prompt, then the next prompt."""
    return [Job(i, p, s) for i, p in enumerate(prompts) for s in seeds]


def pipeline_class(folder: Path) -> str:
    index = folder / "model_index.json"
    if not index.is_file():
        raise DNOError(f"--pipeline {folder}: no model_index.json there; give a diffusers pipeline folder "
                       "(one written by pipe.save_pretrained(folder))")
    return json.loads(index.read_text()).get("_class_name", "")


def weights_dtype(choice: str, device: torch.device, class_name: str) -> torch.dtype:
    if choice != "auto":
        return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[choice]
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if class_name in FLOW_PIPELINES else torch.float16


def load_pipeline(folder: str, device: torch.device, dtype_choice: str):
    from diffusers import DiffusionPipeline
    path = Path(folder)
    class_name = pipeline_class(path)
    dtype = weights_dtype(dtype_choice, device, class_name)
    with warnings.catch_warnings():     # newer diffusers call it dtype; torch_dtype works in all
        warnings.simplefilter("ignore", FutureWarning)
        pipe = DiffusionPipeline.from_pretrained(str(path), torch_dtype=dtype, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def build_reward(args):
    from ..rewards.named import reward_from_name
    return reward_from_name(args.reward, args.reward_file, args.clip_file, args.quick_gelu, args.jpeg_quality)


def result_settings(args) -> dict:
    values = dict(vars(args))
    values["pipeline"] = str(Path(args.pipeline).resolve())
    for name in ("reward_file", "clip_file"):
        if values.get(name):
            values[name] = str(Path(values[name]).resolve())
    return {name: values.get(name) for name in RESULT_SETTINGS}


def png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


class ProgressBar:
    """One bar per job: the scored samples, with the latest and the best reward."""

    def __init__(self, job: Job, total: int, show: bool, position: int = 0, rank: Optional[int] = None):
        from tqdm import tqdm
        text = job.prompt if len(job.prompt) <= 32 else job.prompt[:31] + "…"
        label = f"prompt {job.prompt_index} seed {job.seed} ({text})"
        if rank is not None:
            label = f"[rank {rank}] {label}"
        self.bar = tqdm(total=total, desc=label, unit="step", disable=not show, position=position,
                        leave=True, file=sys.stderr, dynamic_ncols=True)

    def __call__(self, info) -> None:
        self.bar.set_postfix(reward=f"{float(info.reward.mean()):.4f}", best=f"{float(info.best_reward.mean()):.4f}",
                             refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def chained(*callbacks):
    def call(info):
        for callback in callbacks:
            if callback is not None:
                callback(info)
    return call


def run_job(pipe, job: Job, args, reward, processes: distributed.Processes, split: bool,
            show_progress: bool) -> Tuple[dict, dict]:
    """One prompt x seed: (its result record, its PNG images by file name)."""
    from .run import optimize_pipeline
    agreed = distributed.AgreedStopping(processes, args.time_budget, args.target) if split else None
    bar = ProgressBar(job, args.opt_steps + 1, show_progress, position=processes.local_rank if not split else 0,
                      rank=processes.rank if processes.distributed and not split else None)
    regularizer = ProbabilityRegularizer(gamma=args.gamma) if args.gamma > 0 else None
    started = time.perf_counter()
    error = None
    try:
        out = optimize_pipeline(
            pipe, job.prompt, reward, opt_steps=args.opt_steps, steps=args.steps,
            negative_prompt=args.negative_prompt, guidance_scale=args.guidance_scale, height=args.height,
            width=args.width, seed=job.seed, noise=args.noise, eta=1.0 if args.mode == "sde" else 0.0,
            lr=args.lr, method=args.method, precision=args.precision, regularizer=regularizer,
            memory_mode=args.memory_mode, memory_budget_gb=args.memory_budget_gb,
            time_budget=None if split else args.time_budget, target_reward=None if split else args.target,
            opt_window=args.opt_window, grad_samples=args.grad_samples, perturbation=args.perturbation,
            estimator_batch=args.estimator_batch,
            callback=chained(bar, agreed), estimator_share=processes.estimator_share() if split else None)
    except DNOError as failure:           # this job's input is bad (e.g. a NaN reward): its result says so
        out, error = None, str(failure)
    finally:
        bar.close()
    record = {"key": job.key, "prompt_index": job.prompt_index, "prompt": job.prompt, "seed": job.seed,
              "seconds": round(time.perf_counter() - started, 3), "finished_at": time.time(),
              "rank": processes.rank, "world": processes.world, "device": str(processes.device)}
    if out is None:
        record.update(error=error, stop_reason=f"failed: {error}", rewards=[])
        return record, {}
    result = out.result
    stop_reason = agreed.reason if agreed is not None and agreed.reason else result.stop_reason
    start_name = job.image_name.replace(".png", "-start.png")
    record.update(
        image=f"{IMAGES}/{job.image_name}", start_image=f"{IMAGES}/{start_name}",
        initial_reward=float(result.initial_reward[0]), best_reward=float(result.best_reward[0]),
        best_step=int(result.best_step[0]), stop_reason=stop_reason, rendered=int(result.rendered),
        rewards=[h.reward[0] for h in result.history],
        regularizer=None if result.history[0].regularizer is None else [h.regularizer[0] for h in result.history],
        probability=None if result.history[0].probability is None else [h.probability[0] for h in result.history],
        elapsed=[round(h.elapsed, 4) for h in result.history])
    from .run import to_pil
    images = {job.image_name: png_bytes(out.images[0]), start_name: png_bytes(to_pil(out.initial_image)[0])}
    return record, images


def describe(record: dict, done: int, total: int) -> str:
    head = f"[{done}/{total}] prompt {record['prompt_index']} seed {record['seed']}"
    if record.get("error"):
        return f"{head}: FAILED: {record['error']}"
    return (f"{head}: reward {record['initial_reward']:.4f} -> {record['best_reward']:.4f} "
            f"(step {record['best_step']}), {record['stop_reason']}, {record['seconds']:.1f} s")


def check_split(args, reward, processes) -> None:
    """--parallel estimator splits the estimator's renders: only an estimator has renders to split."""
    if args.parallel != "estimator":
        return
    method = resolve_method(args.method, reward)
    if method not in ("hybrid", "zeroth_order"):
        raise DNOError(f"--parallel estimator splits the hybrid / zeroth-order estimator's renders, but the "
                       f"{args.reward} reward is optimised with exact gradients (method {method}): use "
                       "--parallel prompts, or --method hybrid")
    chunks = -(-args.grad_samples // args.estimator_batch)
    if processes.distributed and chunks < processes.world:
        batch = -(-args.grad_samples // processes.world)
        if processes.is_main:
            print(f"DNO: --estimator-batch {args.estimator_batch} gives {chunks} batches of perturbed renders "
                  f"for {processes.world} processes; using {batch} so each renders one", file=sys.stderr)
        args.estimator_batch = batch


def require_diffusers() -> None:
    """Raise ImportError now if diffusers is missing: the run imports it lazily, only once it has
    created --out and written settings.json (``dno.cli`` calls this first)."""
    import diffusers  # noqa: F401


def run_batch(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    processes = distributed.from_environment(args.device)
    try:
        return _run(args, processes)
    finally:
        processes.close()


def _run(args, processes: distributed.Processes) -> int:
    main = processes.is_main
    store = ResultStore(Path(args.out))
    prompts = read_prompts(args.prompts)
    jobs = jobs_of(prompts, args.seeds)
    done = store.open(result_settings(args)) if main else {}
    todo = processes.broadcast([job for job in jobs if job.key not in done] if main else None)
    skipped = len(jobs) - len(todo)
    if main:
        print(f"DNO: {len(jobs)} jobs ({len(prompts)} prompts x {len(args.seeds)} seeds), {skipped} done before, "
              f"{len(todo)} to run on {processes.world} process{'es' if processes.world > 1 else ''} "
              f"({processes.device}{', ' + args.parallel + ' in parallel' if processes.distributed else ''})",
              file=sys.stderr, flush=True)
    reward = build_reward(args)
    check_split(args, reward, processes)
    pipe = load_pipeline(args.pipeline, processes.device, args.dtype) if todo else None
    split = args.parallel == "estimator" and processes.distributed
    finished = skipped
    started = time.time()
    interrupted = False
    try:
        if split or not processes.distributed:
            for job in todo:
                record, images = run_job(pipe, job, args, reward, processes, split, show_progress=main)
                if main:
                    store.append(record, images)
                    finished += 1
                    print(describe(record, finished, len(jobs)), file=sys.stderr, flush=True)
        else:
            for round_jobs in distributed.rounds(todo, processes.world):
                mine = round_jobs[processes.rank] if processes.rank < len(round_jobs) else None
                payload = run_job(pipe, mine, args, reward, processes, False, True) if mine else None
                for item in processes.gather(payload) or []:
                    if item is not None:
                        store.append(*item)
                        finished += 1
                        print(describe(item[0], finished, len(jobs)), file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        interrupted = True
    if main:
        records = store.read()
        try:
            plot_rewards(records, store.folder / PLOT, f"{args.reward}: {len(records)} results")
        except ImportError:
            print(f"DNO: no {PLOT}: matplotlib is not installed (pip install matplotlib)", file=sys.stderr)
        summary = {"world": processes.world, "parallel": args.parallel if processes.distributed else None,
                   "jobs": len(jobs), "done_before": skipped, "ran": finished - skipped,
                   "seconds": round(time.time() - started, 3), "device": str(processes.device),
                   "interrupted": interrupted}
        (store.folder / RUN_SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
        state = "interrupted" if interrupted else "finished"
        print(f"DNO: {state}: {len(records)} of {len(jobs)} jobs have results in {store.folder}"
              + ("; run the same command again to resume" if len(records) < len(jobs) else ""),
              file=sys.stderr, flush=True)
    return 130 if interrupted else 0
