"""Train the conditional objects model and its three judges (on a GPU; the CPU works, slowly).

    python -m demo.train_objects --device cuda            # writes demo/weights/objects_*.safetensors

Four networks, each from fresh procedural data every step (``demo.objects``, generated on the
device) with fixed seeds, in this order:

1. ``objects_diffusion``: the class-conditional UNet (v-prediction, cosine VP, as ``demo.model``),
   the label dropped to "no prompt" 10 % of the time so classifier-free guidance works;
2. ``objects_classifier``: the held-out recogniser (``demo.recognise``), its own seeds;
3. ``objects_preference``: the learned reward (``demo.preference``), regressed on
   ``demo.objects.preference`` for prompts that are the image's own half of the time;
4. ``objects_realism``: the realism judge (``demo.realism``) on objects images and their
   corruptions.

Then it samples 16 images of each prompt with the EMA weights (10 ancestral steps) at a few
guidance scales and logs the recogniser's accuracy and the realism of the samples. A run that
reaches ``--time-limit`` saves its state in ``--work`` and exits with status 3; the same
command resumes it (the device tool's calls last at most 10 minutes).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from demo.model import T_MAX, UNet, UNetConfig, WEIGHTS_DIR, GuidedDenoiser, encode, sampling_sigmas, v_target, decode
from demo.objects import COLOURS, NUM_CLASSES, make_objects, preference
from demo.preference import PreferenceNet
from demo.realism import RealismClassifier, corrupt
from demo.recognise import ObjectClassifier
from demo.train import _lr  # the shapes model's schedule: linear warm-up, then cosine to 0

CONFIG = UNetConfig(channels=(32, 64, 128), blocks_per_level=1, attention_at_bottom=True, emb_dim=128,
                    num_classes=NUM_CLASSES)
P_UNCOND = 0.1
# data seeds per network, far from each other and from the seeds tests and the experiment use
SEEDS = {"diffusion": 10_000_000, "classifier": 20_000_000, "preference": 30_000_000, "realism": 40_000_000}
PARTS = ("diffusion", "classifier", "preference", "realism")


def _loaders():
    from demo.model import load_unet
    from demo.preference import load_preference_net
    from demo.realism import load_classifier
    from demo.recognise import load_recogniser
    return {"diffusion": lambda p, d: load_unet(p)[0].to(d), "classifier": load_recogniser,
            "preference": load_preference_net, "realism": load_classifier}


class OutOfTime(Exception):
    pass


class Trainer:
    """The shared loop: lr schedule, clipping, optional EMA, logging, state saved on time-out."""

    def __init__(self, name, model, steps, lr, warmup, args, log, ema_decay=None):
        self.name, self.model, self.steps, self.peak, self.warmup = name, model, steps, lr, warmup
        self.args, self.log = args, log
        self.opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        self.ema = copy.deepcopy(model).requires_grad_(False) if ema_decay else None
        self.ema_decay = ema_decay
        self.step, self.running = 0, None
        self.state_path = args.work / f"{name}_state.pt"
        if self.state_path.is_file():
            state = torch.load(self.state_path, map_location=args.device, weights_only=True)
            model.load_state_dict(state["model"])
            self.opt.load_state_dict(state["opt"])
            if self.ema is not None:
                self.ema.load_state_dict(state["ema"])
            self.step, self.running = int(state["step"]), float(state["running"])
            log(f"{name}: resumed at step {self.step}")

    def save_state(self):
        self.args.work.mkdir(parents=True, exist_ok=True)
        state = {"model": self.model.state_dict(), "opt": self.opt.state_dict(), "step": self.step,
                 "running": self.running if self.running is not None else float("nan")}
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        torch.save(state, self.state_path)

    def run(self, loss_of, deadline: float):
        device = self.args.device
        while self.step < self.steps:
            if time.time() > deadline:
                self.save_state()
                raise OutOfTime(f"{self.name} at step {self.step}/{self.steps}")
            for group in self.opt.param_groups:
                group["lr"] = _lr(self.step, self.steps, self.peak, self.warmup)
            with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16,
                                enabled=torch.device(device).type == "cuda"):
                loss = loss_of(self.step)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.opt.step()
            if self.ema is not None:
                decay = min(self.ema_decay, (1 + self.step) / (10 + self.step))
                with torch.no_grad():
                    for pe, pm in zip(self.ema.parameters(), self.model.parameters()):
                        pe.lerp_(pm, 1 - decay)
            value = float(loss.detach()) if self.step % 25 == 0 or self.step == self.steps - 1 else None
            if value is not None:
                self.running = value if self.running is None else 0.8 * self.running + 0.2 * value
            if self.step % 250 == 0 or self.step == self.steps - 1:
                self.log(f"{self.name} step {self.step:6d}/{self.steps}  loss {value:.4f}  running {self.running:.4f}")
            self.step += 1
        return (self.ema if self.ema is not None else self.model).eval()


def diffusion_loss(model: UNet, batch: int, device, seed0: int):
    gen = torch.Generator(device=device).manual_seed(seed0 - 1)

    def loss_of(step):
        data = make_objects(seed0 + step, batch, device=device)
        x0 = encode(data.images)
        t = torch.rand(batch, generator=gen, device=device) * T_MAX
        eps = torch.randn(x0.shape, generator=gen, device=device)
        drop = torch.rand(batch, generator=gen, device=device) < P_UNCOND
        labels = torch.where(drop, torch.full_like(data.labels, NUM_CLASSES), data.labels)
        alpha = torch.cos(t * math.pi / 2)[:, None, None, None]
        s = torch.sin(t * math.pi / 2)[:, None, None, None]
        return (model(alpha * x0 + s * eps, t, labels).float() - v_target(x0, eps, t)).pow(2).mean()
    return loss_of


def augment(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Mild noise on half the batch: the judges see the small deviations samples have."""
    n = images.shape[0]
    amount = torch.rand(n, 1, 1, 1, generator=gen, device=images.device) * 0.04
    amount = amount * (torch.rand(n, 1, 1, 1, generator=gen, device=images.device) < 0.5)
    return (images + amount * torch.randn(images.shape, generator=gen, device=images.device)).clamp(0, 1)


def classifier_loss(model: ObjectClassifier, batch: int, device, seed0: int):
    gen = torch.Generator(device=device).manual_seed(seed0 - 1)

    def loss_of(step):
        data = make_objects(seed0 + step, batch, device=device)
        return F.cross_entropy(model(augment(data.images, gen)).float(), data.labels)
    return loss_of


def preference_loss(model: PreferenceNet, batch: int, device, seed0: int):
    gen = torch.Generator(device=device).manual_seed(seed0 - 1)
    c = len(COLOURS)

    def loss_of(step):
        data = make_objects(seed0 + step, batch, device=device)
        # the prompt: the image's own half the time, one attribute changed a quarter, any the rest
        u = torch.rand(batch, generator=gen, device=device)
        other_kind = ((data.labels // c + torch.randint(1, 4, (batch,), generator=gen, device=device)) % 4) * c \
            + data.labels % c
        other_colour = (data.labels // c) * c + (data.labels % c + torch.randint(1, c, (batch,), generator=gen,
                                                                                  device=device)) % c
        one_changed = torch.where(torch.rand(batch, generator=gen, device=device) < 0.5, other_kind, other_colour)
        random = torch.randint(0, NUM_CLASSES, (batch,), generator=gen, device=device)
        prompts = torch.where(u < 0.5, data.labels, torch.where(u < 0.75, one_changed, random))
        target = preference(data, prompts)
        return (model(augment(data.images, gen), prompts).float() - target).pow(2).mean()
    return loss_of


def realism_loss(model: RealismClassifier, batch: int, device, seed0: int):
    gen = torch.Generator(device=device).manual_seed(seed0 - 1)

    def loss_of(step):
        real = make_objects(seed0 + 2 * step, batch, device=device).images
        fake = corrupt(make_objects(seed0 + 2 * step + 1, batch, device=device).images, gen)
        labels = torch.cat([torch.ones(batch, device=device), torch.zeros(batch, device=device)])
        return F.binary_cross_entropy_with_logits(model(torch.cat([real, fake])).float(), labels)
    return loss_of


@torch.no_grad()
def evaluate(unet: UNet, recogniser, realism_judge, preference_net, device, log, guidances=(1.0, 2.0, 3.0, 4.0),
             per_prompt: int = 16):
    """Recogniser accuracy, realism and preference of ``per_prompt`` samples per prompt, per guidance scale."""
    from dno import DNONoise, VP, sample

    labels = torch.arange(NUM_CLASSES, device=device).repeat_interleave(per_prompt)
    sigmas = sampling_sigmas(10)
    noise = DNONoise.from_seed((labels.numel(), 3, 32, 32), 10, seed=123, sde=True, device=device)
    data = make_objects(777, labels.numel(), labels=labels, device=device)
    results = {"dataset": {"accuracy": float((recogniser(data.images).argmax(1) == labels).float().mean()),
                           "realism": float(torch.sigmoid(realism_judge(data.images)).mean()),
                           "preference": float(preference_net(data.images, labels).mean()),
                           "preference_label": float(preference(data, labels).mean())}}
    for g in guidances:
        den = GuidedDenoiser(unet, labels, g).to(device)
        images = decode(sample(den, noise, sigmas.to(device), VP, eta=1.0)).clamp(0, 1)
        results[f"guidance {g}"] = {
            "accuracy": float((recogniser(images).argmax(1) == labels).float().mean()),
            "realism": float(torch.sigmoid(realism_judge(images)).mean()),
            "preference": float(preference_net(images, labels).mean())}
    for k, v in results.items():
        log(f"eval {k}: " + ", ".join(f"{a} {b:.3f}" for a, b in v.items()))
    return results


def _save(model: torch.nn.Module, path: Path, metadata: dict) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().to(torch.float16).cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={k: str(v) for k, v in metadata.items()})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--diffusion-steps", type=int, default=12000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--judge-steps", type=int, default=3000, help="steps of each of the three judges")
    parser.add_argument("--guidance", type=float, default=3.0, help="guidance scale stored as the model's default")
    parser.add_argument("--out", type=Path, default=WEIGHTS_DIR)
    parser.add_argument("--work", type=Path, default=Path("outputs/train_objects"),
                        help="training state, for resuming after --time-limit")
    parser.add_argument("--time-limit", type=float, default=1e9, help="seconds before saving the state and exiting (3)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eval-per-prompt", type=int, default=16, help="samples per prompt in the final evaluation")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS),
                        help="train only these (the others are read from --out for the evaluation)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    deadline = time.time() + args.time_limit
    log_path = args.work / "training_log_objects.txt"
    lines = log_path.read_text().splitlines() if log_path.is_file() else []

    def log(msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        lines.append(line)
        log_path.write_text("\n".join(lines) + "\n")

    command = "python -m demo.train_objects " + " ".join(sys.argv[1:] if argv is None else argv)
    machine = (f"{platform.machine()} {torch.cuda.get_device_name(0) if args.device.startswith('cuda') else 'cpu'} "
               f"torch={torch.__version__}")
    common = {"command": command, "machine": machine,
              "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")}
    log(f"start: {command} on {machine}")
    device = args.device
    torch.manual_seed(0)
    builds = {
        "diffusion": (lambda: UNet(CONFIG), diffusion_loss, args.diffusion_steps, args.lr, 200, 0.9995),
        "classifier": (lambda: ObjectClassifier(32), classifier_loss, args.judge_steps, 2e-3, 100, None),
        "preference": (lambda: PreferenceNet(32), preference_loss, args.judge_steps, 1e-3, 100, None),
        "realism": (lambda: RealismClassifier(32), realism_loss, args.judge_steps, 1e-3, 100, None),
    }
    files = {"diffusion": "objects_diffusion", "classifier": "objects_classifier",
             "preference": "objects_preference", "realism": "objects_realism"}
    trained = {}
    loaders = _loaders()
    try:
        for part in PARTS:
            path = args.out / f"{files[part]}.safetensors"
            if part not in args.parts:
                trained[part] = loaders[part](path, device)
                continue
            make, loss, steps, lr, warmup, ema = builds[part]
            torch.manual_seed(PARTS.index(part))
            model = make().to(device)
            trainer = Trainer(part, model, steps, lr, warmup, args, log, ema_decay=ema)
            if trainer.step >= steps and path.is_file():
                log(f"{part}: done before")
            start = time.time()
            net = trainer.run(loss(model, args.batch if part != "realism" else args.batch // 2, device, SEEDS[part]),
                              deadline)
            seconds = time.time() - start
            meta = {**common, "steps": steps, "batch": args.batch, "lr": lr,
                    "final_running_loss": f"{trainer.running:.4f}", "train_seconds_last_call": f"{seconds:.0f}"}
            if part == "diffusion":
                meta.update(unet_config=CONFIG.to_json(), prediction="v", schedule="cosine VP, sigma=tan(pi/2 t)",
                            guidance=args.guidance, p_uncond=P_UNCOND)
            else:
                meta.update(width=32)
            _save(net, path, meta)
            trainer.save_state()
            trained[part] = net
            log(f"{part}: saved {path} ({seconds:.0f} s this call)")
    except OutOfTime as stop:
        log(f"out of time ({stop}); state saved in {args.work}: run the same command again to resume")
        return 3
    results = evaluate(trained["diffusion"], trained["classifier"], trained["realism"], trained["preference"],
                       device, log, per_prompt=args.eval_per_prompt)
    (args.work / "evaluation.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "training_log_objects.txt").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
