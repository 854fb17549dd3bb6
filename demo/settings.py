"""The demo's run settings, in one place: what ``python3 -m demo.run_dno`` runs with and what its
``--help`` says it runs with (``demo/cli.py`` writes the help from these tables, ``demo/run_dno.py``
reads them for the run; ``tests/test_demo_cli.py`` checks the two agree).

Standard library only, so ``--help`` stays instant.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, List, Tuple

SHAPES_REWARDS = ("brightness", "darkness", "saturation", "contrast", "jpeg_incompressibility",
                  "jpeg_compressibility")
# the objects model (the default) also has the learned reward, scored against the prompt
OBJECTS_REWARDS = ("preference",) + SHAPES_REWARDS
MODELS = ("objects", "shapes")
DEFAULT_MODEL = "objects"
DEFAULT_REWARD = {"objects": "preference", "shapes": "brightness"}

# Sampling steps the demo models were trained to be sampled with and evaluated at
# (demo/weights/README.md, demo.train_objects' evaluation, tests/test_objects_model.py): 10.
# Fewer steps give blurrier, less typical images; at 1 step the sample is the model's mean guess
# from pure noise (realism ~0.01 on the objects model, ~0.2 on the shapes model, against ~0.83 and
# ~0.61 at 10 steps, 32 samples each). The demo warns below this.
SAMPLING_STEPS = 10
# Guidance scales the objects model was evaluated at (demo/weights/README.md's table: 1 to 4).
GUIDANCE_RANGE = (1.0, 4.0)


@dataclass(frozen=True)
class Setting:
    steps: int                  # DNO updates
    lr: float
    gamma: float                # the regulariser's weight for "dno" and "zeroth_order"
    mu: float = 0.01            # perturbation scale of the hybrid / zeroth-order estimators
    q: int = 8                  # perturbed renders per update of the hybrid estimator
    zo_q: int = 4               # ... of zeroth-order search (its steps follow from equal evaluations)
    zo_lr: float = 0.02
    eta: float = 1.0            # 1: ancestral sampling (x_T and every step's noise optimised); 0: ODE (x_T only)
    reward: str = ""            # the reward, when the experiment's name is not it
    guidance: float = 3.0       # CFG scale the settings were tuned at (the model's default is 4)


# The objects model's experiment (demo.alignment), tuned on its TUNING cases
# (bench/results/2026-12-03-h200-alignment-tuning.jsonl and the CPU runs the README names). The
# learned reward runs the ODE sampler (x_T only): with ancestral sampling every step injects pixel
# noise, and DNO hacks the learned reward with noise that stays typical, which no regulariser of
# the noise can see ("preference_sde" shows it). The demo command runs each reward with these.
SETTINGS = {
    "preference": Setting(steps=20, lr=0.03, gamma=10.0, eta=0.0),
    "preference_sde": Setting(steps=20, lr=0.01, gamma=10.0, reward="preference"),
    "brightness": Setting(steps=20, lr=0.01, gamma=10.0),
    "jpeg_incompressibility": Setting(steps=12, lr=0.02, gamma=1000.0, mu=0.05, q=8, zo_q=8),
}
# the objects model's rewards the experiment has no setting for
OBJECTS_FALLBACK = Setting(steps=20, lr=0.01, gamma=10.0, mu=0.05)

# The shapes model's settings (the acceptance test, tests/test_demo_alignment.py, checks them).
# JPEG uses the hybrid estimator, whose image-space estimate has norm 2 per sample (less the guard) as in the
# official code (dno/gradients.py): about 9x the unnormalised estimate's 0.15-0.3 on this model,
# so its pull on the noise is always clipped to norm 1 and gamma weighs the regulariser against
# that (gamma 10 before the normalisation, 100 now). Adam's step follows lr, not the gradient's scale.
SHAPES_SETTINGS = {
    "brightness": dict(steps=20, lr=0.01, gamma=10.0, mu=0.01, q=8),
    "jpeg_incompressibility": dict(steps=12, lr=0.02, gamma=100.0, mu=0.05, q=8),
}
SHAPES_FALLBACK = dict(steps=20, lr=0.01, gamma=10.0, mu=0.05, q=8)

RUN_KEYS = ("steps", "lr", "gamma", "mu", "q", "eta", "guidance")


def run_settings(model: str, reward: str) -> dict:
    """What a demo run of ``model`` on ``reward`` uses unless a flag says otherwise: DNO steps,
    lr, gamma, mu, q, eta, and for the objects model the guidance scale."""
    if model == "objects":
        setting = asdict(SETTINGS.get(reward, OBJECTS_FALLBACK))
        return {k: v for k, v in setting.items() if k in RUN_KEYS}
    return dict(SHAPES_SETTINGS.get(reward, SHAPES_FALLBACK))


def _number(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _per_reward(model: str, key: str) -> List[Tuple[str, List[str]]]:
    """(value, rewards) pairs of one setting over ``model``'s rewards, the most common value last."""
    rewards = OBJECTS_REWARDS if model == "objects" else SHAPES_REWARDS
    groups: Dict[str, List[str]] = {}
    for reward in rewards:
        groups.setdefault(_number(run_settings(model, reward)[key]), []).append(reward)
    return sorted(groups.items(), key=lambda item: len(item[1]))


def default_text(key: str, models=MODELS) -> str:
    """The default of one run setting as ``--help`` states it, e.g. "objects model: 0.03 for
    preference, 0.02 for jpeg_incompressibility, 0.01 for the others; shapes model: ..."."""
    parts = []
    for model in models:
        groups = _per_reward(model, key)
        listed = [f"{value} for {', '.join(rewards)}" for value, rewards in groups[:-1]]
        parts.append(", ".join(listed + [f"{groups[-1][0]} for the others" if listed else groups[-1][0]]))
    if len(models) == 1:
        return parts[0]
    if len(set(parts)) == 1:
        return f"{parts[0]}, both models"
    return "; ".join(f"{model} model: {text}" for model, text in zip(models, parts))
