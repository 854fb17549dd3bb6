"""``python -m dno``: DNO from the command line on a diffusers pipeline folder.

    python -m dno run --pipeline DIR --prompts FILE --reward NAME --out DIR [--seeds 0-3] ...
    torchrun --nproc-per-node N -m dno run ...     # N processes, one GPU each

The parser imports nothing beyond the standard library, so ``--help`` and argument errors are
instant; the run itself (``dno.diffusers_host.batch``) imports torch and diffusers.
"""
from __future__ import annotations

import argparse
import re
import sys
from typing import List, Optional, Sequence

# the reward names of dno.rewards.named.NAMES, spelled out here so the parser needs no torch
REWARDS = ("brightness", "darkness", "saturation", "contrast", "jpeg-compressibility", "jpeg-incompressibility",
           "aesthetic", "hps", "pickscore", "clip-score")
METHODS = ("auto", "autograd", "hybrid", "zeroth_order")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
MEMORY_MODES = ("auto", "low", "lowest", "fastest")

RUN_DESCRIPTION = """\
Run DNO for every prompt of --prompts x every seed of --seeds on a diffusers pipeline folder
(StableDiffusion, StableDiffusionXL, StableDiffusion3 or Flux, as saved by save_pretrained).
Writes to --out: images/NNNN-sSEED.png (the best image) and images/NNNN-sSEED-start.png (the
unoptimised one), results.jsonl (one line per prompt x seed: rewards per step, best step, stop
reason, timing), rewards.png (reward per DNO step) and settings.json.

Resume: run the same command again. Every prompt x seed with a line in results.jsonl is skipped,
so a run stopped by a crash, Ctrl-C or a killed process continues where it stopped and every
prompt x seed ends with exactly one result; other settings for the same --out are refused.

Many GPUs: torchrun --nproc-per-node N -m dno run ... (NCCL on GPUs, gloo on CPUs). --parallel
prompts (default) deals the prompt x seed jobs out to the processes and rank 0 writes all results;
--parallel estimator runs each job on all processes and splits the hybrid estimator's
--grad-samples perturbed renders among them (for rewards without a gradient, e.g. JPEG).
Several machines: the same command on each, with torchrun's --nnodes M --node-rank I
--rdzv-backend c10d --rdzv-endpoint HOST:PORT (or --master-addr/--master-port)."""

RUN_EPILOG = """\
examples:
  python -m dno run --pipeline ./sd15 --prompts prompts.txt --reward aesthetic \\
      --reward-file sac+logos+ava1-l14-linearMSE.pth --clip-file ViT-L-14.safetensors --out runs/aes
  python -m dno run --pipeline ./sd15 --prompts prompts.txt --reward jpeg-compressibility \\
      --seeds 0-3 --opt-steps 30 --time-budget 120 --out runs/jpeg
  torchrun --nproc-per-node 2 -m dno run --pipeline ./sdxl --prompts prompts.txt --reward contrast --out runs/c
needs: pip install -r requirements-diffusers.txt (diffusers, transformers, tqdm, matplotlib)"""


def parse_seeds(text: str) -> List[int]:
    """"0,3,5-7" -> [0, 3, 5, 6, 7]."""
    seeds: List[int] = []
    for part in str(text).split(","):
        part = part.strip()
        single, span = re.fullmatch(r"\d+", part), re.fullmatch(r"(\d+)-(\d+)", part)
        if single:
            seeds.append(int(part))
        elif span and int(span.group(1)) <= int(span.group(2)):
            seeds.extend(range(int(span.group(1)), int(span.group(2)) + 1))
        else:
            raise argparse.ArgumentTypeError(f"{part!r} is not a seed or a range FIRST-LAST (e.g. 0,3,5-7)")
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"{text!r} names a seed twice")
    return seeds


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dno", description="Direct Noise Optimization (DNO).")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    run = commands.add_parser("run", help="DNO on a diffusers pipeline for a file of prompts",
                              description=RUN_DESCRIPTION, epilog=RUN_EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    need = run.add_argument_group("what to run")
    need.add_argument("--pipeline", required=True, metavar="DIR", help="a diffusers pipeline folder (model_index.json)")
    need.add_argument("--prompts", required=True, metavar="FILE", help="a text file, one prompt per line")
    need.add_argument("--reward", required=True, choices=REWARDS, metavar="NAME",
                      help="what to maximise: " + ", ".join(REWARDS))
    need.add_argument("--out", required=True, metavar="DIR", help="where images and results go (and resume from)")
    need.add_argument("--seeds", type=parse_seeds, default=[0], metavar="LIST",
                      help="seeds per prompt, e.g. 0 or 0,3 or 0-7 (default 0)")

    reward = run.add_argument_group("reward files")
    reward.add_argument("--reward-file", metavar="PATH", help="weights of aesthetic / hps / pickscore / clip-score")
    reward.add_argument("--clip-file", metavar="PATH", help="the CLIP ViT-L/14 of the aesthetic reward")
    reward.add_argument("--quick-gelu", action=argparse.BooleanOptionalAction, default=None,
                        help="the CLIP uses QuickGELU (OpenAI weights; the aesthetic reward's default)")
    reward.add_argument("--jpeg-quality", type=int, default=95, metavar="Q", help="JPEG rewards' quality (95)")

    dno = run.add_argument_group("DNO")
    dno.add_argument("--opt-steps", type=_non_negative_int, default=20, metavar="N",
                     help="DNO updates per prompt x seed (default 20; 0 = plain sampling)")
    dno.add_argument("--time-budget", type=_positive_float, metavar="S", help="seconds per prompt x seed")
    dno.add_argument("--target", type=float, metavar="R", help="stop a prompt x seed once its reward reaches R")
    dno.add_argument("--lr", type=_positive_float, default=0.01, help="Adam learning rate on the noise (0.01)")
    dno.add_argument("--gamma", type=float, default=0.0,
                     help="probability regulariser weight, the paper's gamma (default 0 = off; try 1)")
    dno.add_argument("--method", choices=METHODS, default="auto",
                     help="auto: exact gradient if the reward has one, else the hybrid estimator")
    dno.add_argument("--grad-samples", type=_positive_int, default=16, metavar="Q",
                     help="perturbed renders per step of the hybrid estimator (16)")
    dno.add_argument("--perturbation", type=_positive_float, default=0.01, metavar="MU", help="its scale (0.01)")
    dno.add_argument("--estimator-batch", type=_positive_int, default=4, metavar="B",
                     help="perturbed renders per batch (4)")
    dno.add_argument("--opt-window", type=_non_negative_int, default=0, metavar="K",
                     help="optimise the noises of the last K sampling steps (the paper's opt_time; 0 = all)")
    dno.add_argument("--memory-mode", choices=MEMORY_MODES, default="auto",
                     help="auto: store what fits; low: recompute every step; lowest: also blocks; fastest: store all")
    dno.add_argument("--memory-budget-gb", type=_positive_float, metavar="GIB", help="GPU memory for auto")
    dno.add_argument("--precision", choices=PRECISIONS, default="auto",
                     help="auto: fp32 on a CPU, the model's dtype on a GPU")

    sampling = run.add_argument_group("sampling")
    sampling.add_argument("--steps", type=_positive_int, metavar="N", help="sampling steps (the pipeline's default)")
    sampling.add_argument("--mode", choices=("sde", "ode"), default="sde",
                          help="sde: eta 1, x_T and every step's noise optimised (the paper's default); ode: eta 0")
    sampling.add_argument("--guidance-scale", type=float, metavar="G", help="CFG scale (the pipeline's default)")
    sampling.add_argument("--negative-prompt", metavar="TEXT")
    sampling.add_argument("--height", type=_positive_int)
    sampling.add_argument("--width", type=_positive_int)
    sampling.add_argument("--noise", choices=("diffusers", "comfyui"), default="diffusers",
                          help="draw the noise as the pipeline does (default) or as ComfyUI's KSampler does")

    system = run.add_argument_group("system")
    system.add_argument("--device", metavar="DEVICE", help="cuda or cpu (default: cuda when there is one)")
    system.add_argument("--dtype", choices=("auto", "fp32", "fp16", "bf16"), default="auto",
                        help="weights' dtype (auto: fp32 on a CPU, fp16 for SD/SDXL and bf16 for SD3/Flux on a GPU)")
    system.add_argument("--parallel", choices=("prompts", "estimator"), default="prompts",
                        help="under torchrun: share out the prompts (default) or each step's estimator renders")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    # diffusers is imported lazily inside the run, after --out and its settings.json are written:
    # check for it first, so a missing install writes nothing and says what to install
    try:
        from .diffusers_host.batch import require_diffusers, run_batch     # torch and diffusers from here on
        require_diffusers()
    except ImportError as error:
        print("python -m dno run: error: it needs diffusers, which is not installed here "
              f"({type(error).__name__}: {error}).\n"
              "Install it with: pip install -r requirements-diffusers.txt", file=sys.stderr)
        return 2
    from .errors import DNOError
    try:
        return run_batch(args)
    except DNOError as error:
        print(f"python -m dno run: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
