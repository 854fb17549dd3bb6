"""The demo's command line: one parser for both modes, one meaning per flag.

``python3 -m demo.run_dno`` runs DNO on the embedded shapes model; with ``--checkpoint`` it runs
an example workflow on that checkpoint through a real ComfyUI server (``demo.comfy_run``). The
flags they share mean the same in both (``--opt-steps`` = DNO updates, ``--steps`` = sampling
steps); a flag that only one mode uses is refused in the other instead of being ignored.
Imports nothing beyond the standard library (and ``demo.settings``, the run settings the help states),
so ``--help`` and argument errors are instant.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Optional, Sequence

from demo.settings import (DEFAULT_REWARD, GUIDANCE_RANGE, MODELS, OBJECTS_REWARDS, SAMPLING_STEPS, SHAPES_REWARDS,
                           default_text)

OBJECTS_PROMPT = "a red circle"
PRECISIONS = ("auto", "bf16", "fp16", "fp32")   # dno.precision.CHOICES, without importing torch
SHAPES_SAMPLES = 8
SHAPES_SAMPLING_STEPS = SAMPLING_STEPS
SHAPES_THREADS = 2
SHAPES_OUT = Path("outputs/demo")

# What a first look on a CPU can afford (printed as the hint in --checkpoint mode).
CPU_HINT = {"width": 256, "height": 256, "steps": 10, "opt_steps": 5}

SHAPES_ONLY = ("gamma", "samples", "model", "guidance")
CHECKPOINT_ONLY = ("workflow", "comfyui", "width", "height", "negative", "image", "controlnet",
                   "device", "timeout")

DESCRIPTION = """\
Direct Noise Optimization, end to end.

Without --checkpoint: DNO on our own small diffusion model, on the CPU (under a minute): by
default the 1.8M-parameter class-conditional objects model with classifier-free guidance, the
prompt "a red circle" and the learned preference reward ("a large, centred, saturated object
of the prompted kind"); --model shapes is the older unconditional model. Prints the reward per
DNO step, then the reward and the in-distribution measures before and after; writes
<out>/before_after.png (top row unoptimised, bottom row DNO) and <out>/reward_curve.png.

With --checkpoint FILE: the example workflow (example_workflows/api/) on that checkpoint
through a real ComfyUI server, streaming the model loading, the sampling progress and every
DNO step to this terminal; writes the images, rewards.json and rewards.png to <out>. Options
left out keep the workflow's own values (512x512, 50 sampling steps, 20 DNO steps)."""

EPILOG = """\
examples:
  python3 -m demo.run_dno                                    # "a red circle", learned reward, 8 samples
  python3 -m demo.run_dno --prompt "a blue cross" --gamma 0  # no regulariser: watch it reward-hack
  python3 -m demo.run_dno --reward brightness                # a pixel reward
  python3 -m demo.run_dno --reward jpeg_incompressibility    # non-differentiable: hybrid estimator
  python3 -m demo.run_dno --checkpoint v1-5-pruned-emaonly.safetensors \\
      --width 256 --height 256 --steps 10 --opt-steps 5      # a first look on a CPU

--checkpoint needs the ComfyUI host's packages: python3 -m pip install -r requirements-test.txt && python3 tests/install_host_requirements.py"""


def build_parser(prog: str = "python3 -m demo.run_dno") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, usage="%(prog)s [options]  (--help lists them)",
                                description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    both = p.add_argument_group("both modes")
    both.add_argument("--reward", metavar="NAME",
                      help="what DNO maximises: " + " | ".join(OBJECTS_REWARDS) + f" (default "
                           f"{DEFAULT_REWARD['objects']}, the learned reward; the shapes model has all but preference "
                           f"and defaults to {DEFAULT_REWARD['shapes']}; with "
                           "--checkpoint a built-in reward of the workflow: brightness, darkness, saturation, "
                           "contrast; default: the workflow's)")
    both.add_argument("--opt-steps", type=int, metavar="N",
                      help="DNO optimisation steps, i.e. updates of the noise, at least 1 (default "
                           f"{default_text('steps')}; with --checkpoint the workflow's 20)")
    both.add_argument("--steps", type=int, metavar="N",
                      help=f"sampling steps per image (default {SHAPES_SAMPLING_STEPS}, the steps our models "
                           "were trained and evaluated at: fewer give less typical images, and the run warns; "
                           "with --checkpoint the workflow's 50)")
    both.add_argument("--lr", type=float, help=f"DNO learning rate (default {default_text('lr')}; "
                                               "with --checkpoint the workflow's 0.01)")
    both.add_argument("--seed", type=int,
                      help="seed (default 0: the shapes samples use seeds SEED..SEED+samples-1; with "
                           "--checkpoint the workflow's)")
    both.add_argument("--precision", choices=PRECISIONS,
                      help="autocast precision of DNO's differentiable pass (default auto: fp32 on a CPU, "
                           "the model's own dtype on a GPU)")
    both.add_argument("--threads", type=int, metavar="N",
                      help=f"CPU threads (default {SHAPES_THREADS}; with --checkpoint all cores, "
                           f"{max(1, os.cpu_count() or 1)} here)")
    both.add_argument("--out", type=Path, metavar="DIR",
                      help=f"output folder (default {SHAPES_OUT}; with --checkpoint outputs/comfy)")

    both.add_argument("--prompt", help=f"the prompt: for the objects model one of its 16, \"a <red|yellow|green|blue> "
                                       f"<circle|square|triangle|cross>\" (default \"{OBJECTS_PROMPT}\"); with "
                                       "--checkpoint the positive prompt")

    shapes = p.add_argument_group("our own models (without --checkpoint)")
    shapes.add_argument("--model", choices=MODELS,
                        help="objects (default): class-conditional, with a prompt and CFG; shapes: unconditional")
    shapes.add_argument("--guidance", type=float, metavar="SCALE",
                        help="classifier-free guidance scale of the objects model (default "
                             f"{default_text('guidance', ('objects',))}, the scale its settings were tuned at; "
                             f"the model was evaluated at {GUIDANCE_RANGE[0]:g} to {GUIDANCE_RANGE[1]:g})")
    shapes.add_argument("--gamma", type=float, help="weight of the probability regulariser, 0 = off (default "
                                                    f"{default_text('gamma')})")
    shapes.add_argument("--samples", type=int, metavar="N",
                        help=f"images optimised together, one per seed (default {SHAPES_SAMPLES})")
    # renamed: refuse it with the new names rather than guess
    shapes.add_argument("--sampling-steps", type=int, help=argparse.SUPPRESS)

    ckpt = p.add_argument_group("a real checkpoint through ComfyUI (--checkpoint)")
    ckpt.add_argument("--checkpoint", type=Path, metavar="FILE",
                      help="checkpoint file (e.g. v1-5-pruned-emaonly.safetensors): run the example workflow on it")
    ckpt.add_argument("--workflow", metavar="NAME",
                      help="name in example_workflows/api/ or a path to an API-format .json "
                           "(default dno_txt2img_ksampler)")
    ckpt.add_argument("--comfyui", type=Path, metavar="DIR",
                      help="ComfyUI checkout to use (default $COMFYUI_PATH, else ComfyUI 0.3.75 cached in "
                           ".cache/comfyui)")
    ckpt.add_argument("--width", type=int, help="image width (default: the workflow's 512)")
    ckpt.add_argument("--height", type=int, help="image height (default: the workflow's 512)")
    ckpt.add_argument("--negative", help="negative prompt")
    ckpt.add_argument("--image", type=Path, metavar="FILE",
                      help="input image for the img2img and ControlNet workflows")
    ckpt.add_argument("--controlnet", type=Path, metavar="FILE",
                      help="ControlNet .safetensors for the dno_controlnet workflow")
    ckpt.add_argument("--device", choices=("auto", "cpu", "gpu"),
                      help="auto (default): a CUDA GPU when torch sees one, else the CPU")
    ckpt.add_argument("--timeout", type=float, metavar="SECONDS", help="give up after this many seconds")
    return p


def parse(argv: Optional[Sequence[str]] = None, prog: str = "python3 -m demo.run_dno",
          require_checkpoint: bool = False) -> argparse.Namespace:
    """Parse and check ``argv``; exits with a usage error (status 2) on a bad combination."""
    p = build_parser(prog)
    ns = p.parse_args(None if argv is None else list(argv))
    if ns.sampling_steps is not None:
        p.error("--sampling-steps is now --steps (sampling steps); DNO updates are --opt-steps")
    if require_checkpoint and ns.checkpoint is None:
        p.error("--checkpoint FILE is required here")
    if ns.checkpoint is None:
        wrong = [name for name in CHECKPOINT_ONLY if getattr(ns, name) is not None]
        if wrong:
            p.error(f"--{wrong[0]} applies to the ComfyUI workflow: it needs --checkpoint FILE")
        model = ns.model or "objects"
        rewards = OBJECTS_REWARDS if model == "objects" else SHAPES_REWARDS
        if ns.reward is not None and ns.reward not in rewards:
            p.error(f"--reward {ns.reward!r}: the {model} model's rewards are {', '.join(rewards)}")
        if model == "shapes" and (ns.prompt is not None or ns.guidance is not None):
            p.error(f"--{'prompt' if ns.prompt is not None else 'guidance'} applies to the objects model; "
                    "the shapes model is unconditional")
        if ns.prompt is not None:
            from demo.prompts import PROMPTS, label_of
            try:
                label_of(ns.prompt)
            except ValueError:
                p.error(f"--prompt {ns.prompt!r}: the objects model knows " + ", ".join(PROMPTS))
    else:
        wrong = [name for name in SHAPES_ONLY if getattr(ns, name) is not None]
        if wrong:
            p.error(f"--{wrong[0]} applies to our own models only (objects, shapes); leave it out with --checkpoint")
    for name, low in (("opt_steps", 1), ("steps", 1), ("samples", 1), ("threads", 1)):
        value = getattr(ns, name)
        if value is not None and value < low:
            flag = "--" + name.replace("_", "-")
            extra = (" (0 would run no DNO update: nothing to optimise or plot)" if name == "opt_steps" else "")
            p.error(f"{flag} must be at least {low}, got {value}{extra}")
    return ns
