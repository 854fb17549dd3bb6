"""The paper's main experiment in miniature, on the objects model and a learned reward.

    python -m demo.alignment                       # held-out cases, CPU, writes outputs/alignment/
    python -m demo.alignment --cases tuning        # the cases the settings were tuned on

For each reward (the learned ``preference``, ``brightness`` and the non-differentiable JPEG
size) and 8 held-out (prompt, seed) cases, at equal denoiser evaluations per image:

* **DNO, gamma = 0** and **DNO, gamma > 0** (the probability regulariser on): ``dno.optimize``
  from the case's noise (x_T and every per-step noise of 10 ancestral steps), exact autograd for
  the differentiable rewards, the hybrid estimator for JPEG;
* **best-of-N**: N independent samples of the prompt (the first is the case's own), the best kept;
* **zeroth-order search**: ``dno.optimize(method="zeroth_order")`` with the same regulariser,
  q perturbed renders per update: the reward's gradient estimated from rewards alone.

A denoiser evaluation is one guided call per image (two UNet passes, batched), counted by
wrapping the denoiser; DNO's backward passes through the sampler come on top and are counted
separately. Measures, before (the case's unoptimised sample) and after: the reward, the realism
judge (``demo.realism``), the model's own denoising error, the held-out recogniser's accuracy,
the kernel distance (KID) of the set from dataset images of the same prompts in the
recogniser's feature space, and the noise probability P of the paper (the product of the
regulariser's block mean and covariance bounds; ~1 for typical noise). Every number is a mean
over the 8 cases with its standard error.

Writes ``results.json``, ``tables.md`` (what ``demo/README.md`` shows), a before/after grid and
a reward-vs-evaluations figure per reward. ``tests/test_alignment_experiment.py`` runs it and
checks the claims and that the README's tables match the fresh run.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from demo.experiment import CountingDenoiser, dno_run, make_reward as make_pixel_reward, seed_noise
from demo.experiment import noise_probability as experiment_noise_probability
from demo.model import GuidedDenoiser, OBJECTS_WEIGHTS, decode, load_unet, sampling_sigmas
from demo.objects import PROMPTS, make_objects
from demo.preference import PreferenceReward, load_preference_net
from demo.realism import denoising_error, load_classifier, realism
from demo.recognise import features, kernel_distance, load_recogniser
# the experiment's settings, tuned on TUNING; the demo command runs with them too (demo/settings.py)
from demo.settings import SETTINGS, Setting  # noqa: F401  (Setting: bench/tune_alignment.py builds its grid)

WEIGHTS = OBJECTS_WEIGHTS.parent
REALISM_WEIGHTS = WEIGHTS / "objects_realism.safetensors"
SAMPLING_STEPS = 10
# (prompt label, seed): each colour and each kind twice; the settings were tuned on TUNING only
HELD_OUT = [(0, 1000), (5, 1001), (10, 1002), (15, 1003), (3, 1004), (6, 1005), (9, 1006), (12, 1007)]
TUNING = [(1, 0), (4, 1), (11, 2), (14, 3), (2, 4), (7, 5), (8, 6), (13, 7)]
CASES = {"held_out": HELD_OUT, "tuning": TUNING}
REWARDS = ("preference", "preference_sde", "brightness", "jpeg_incompressibility")   # experiments
METHODS = ("unoptimised", "dno_gamma0", "dno", "best_of_n", "zeroth_order")
REFERENCE_PER_PROMPT = 32       # dataset images per prompt for the kernel distance
REFERENCE_SEED = 555


@dataclass
class Models:
    unet: torch.nn.Module
    guidance: float
    realism: torch.nn.Module
    recogniser: torch.nn.Module
    preference: torch.nn.Module
    device: torch.device

    def denoiser(self, labels: torch.Tensor, guidance: Optional[float] = None) -> GuidedDenoiser:
        scale = self.guidance if guidance is None else guidance
        return GuidedDenoiser(self.unet, labels, scale).to(self.device)


def load_models(device: str = "cpu") -> Models:
    unet, meta = load_unet(OBJECTS_WEIGHTS, "objects diffusion")
    return Models(unet.to(device), float(meta.get("guidance", 3.0)), load_classifier(REALISM_WEIGHTS, device),
                  load_recogniser(device=device), load_preference_net(device=device), torch.device(device))


def make_reward(name: str, models: Models):
    if name == "preference":
        return PreferenceReward(models.preference)
    return make_pixel_reward(name)


@dataclass
class MethodResult:
    """Per case (8 each) and per run: what one method did to the cases."""
    reward: List[float]
    images: torch.Tensor                # (B, 3, H, W) in [0, 1]
    probability: List[float]            # P of the noise behind each image
    evaluations_per_image: float        # guided denoiser calls per image
    backward_per_image: float           # backward passes through the sampler per image
    seconds: float
    curve: List[Tuple[float, float]] = field(default_factory=list)   # (evaluations/img, mean best reward)


def case_noise(cases: Sequence[Tuple[int, int]], device):
    return seed_noise([s for _, s in cases], SAMPLING_STEPS, device)


def noise_probability(noise, eta: float = 1.0) -> List[float]:
    """The paper's P of each sample's optimisable noise (x_T and the steps that inject noise)."""
    return experiment_noise_probability(noise, sampling_sigmas(SAMPLING_STEPS), eta).tolist()


def run_optimiser(models: Models, reward, cases, setting: Setting, method: str, precision: str = "fp32") -> MethodResult:
    """DNO (gamma 0 or > 0) or zeroth-order search from the cases' own noise."""
    from dno import DNOConfig, ProbabilityRegularizer, VP, optimize

    labels = torch.tensor([p for p, _ in cases])
    prompts = [PROMPTS[p] for p, _ in cases]
    counting = CountingDenoiser(models.denoiser(labels, setting.guidance))
    sigmas = sampling_sigmas(SAMPLING_STEPS).to(models.device)
    if method == "zeroth_order":
        # equal evaluations: zeroth-order renders 1 + zo_q per update and one more sample at the end
        steps = max(1, round((dno_render_count(reward, setting) - 1) / (1 + setting.zo_q)))
        config = DNOConfig(steps=steps, lr=setting.zo_lr, method="zeroth_order", q=setting.zo_q, mu=setting.mu,
                           checkpoint=False, estimator_batch=max(1, setting.zo_q // 2), precision=precision)
        gamma = setting.gamma
    else:
        config = DNOConfig(steps=setting.steps, lr=setting.lr, method="auto", q=setting.q, mu=setting.mu,
                           checkpoint=False, estimator_batch=max(1, setting.q // 2), precision=precision)
        gamma = 0.0 if method == "dno_gamma0" else setting.gamma
    regularizer = ProbabilityRegularizer(gamma=gamma, k=1, permutations=8) if gamma > 0 else None
    curve = []

    def on_step(info):
        curve.append((counting.image_evaluations / len(cases), float(info.best_reward.float().mean())))

    start = time.time()
    result = optimize(counting, sigmas, reward, decode, noise=case_noise(cases, models.device), schedule=VP,
                      eta=setting.eta, config=config, regularizer=regularizer, prompts=prompts, callback=on_step)
    seconds = time.time() - start
    updates = len(result.history) - 1
    backward = 0 if method == "zeroth_order" else updates
    return MethodResult([float(r) for r in result.best_reward.float().cpu()], result.image.clamp(0, 1).cpu(),
                        noise_probability(result.noise, setting.eta), counting.image_evaluations / len(cases), backward,
                        seconds, curve)


def dno_on_prompt(models: Models, reward_name: str, label: int, seeds: Sequence[int], steps: int, lr: float,
                  gamma: float, mu: float = 0.01, q: int = 8, eta: float = 1.0, guidance: Optional[float] = None,
                  sampling_steps: int = SAMPLING_STEPS, precision: str = "fp32", callback=None):
    """The demo command's run: DNO on one prompt from one noise per seed, with its measures
    (``demo.experiment.dno_run``, as the shapes model's run, on the guided objects model)."""
    labels = torch.full((len(seeds),), int(label), dtype=torch.long)
    return dno_run(models.denoiser(labels, guidance), models.realism, make_reward(reward_name, models), seeds,
                   gamma=gamma, steps=steps, lr=lr, sampling_steps=sampling_steps, q=q, mu=mu, permutations=8,
                   precision=precision, callback=callback, prompts=[PROMPTS[int(label)]] * len(seeds), eta=eta,
                   measuring_denoiser=models.denoiser(labels, guidance=1.0), device=models.device)


def dno_render_count(reward, setting: Setting) -> int:
    """Renders per image DNO makes in ``setting.steps`` updates (each update's sample is scored,
    the hybrid estimator renders q more per update)."""
    hybrid = not getattr(reward, "differentiable", True)
    return setting.steps + 1 + (setting.q * setting.steps if hybrid else 0)


@torch.no_grad()
def run_best_of_n(models: Models, reward, cases, n: int, seed_stride: int = 100_000, eta: float = 1.0,
                  guidance: Optional[float] = None) -> MethodResult:
    """Best of ``n`` independent samples per case; the first is the case's own unoptimised one."""
    from dno import DNONoise, VP, sample

    sigmas = sampling_sigmas(SAMPLING_STEPS).to(models.device)
    start = time.time()
    best_r, best_img, best_p, evaluations = [], [], [], 0
    running = [[] for _ in range(n)]
    for label, seed in cases:
        counting = CountingDenoiser(models.denoiser(torch.tensor([label]), guidance))
        rewards, images, noises = [], [], []
        for chunk in range(0, n, 32):
            m = min(32, n - chunk)
            noise = seed_noise([int(seed) if j == 0 else int(seed) + seed_stride * j for j in range(chunk, chunk + m)],
                               SAMPLING_STEPS, models.device)
            image = decode(sample(counting, noise, sigmas, VP, eta=eta)).clamp(0, 1)
            rewards.append(reward(image, [PROMPTS[label]] * m).float().cpu())
            images.append(image.cpu())
            noises.append(noise)
        rewards, images = torch.cat(rewards), torch.cat(images)
        k = int(rewards.argmax())
        best_r.append(float(rewards[k])), best_img.append(images[k])
        chosen = noises[k // 32]
        best_p.append(noise_probability(DNONoise(chosen.x_T[k % 32:k % 32 + 1], chosen.steps[:, k % 32:k % 32 + 1]),
                                        eta)[0])
        for j in range(n):
            running[j].append(float(rewards[:j + 1].max()))
        evaluations += counting.image_evaluations
    curve = [((j + 1) * SAMPLING_STEPS, sum(r) / len(r)) for j, r in enumerate(running)]
    return MethodResult(best_r, torch.stack(best_img), best_p, evaluations / len(cases), 0, time.time() - start, curve)


@torch.no_grad()
def run_unoptimised(models: Models, reward, cases, eta: float = 1.0, guidance: Optional[float] = None) -> MethodResult:
    from dno import VP, sample

    labels = torch.tensor([p for p, _ in cases])
    counting = CountingDenoiser(models.denoiser(labels, guidance))
    noise = case_noise(cases, models.device)
    start = time.time()
    image = decode(sample(counting, noise, sampling_sigmas(SAMPLING_STEPS).to(models.device), VP, eta=eta)).clamp(0, 1)
    scores = reward(image, [PROMPTS[p] for p, _ in cases]).float().cpu()
    return MethodResult([float(r) for r in scores], image.cpu(), noise_probability(noise, eta),
                        counting.image_evaluations / len(cases), 0, time.time() - start)


@torch.no_grad()
def measures(models: Models, images: torch.Tensor, cases, reference_features: torch.Tensor) -> Dict[str, object]:
    """Per-image realism, denoising error and recognition, and the set's kernel distance."""
    labels = torch.tensor([p for p, _ in cases])
    images = images.to(models.device)
    own = models.denoiser(labels, guidance=1.0)     # the model's own conditional prediction
    return {
        "realism": [float(v) for v in realism(images, models.realism).cpu()],
        "denoise_err": [float(v) for v in denoising_error(images, own).cpu()],
        "recognised": [float(v) for v in (models.recogniser(images).argmax(1).cpu() == labels).float()],
        "kid": kernel_distance(features(images, models.recogniser).cpu(), reference_features),
    }


def reference_features(models: Models, cases) -> torch.Tensor:
    labels = torch.tensor([p for p, _ in cases]).repeat_interleave(REFERENCE_PER_PROMPT)
    data = make_objects(REFERENCE_SEED, labels.numel(), labels=labels)
    return features(data.images.to(models.device), models.recogniser).cpu()


def run_reward(models: Models, name: str, cases, setting: Setting, log=print) -> Dict[str, dict]:
    """Every method on one reward; a dict per method of per-case values and run facts."""
    reward = make_reward(setting.reward or name, models)
    ref = reference_features(models, cases)
    runs = {"unoptimised": run_unoptimised(models, reward, cases, setting.eta, setting.guidance)}
    for method in ("dno_gamma0", "dno", "zeroth_order"):
        runs[method] = run_optimiser(models, reward, cases, setting, method)
        log(f"  {name} {method}: reward {mean(runs[method].reward):.3f}, {runs[method].seconds:.0f} s")
    n = round(runs["dno"].evaluations_per_image / SAMPLING_STEPS)
    runs["best_of_n"] = run_best_of_n(models, reward, cases, n, eta=setting.eta, guidance=setting.guidance)
    out = {}
    for method in METHODS:
        r = runs[method]
        out[method] = {"reward": r.reward, "probability": r.probability,
                       "evaluations_per_image": r.evaluations_per_image, "backward_per_image": r.backward_per_image,
                       "seconds": r.seconds, "curve": r.curve, **measures(models, r.images, cases, ref)}
        out[method]["images"] = r.images
    out["best_of_n"]["n"] = n
    return out


def mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values))


def standard_error(values: Sequence[float]) -> float:
    m = mean(values)
    if len(values) < 2:
        return 0.0
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1) / len(values))


LABELS = {"unoptimised": "unoptimised", "dno_gamma0": "DNO, gamma = 0", "dno": "DNO, gamma = {gamma:g}",
          "best_of_n": "best-of-{n}", "zeroth_order": "zeroth-order search, q = {zo_q}"}
COLUMNS = (("reward", "reward", 3), ("realism", "realism", 3), ("denoise_err", "denoise err", 4),
           ("recognised", "recognised", 2), ("kid", "feature MMD", 3), ("probability", "P", 2))


def method_label(method: str, setting: Setting, runs: dict) -> str:
    return LABELS[method].format(gamma=setting.gamma, n=runs["best_of_n"].get("n", 0), zo_q=setting.zo_q)


def table(name: str, setting: Setting, runs: dict) -> str:
    """The markdown table of one reward: mean +- standard error over the cases."""
    head = "| method | evals/img | backward/img | " + " | ".join(c[1] for c in COLUMNS) + " |"
    lines = [head, "|" + "---|" * (3 + len(COLUMNS))]
    for method in METHODS:
        r = runs[method]
        cells = []
        for key, _, digits in COLUMNS:
            value = r[key]
            if isinstance(value, list):
                cells.append(f"{mean(value):.{digits}f} ± {standard_error(value):.{digits}f}")
            else:
                cells.append(f"{value:.{digits}f}")
        lines.append(f"| {method_label(method, setting, runs)} | {r['evaluations_per_image']:.0f} | "
                     f"{r['backward_per_image']:.0f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def save_grid(runs: dict, path: Path, scale: int = 3) -> None:
    import torchvision

    rows = torch.cat([runs[m]["images"] for m in METHODS]).clamp(0, 1)
    rows = torch.nn.functional.interpolate(rows, scale_factor=scale, mode="nearest")
    torchvision.utils.save_image(rows, str(path), nrow=runs["unoptimised"]["images"].shape[0], padding=2, pad_value=1.0)


def save_curves(results: dict, settings: Dict[str, Setting], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 3.3), dpi=110)
    for ax, (name, runs) in zip(list(axes) if len(results) > 1 else [axes], results.items()):
        for method in ("dno_gamma0", "dno", "best_of_n", "zeroth_order"):
            xs, ys = zip(*runs[method]["curve"])
            ax.plot(xs, ys, label=method_label(method, settings[name], runs))
        ax.set_xlabel("denoiser evaluations per image")
        ax.set_ylabel(f"best {name} so far (mean of 8)")
        ax.set_title(name, fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(str(path))
    plt.close(fig)


def run(cases_name: str = "held_out", rewards: Sequence[str] = REWARDS, out: Path = Path("outputs/alignment"),
        device: str = "cpu", settings: Optional[Dict[str, Setting]] = None, log=print, figures: bool = True) -> dict:
    cases = CASES[cases_name]
    settings = dict(SETTINGS, **(settings or {}))
    models = load_models(device)
    out.mkdir(parents=True, exist_ok=True)
    results, texts = {}, []
    for name in rewards:
        start = time.time()
        log(f"{name}: {len(cases)} {cases_name} cases, {settings[name]}")
        runs = run_reward(models, name, cases, settings[name], log)
        results[name] = runs
        texts.append(f"#### {name}\n\n{table(name, settings[name], runs)}\n")
        if figures:
            save_grid(runs, out / f"grid_{name}.png")
        log(f"{name}: {time.time() - start:.0f} s\n{table(name, settings[name], runs)}")
    if figures:
        save_curves(results, settings, out / "reward_curves.png")
    (out / "tables.md").write_text("\n".join(texts))
    serialisable = {name: {m: {k: v for k, v in r.items() if k != "images"} for m, r in runs.items()}
                    for name, runs in results.items()}
    (out / "results.json").write_text(json.dumps({"cases": cases, "settings": {k: asdict(settings[k]) for k in rewards},
                                                  "device": device, "torch": torch.__version__,
                                                  "results": serialisable}, indent=1) + "\n")
    return results


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", choices=sorted(CASES), default="held_out")
    parser.add_argument("--rewards", nargs="+", choices=REWARDS, default=list(REWARDS))
    parser.add_argument("--out", type=Path, default=Path("outputs/alignment"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    run(args.cases, args.rewards, args.out, args.device)


if __name__ == "__main__":
    main()
