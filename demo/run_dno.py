"""The demo's main job: DNO on our own small diffusion model, on the CPU, in under a minute.

    python3 -m demo.run_dno                         # "a red circle", the learned reward, regularised, 8 samples
    python3 -m demo.run_dno --gamma 0               # no regulariser: watch it reward-hack
    python3 -m demo.run_dno --model shapes          # the unconditional shapes model, brightness
    python3 -m demo.run_dno --reward jpeg_incompressibility   # non-differentiable: hybrid estimator
    python3 -m demo.run_dno --checkpoint model.safetensors    # the example workflow on a real ComfyUI host

Writes ``<out>/before_after.png`` (top row unoptimised, bottom row optimised) and
``<out>/reward_curve.png`` (mean and per-sample reward per DNO step), and prints
the reward and the in-distribution measures before and after. The flags (``--help``) are
defined once for both modes in ``demo/cli.py``: ``--opt-steps`` is DNO updates and
``--steps`` sampling steps, with or without ``--checkpoint``.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Sequence

import torch

from demo import cli
from demo.experiment import RunSummary, dno_run, make_reward

# Settings that the acceptance test checks (tests/test_demo_alignment.py). JPEG uses the hybrid
# estimator, whose image-space estimate has norm 2 per sample as in the official code
# (dno/gradients.py): about 9x the unnormalised estimate's 0.15-0.3 on this model, so its pull
# on the noise is always clipped to norm 1 and gamma weighs the regulariser against that (gamma 10
# before the normalisation, 100 now). Adam's step follows lr, not the gradient's scale.
DEFAULTS = {
    "brightness": dict(steps=20, lr=0.01, gamma=10.0, mu=0.01, q=8),
    "jpeg_incompressibility": dict(steps=12, lr=0.02, gamma=100.0, mu=0.05, q=8),
}
FALLBACK = dict(steps=20, lr=0.01, gamma=10.0, mu=0.05, q=8)


def save_grid(before: torch.Tensor, after: torch.Tensor, path: Path, scale: int = 4) -> None:
    import torchvision

    images = torch.cat([before, after]).clamp(0, 1)
    images = torch.nn.functional.interpolate(images, scale_factor=scale, mode="nearest")
    torchvision.utils.save_image(images, str(path), nrow=before.shape[0], padding=2, pad_value=1.0)


def save_curve(curve: List[List[float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = torch.tensor(curve)  # (steps+1, B)
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
    for b in range(values.shape[1]):
        ax.plot(values[:, b].numpy(), color="0.7", linewidth=0.8)
    ax.plot(values.mean(dim=1).numpy(), color="C0", linewidth=2, label="mean")
    ax.set_xlabel("DNO step")
    ax.set_ylabel("reward")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(str(path))
    plt.close(fig)


def describe(summary: RunSummary) -> str:
    def mean(t):
        return float(t.float().mean())

    return (f"reward {mean(summary.reward_before):.3f} -> {mean(summary.reward_after):.3f}   "
            f"realism {mean(summary.realism_before):.3f} -> {mean(summary.realism_after):.3f}   "
            f"denoise err {mean(summary.denoise_err_before):.4f} -> {mean(summary.denoise_err_after):.4f}   "
            f"({summary.denoiser_evaluations_per_image:.0f} denoiser evals/image, {summary.seconds:.1f}s)")


def main(argv: Sequence[str] = None) -> RunSummary:
    """The run on our own model (``--checkpoint`` is handled by :func:`entry`)."""
    args = cli.parse(argv)
    if args.checkpoint is not None:
        raise SystemExit("demo.run_dno.main runs our own model; use entry() (the command line) for --checkpoint")
    objects = (args.model or "objects") == "objects"
    args.reward = args.reward or ("preference" if objects else "brightness")
    torch.set_num_threads(args.threads or cli.SHAPES_THREADS)
    samples = args.samples or cli.SHAPES_SAMPLES
    sampling_steps = args.steps or cli.SHAPES_SAMPLING_STEPS
    out = args.out or cli.SHAPES_OUT
    precision = args.precision or "auto"

    from tqdm import tqdm

    from dno.precision import module_dtype, resolve_precision

    settings = dict(objects_settings(args.reward) if objects else DEFAULTS.get(args.reward, FALLBACK))
    for key, flag in (("gamma", "gamma"), ("steps", "opt_steps"), ("lr", "lr")):
        if getattr(args, flag) is not None:
            settings[key] = getattr(args, flag)
    first_seed = args.seed or 0
    seeds = list(range(first_seed, first_seed + samples))
    if objects:
        from demo.alignment import load_models
        from demo.prompts import label_of

        prompt = args.prompt or cli.OBJECTS_PROMPT
        models = load_models()
        # the experiment's scale for this reward (its settings were tuned there), else the model's own
        guidance = args.guidance if args.guidance is not None else settings.pop("guidance", models.guidance)
        what = f"the objects model, prompt {prompt!r}, guidance {guidance:g}"
        dtype = module_dtype(models.unet)
    else:
        from demo.model import load_denoiser
        from demo.realism import load_classifier

        denoiser, classifier = load_denoiser(), load_classifier()
        what = "the shapes model"
        dtype = module_dtype(denoiser)
    resolved = resolve_precision(precision, "cpu", dtype)
    sampler = "ODE (x_T optimised)" if settings.get("eta", 1.0) == 0 else "ancestral"
    print(f"DNO on {what}: reward {args.reward}, {settings['steps']} DNO steps x {sampling_steps} "
          f"{sampler} sampling steps, {samples} samples, gamma {settings['gamma']}, lr {settings['lr']}, "
          f"precision {precision}{f' -> {resolved}' if precision == 'auto' else ''} (CPU)", flush=True)

    bar = tqdm(total=settings["steps"] + 1, desc=f"DNO {args.reward}", unit="step")

    def progress(info):
        bar.set_postfix(reward=f"{float(info.reward.mean()):.3f}", best=f"{float(info.best_reward.mean()):.3f}")
        bar.update(1)

    if objects:
        from demo.alignment import dno_on_prompt

        summary = dno_on_prompt(models, args.reward, label_of(prompt), seeds, guidance=guidance,
                                sampling_steps=sampling_steps, precision=resolved, callback=progress, **settings)
    else:
        summary = dno_run(denoiser, classifier, make_reward(args.reward), seeds, gamma=settings["gamma"],
                          steps=settings["steps"], lr=settings["lr"], sampling_steps=sampling_steps, q=settings["q"],
                          mu=settings["mu"], permutations=8, precision=resolved, callback=progress)
    bar.close()
    out.mkdir(parents=True, exist_ok=True)
    save_grid(summary.images_before, summary.images_after, out / "before_after.png")
    subject = f"{prompt!r}, " if objects else ""
    title = f"{subject}{args.reward}, gamma={settings['gamma']}, lr={settings['lr']}, seeds {seeds[0]}..{seeds[-1]}"
    save_curve(summary.reward_curve, out / "reward_curve.png", title)
    print(describe(summary))
    data = "dataset ~0.87, model samples ~0.86" if objects else "dataset ~0.78, model samples ~0.6-0.7"
    print(f"realism = classifier probability of 'uncorrupted dataset image' ({data}); "
          "denoise err = the model's own x0 error on the image (lower = more in distribution)")
    print(f"wrote {out / 'before_after.png'} (top: unoptimised, bottom: DNO) and {out / 'reward_curve.png'}")
    return summary


def objects_settings(reward: str) -> dict:
    """The objects model's settings for a reward: those of the experiment (demo.alignment)."""
    from dataclasses import asdict

    from demo.alignment import SETTINGS, Setting

    setting = SETTINGS.get(reward, Setting(steps=20, lr=0.01, gamma=10.0, mu=0.05))
    return {k: v for k, v in asdict(setting).items() if k in ("steps", "lr", "gamma", "mu", "q", "eta", "guidance")}


def entry(argv: Sequence[str] = None) -> int:
    """Command line: with ``--checkpoint`` the example workflow runs through a real ComfyUI
    host (``demo.comfy_run``), otherwise DNO runs on the embedded shapes model."""
    args = cli.parse(argv)
    if args.checkpoint is not None:
        from . import comfy_run
        return comfy_run.run_cli(args)
    main(argv)
    return 0


if __name__ == "__main__":
    sys.exit(entry())
