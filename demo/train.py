"""Train the demo's shapes diffusion model and its realism classifier, on the CPU.

    nice python -m demo.train            # writes demo/weights/*.safetensors (+ training log)

Deterministic (fixed seeds, fixed step counts, fresh procedural data every step),
designed to finish in under 15 minutes on 2 CPU cores. The weights are stored in
fp16 (about 2.5 MB for the model) with the config, command and timing in the
safetensors metadata, so tests and the demo never retrain.
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

from demo.model import T_MAX, UNet, UNetConfig, WEIGHTS_DIR, encode, v_target
from demo.realism import RealismClassifier, corrupt
from demo.shapes import make_batch

DATA_SEED_OFFSET = 1_000_000  # training batches use seeds >= this; tests use small seeds


def _lr(step: int, total: int, peak: float, warmup: int = 50) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train_diffusion(steps: int, batch: int, lr: float, config: UNetConfig, log, device: str = "cpu") -> tuple[UNet, float]:
    torch.manual_seed(0)
    model = UNet(config).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(1)
    running = None
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = _lr(step, steps, lr)
        x0 = encode(make_batch(DATA_SEED_OFFSET + step, batch))
        t = torch.rand(batch, generator=gen) * T_MAX
        eps = torch.randn(x0.shape, generator=gen)
        x0, t, eps = x0.to(device), t.to(device), eps.to(device)
        alpha = torch.cos(t * math.pi / 2)[:, None, None, None]
        s = torch.sin(t * math.pi / 2)[:, None, None, None]
        loss = (model(alpha * x0 + s * eps, t) - v_target(x0, eps, t)).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        decay = min(0.995, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - decay)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 50 == 0 or step == steps - 1:
            log(f"diffusion step {step:5d}/{steps}  loss {loss.item():.4f}  running {running:.4f}")
    return ema.cpu(), running


def train_classifier(steps: int, batch: int, lr: float, width: int, log) -> tuple[RealismClassifier, float]:
    torch.manual_seed(2)
    model = RealismClassifier(width)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(3)
    running = None
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = _lr(step, steps, lr, warmup=20)
        real = make_batch(2 * DATA_SEED_OFFSET + step, batch)
        fake = corrupt(make_batch(3 * DATA_SEED_OFFSET + step, batch), gen)
        logits = model(torch.cat([real, fake]))
        labels = torch.cat([torch.ones(batch), torch.zeros(batch)])
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if step % 50 == 0 or step == steps - 1:
            log(f"classifier step {step:5d}/{steps}  loss {loss.item():.4f}  running {running:.4f}")
    return model.eval(), running


def _save(model: torch.nn.Module, path: Path, metadata: dict) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={k: str(v) for k, v in metadata.items()})


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=900, help="diffusion training steps")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--classifier-steps", type=int, default=600)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--part", choices=("both", "diffusion", "classifier"), default="both",
                        help="train only one of the two models (the other file is left as it is)")
    parser.add_argument("--out", type=Path, default=WEIGHTS_DIR)
    parser.add_argument("--device", default="cpu", help="cpu (the committed weights) or cuda (only for experiments)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python -m demo.train " + " ".join(sys.argv[1:] if argv is None else argv)
    log_lines = []

    def log(msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        log_lines.append(line)

    config = UNetConfig()
    common = {
        "command": command,
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.machine()} {platform.processor() or ''} threads={args.threads} torch={torch.__version__}",
    }
    summary = dict(common)
    if args.part in ("both", "diffusion"):
        start = time.time()
        unet, diff_loss = train_diffusion(args.steps, args.batch, args.lr, config, log, args.device)
        diff_time = time.time() - start
        _save(unet, args.out / "shapes_diffusion.safetensors",
              {**common, "unet_config": config.to_json(), "prediction": "v",
               "schedule": "cosine VP, sigma=tan(pi/2 t)", "steps": args.steps, "batch": args.batch,
               "lr": args.lr, "final_running_loss": f"{diff_loss:.4f}", "train_seconds": f"{diff_time:.0f}"})
        summary.update(diffusion_final_running_loss=round(diff_loss, 4), diffusion_seconds=round(diff_time))
    if args.part in ("both", "classifier"):
        start = time.time()
        clf, clf_loss = train_classifier(args.classifier_steps, 64, 1e-3, 32, log)
        clf_time = time.time() - start
        _save(clf, args.out / "realism_classifier.safetensors",
              {**common, "width": 32, "steps": args.classifier_steps, "final_running_loss": f"{clf_loss:.4f}",
               "train_seconds": f"{clf_time:.0f}"})
        summary.update(classifier_final_running_loss=round(clf_loss, 4), classifier_seconds=round(clf_time))
    (args.out / f"training_log_{args.part}.txt").write_text("\n".join(log_lines) + "\n" + json.dumps(summary, indent=2) + "\n")
    log(f"done: {json.dumps(summary)}")


if __name__ == "__main__":
    main()
