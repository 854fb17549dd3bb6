"""Tune demo.alignment's settings on its tuning cases (never the held-out ones): one line per setting.

    python3 bench/tune_alignment.py --device cuda --out DIR     # prints and writes DIR/tune.jsonl

Each line: the reward, the setting, and per method the mean reward, realism, KID and P.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from demo import alignment as A  # noqa: E402

GRID = {
    "preference": dict(steps=[20, 30], lr=[0.01, 0.02, 0.04], gamma=[1.0, 10.0, 100.0]),
    "brightness": dict(steps=[20], lr=[0.01, 0.02], gamma=[10.0, 100.0]),
    "jpeg_incompressibility": dict(steps=[12], lr=[0.02, 0.03], gamma=[100.0, 1000.0]),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path, default=Path("outputs/tune"))
    parser.add_argument("--rewards", nargs="+", default=list(GRID))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    lines = args.out / "tune.jsonl"
    for name in args.rewards:
        grid = GRID[name]
        for steps, lr, gamma in itertools.product(grid["steps"], grid["lr"], grid["gamma"]):
            base = A.SETTINGS[name]
            setting = A.Setting(**{**A.asdict(base), "steps": steps, "lr": lr, "gamma": gamma})
            start = time.time()
            results = A.run("tuning", [name], args.out / f"{name}-{steps}-{lr}-{gamma}", args.device,
                            settings={name: setting}, log=lambda *a: None, figures=False)
            runs = results[name]
            row = {"reward": name, "setting": A.asdict(setting), "seconds": round(time.time() - start, 1),
                   "device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu"}
            for method in A.METHODS:
                r = runs[method]
                row[method] = {k: round(A.mean(r[k]) if isinstance(r[k], list) else r[k], 4)
                               for k in ("reward", "realism", "kid", "probability", "denoise_err", "recognised")}
            with lines.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(name, f"steps {steps} lr {lr} gamma {gamma}:",
                  "  ".join(f"{m} r {row[m]['reward']:.3f} real {row[m]['realism']:.2f} kid {row[m]['kid']:.3f} "
                            f"P {row[m]['probability']:.2f}" for m in A.METHODS), flush=True)


if __name__ == "__main__":
    main()
