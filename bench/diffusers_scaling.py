"""Many GPUs for `python -m dno run` (issue 15): prompt sharding and the split hybrid estimator, 1 vs N.

On an SD1.5-shaped diffusers pipeline with random weights (UNet2DConditionModel from SD1.5's
config, SD's KL VAE, a CLIP-L-sized text encoder on a byte-level tokenizer; fp16, 512²), it runs
the real command line under torchrun, once on 1 process and once on N:

* **prompt sharding** (``--parallel prompts``, brightness, exact gradients): the throughput in
  jobs per second once every process has finished its first job (the first job of a process
  includes the CUDA-graph capture and warm-up), from the ``finished_at`` of the result lines;
  target: N = 2 at least 1.9x one process;
* **hybrid split** (``--parallel estimator``, JPEG incompressibility, q perturbed renders per
  step): the median DNO step time after the first update (the ``elapsed`` of the result lines);
  target: N = 2 at most 0.6x one process.

One JSON line per run and one per comparison go to ``--out`` (gpu, commit, torch / diffusers
versions, the exact command). A GPU run (2 H200s: bench/gpu_diffusers.sh)::

    python3 bench/diffusers_scaling.py --gpus 2 --out bench/results/<date>-h200x2-diffusers-scaling.jsonl

CPU smoke test of the script itself (tiny pipeline, gloo, a few seconds of work per run)::

    python3 bench/diffusers_scaling.py --smoke --out /tmp/scaling.jsonl
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def sd15_random_pipeline(dtype):
    """SD1.5's UNet, VAE and text-encoder shapes with random weights (built on the GPU if there is one)."""
    import torch
    from diffusers import AutoencoderKL, EulerAncestralDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    sys.path.insert(0, str(REPO / "tests"))
    from tiny_pipelines import END, START, VOCAB, byte_clip_tokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(
            sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768,
            attention_head_dim=8)
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                            layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512, scaling_factor=0.18215)
        text = CLIPTextModel(CLIPTextConfig(vocab_size=VOCAB, hidden_size=768, intermediate_size=3072,
                                            num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                                            bos_token_id=START, eos_token_id=END, pad_token_id=END,
                                            hidden_act="quick_gelu"))
    scheduler = EulerAncestralDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                                beta_schedule="scaled_linear", steps_offset=1,
                                                timestep_spacing="leading")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=byte_clip_tokenizer(), unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    return pipe.to(dtype=dtype)


def make_pipeline(folder: Path, smoke: bool) -> Path:
    if (folder / "model_index.json").is_file():
        return folder
    if smoke:
        sys.path.insert(0, str(REPO / "tests"))
        from tiny_pipelines import save_tiny_sd
        return save_tiny_sd(folder, scheduler="euler_ancestral")
    import torch
    pipe = sd15_random_pipeline(torch.float16)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return folder


def commit() -> str:
    if os.environ.get("DNO_COMMIT"):
        return os.environ["DNO_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=REPO, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine() -> dict:
    import torch
    import diffusers
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return {"date": datetime.date.today().isoformat(), "gpu": gpu,
            "gpus_visible": torch.cuda.device_count(), "commit": commit(), "torch": torch.__version__,
            "diffusers": diffusers.__version__}


def dno_run(processes: int, args, pipeline: Path, prompts: Path, out: Path, extra) -> tuple:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
               "-m", "dno", "run", "--pipeline", str(pipeline), "--prompts", str(prompts), "--out", str(out),
               "--steps", str(args.steps), "--height", str(args.resolution), "--width", str(args.resolution),
               *extra]
    if args.smoke:
        command += ["--device", "cpu"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    if args.smoke:
        env["OMP_NUM_THREADS"] = "1"
    started = time.time()
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"dno run on {processes} processes failed (exit {proc.returncode})")
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines() if line.strip()]
    failed = [r for r in records if r.get("error")]
    if failed:
        raise SystemExit(f"{len(failed)} jobs failed: {failed[0]['error']}")
    summary = json.loads((out / "run_summary.json").read_text())
    return records, summary, " ".join(shlex.quote(c) for c in command), time.time() - started


def steady_throughput(records: list, processes: int) -> float:
    """Jobs per second after every process finished its first job (that one includes the warm-up)."""
    finished = sorted(r["finished_at"] for r in records)
    if len(finished) <= processes:
        raise SystemExit(f"{len(finished)} jobs on {processes} processes leave no steady state: give more --prompts")
    warm = finished[processes - 1]
    return (len(finished) - processes) / (finished[-1] - warm)


def step_time(records: list) -> float:
    """Median DNO step after the first update (the first includes the CUDA-graph capture)."""
    steps = []
    for r in records:
        elapsed = r["elapsed"]
        steps.extend(b - a for a, b in zip(elapsed[1:], elapsed[2:]))
    if not steps:
        raise SystemExit("too few DNO steps to time: give --hybrid-opt-steps 3 or more")
    return statistics.median(steps)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, default=2, help="processes of the N-process runs (default 2)")
    parser.add_argument("--prompts", type=int, default=8, help="prompts of the sharding runs (one seed each)")
    parser.add_argument("--steps", type=int, default=20, help="sampling steps")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--opt-steps", type=int, default=4, help="DNO updates per job of the sharding runs")
    parser.add_argument("--hybrid-opt-steps", type=int, default=4, help="DNO updates of the hybrid runs")
    parser.add_argument("--q", type=int, default=16, help="perturbed renders per hybrid step (--grad-samples)")
    parser.add_argument("--estimator-batch", type=int, default=4)
    parser.add_argument("--parts", default="prompt-sharding,hybrid-split")
    parser.add_argument("--work", type=Path, default=Path("/tmp/dno-diffusers-scaling"))
    parser.add_argument("--out", type=Path, required=True, help="JSONL file the lines are appended to")
    parser.add_argument("--smoke", action="store_true", help="tiny pipeline on the CPU (gloo): tests the script")
    args = parser.parse_args(argv)
    if args.smoke:
        args.resolution, args.steps = 32, 3
    args.work.mkdir(parents=True, exist_ok=True)
    pipeline = make_pipeline(args.work / ("tiny-sd" if args.smoke else "sd15-random-fp16"), args.smoke)
    base = {**machine(), "bench_command": " ".join(shlex.quote(a) for a in [sys.executable] + sys.argv),
            "model": "tiny-sd" if args.smoke else "sd15-shaped random fp16", "resolution": args.resolution,
            "steps": args.steps}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    lines = []

    def emit(line: dict) -> None:
        lines.append(line)
        with open(args.out, "a") as handle:
            handle.write(json.dumps(line) + "\n")
        print(json.dumps(line), flush=True)

    stamp = time.strftime("%H%M%S")
    parts = args.parts.split(",")
    if "prompt-sharding" in parts:
        prompts = args.work / "prompts-sharding.txt"
        prompts.write_text("".join(f"a photograph of object number {i}\n" for i in range(args.prompts)))
        rates = {}
        for n in (1, args.gpus):
            records, summary, command, wall = dno_run(
                n, args, pipeline, prompts, args.work / f"sharding-{n}-{stamp}",
                ["--reward", "brightness", "--opt-steps", str(args.opt_steps), "--parallel", "prompts"])
            rates[n] = steady_throughput(records, n)
            emit({**base, "case": "prompt-sharding", "processes": n, "jobs": len(records),
                  "opt_steps": args.opt_steps, "steady_jobs_per_s": round(rates[n], 4),
                  "loop_seconds": summary["seconds"], "wall_seconds": round(wall, 1),
                  "job_seconds_median": statistics.median(r["seconds"] for r in records), "command": command})
        emit({**base, "case": "prompt-sharding-scaling", "processes": args.gpus,
              "speedup": round(rates[args.gpus] / rates[1], 3), "target": ">= 1.9 (2 processes)"})
    if "hybrid-split" in parts:
        prompts = args.work / "prompts-hybrid.txt"
        prompts.write_text("a photograph of a city street at night\n")
        times = {}
        for n in (1, args.gpus):
            records, summary, command, wall = dno_run(
                n, args, pipeline, prompts, args.work / f"hybrid-{n}-{stamp}",
                ["--reward", "jpeg-incompressibility", "--opt-steps", str(args.hybrid_opt_steps),
                 "--parallel", "estimator", "--grad-samples", str(args.q), "--estimator-batch",
                 str(args.estimator_batch), "--perturbation", "0.05"])
            times[n] = step_time(records)
            emit({**base, "case": "hybrid-split", "processes": n, "q": args.q,
                  "estimator_batch": args.estimator_batch, "opt_steps": args.hybrid_opt_steps,
                  "step_seconds_median": round(times[n], 4), "first_update_seconds":
                  round(records[0]["elapsed"][1] - records[0]["elapsed"][0], 3) if len(records[0]["elapsed"]) > 1 else None,
                  "rewards": records[0]["rewards"], "wall_seconds": round(wall, 1), "command": command})
        emit({**base, "case": "hybrid-split-scaling", "processes": args.gpus,
              "step_time_ratio": round(times[args.gpus] / times[1], 3), "target": "<= 0.6 (2 processes)"})
    for line in lines:
        if line["case"].endswith("-scaling"):
            value = line.get("speedup", line.get("step_time_ratio"))
            print(f"{line['case']}: {value} (target {line['target']})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
