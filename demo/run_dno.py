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
from demo.settings import DEFAULT_REWARD, GUIDANCE_RANGE, SAMPLING_STEPS, SHAPES_FALLBACK, SHAPES_SETTINGS, run_settings

# The shapes model's settings (tests/test_demo_alignment.py reads them here); both models' live in
# demo/settings.py, which --help states them from.
DEFAULTS = SHAPES_SETTINGS
FALLBACK = SHAPES_FALLBACK
REALISM_TOLERANCE = 0.02    # a mean realism change smaller than this is reported as "held"
# what a reward pays for beyond the data, for the verdict's explanation
PAYS_FOR = {"preference": " (the learned reward: larger, more saturated objects than most of the data has)",
            "brightness": " (brightness: lighter pixels than the data's)"}


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


def mean(t) -> float:
    return float(t.float().mean())


def describe(summary: RunSummary) -> str:
    probability = ""
    if summary.probability_before is not None and summary.probability_after is not None:
        probability = f"noise P {mean(summary.probability_before):.2f} -> {mean(summary.probability_after):.2f}   "
    return (f"reward {mean(summary.reward_before):.3f} -> {mean(summary.reward_after):.3f}   "
            f"realism {mean(summary.realism_before):.3f} -> {mean(summary.realism_after):.3f}   "
            f"{probability}"
            f"denoise err {mean(summary.denoise_err_before):.4f} -> {mean(summary.denoise_err_after):.4f}   "
            f"({summary.denoiser_evaluations_per_image:.0f} denoiser evals/image, {summary.seconds:.1f}s)")


def setting_warnings(sampling_steps: int, guidance=None) -> List[str]:
    """Settings outside what our models were trained and evaluated at (demo/settings.py)."""
    warnings = []
    if sampling_steps < SAMPLING_STEPS:
        warnings.append(
            f"warning: --steps {sampling_steps} is below the {SAMPLING_STEPS} sampling steps our models were trained "
            f"and evaluated at (demo/weights/README.md): with fewer steps even the unoptimised samples are blurred "
            f"and untypical (at 1 step the image is the model's mean guess from pure noise, realism near 0), so "
            f"reward and realism below say little about DNO. Use --steps {SAMPLING_STEPS} or more.")
    if guidance is not None and not GUIDANCE_RANGE[0] <= guidance <= GUIDANCE_RANGE[1]:
        warnings.append(
            f"warning: --guidance {guidance:g} is outside the scales the objects model was evaluated at "
            f"({GUIDANCE_RANGE[0]:g} to {GUIDANCE_RANGE[1]:g}, demo/weights/README.md): its samples may not be "
            f"typical images of the prompt even before DNO.")
    return warnings


def verdict(summary: RunSummary, gamma: float, reward: str = "", warnings: Sequence[str] = ()) -> List[str]:
    """What the numbers mean, in words: did the reward rise, did the images stay typical."""
    reward_before, reward_after = mean(summary.reward_before), mean(summary.reward_after)
    before, after = mean(summary.realism_before), mean(summary.realism_after)
    lines = []
    if reward_after <= reward_before:
        lines.append(f"The reward did not rise ({reward_before:.3f} -> {reward_after:.3f}).")
    else:
        lines.append(f"The reward rose: {reward_before:.3f} -> {reward_after:.3f}.")
    probability, noise_typical = "", True
    if summary.probability_after is not None:
        noise_typical = mean(summary.probability_after) >= mean(summary.probability_before) - 0.1
        probability = (f" (noise probability P {mean(summary.probability_before):.2f} -> "
                       f"{mean(summary.probability_after):.2f}; ~1 = typical of N(0, I))")
    if warnings:
        lines.append(f"Realism {before:.3f} -> {after:.3f}{probability}: these settings are outside what the model "
                     "was trained for (warning above), so the unoptimised samples are no yardstick and these "
                     "numbers say little about DNO.")
    elif after >= before - REALISM_TOLERANCE:
        lines.append(f"Realism held: {before:.3f} -> {after:.3f}: the optimised images look as much like the "
                     f"data as the unoptimised ones{probability}.")
    else:
        lower = int((summary.realism_after < summary.realism_before).sum())
        lines.append(f"Realism FELL: {before:.3f} -> {after:.3f} ({lower} of {summary.realism_after.numel()} "
                     f"images lower).")
        pays_for = PAYS_FOR.get(reward, "")
        if gamma > 0 and noise_typical:
            lines.append(
                "Why: DNO moves each image towards what the reward pays for, and the reward pays for some things "
                f"the data does not show{pays_for}. The regulariser (gamma {gamma:g}) kept the optimised noise as "
                f"typical as the start's{probability}; that limits the drift but does not rule it out, since it "
                "bounds the noise, not the image. Without it the drift is usually much larger: compare --gamma 0 "
                "on the same seeds. The held-out experiment (python3 -m demo.alignment, demo/README.md) measures "
                "both against best-of-N.")
        elif gamma > 0:
            lines.append(
                f"Why: the noise left the typical set{probability}: gamma {gamma:g} was too weak against this "
                "reward's pull, and DNO reward-hacked. Raise --gamma (or lower --lr / --opt-steps).")
        else:
            lines.append(
                f"Why: the regulariser is off (--gamma 0), so nothing keeps the noise typical{probability} and DNO "
                "is free to reward-hack: the reward rises by making images unlike the data.")
    return lines


def main(argv: Sequence[str] = None) -> RunSummary:
    """The run on our own model (``--checkpoint`` is handled by :func:`entry`)."""
    args = cli.parse(argv)
    if args.checkpoint is not None:
        raise SystemExit("demo.run_dno.main runs our own model; use entry() (the command line) for --checkpoint")
    objects = (args.model or "objects") == "objects"
    args.reward = args.reward or DEFAULT_REWARD["objects" if objects else "shapes"]
    torch.set_num_threads(args.threads or cli.SHAPES_THREADS)
    samples = args.samples or cli.SHAPES_SAMPLES
    sampling_steps = args.steps or cli.SHAPES_SAMPLING_STEPS
    out = args.out or cli.SHAPES_OUT
    precision = args.precision or "auto"

    from tqdm import tqdm

    from dno.precision import module_dtype, resolve_precision

    settings = run_settings("objects" if objects else "shapes", args.reward)
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
        # the experiment's scale for this reward (its settings were tuned there)
        tuned = settings.pop("guidance")
        guidance = args.guidance if args.guidance is not None else tuned
        what = f"the objects model, prompt {prompt!r}, guidance {guidance:g}"
        dtype = module_dtype(models.unet)
    else:
        from demo.model import load_denoiser
        from demo.realism import load_classifier

        denoiser, classifier = load_denoiser(), load_classifier()
        what = "the shapes model"
        dtype = module_dtype(denoiser)
    warnings = setting_warnings(sampling_steps, guidance if objects else None)
    for line in warnings:
        print(line, flush=True)
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
    for line in verdict(summary, settings["gamma"], args.reward, warnings):
        print(line)
    print(f"wrote {out / 'before_after.png'} (top: unoptimised, bottom: DNO) and {out / 'reward_curve.png'}")
    return summary


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
