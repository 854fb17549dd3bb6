"""What one DNO sampling step and one decode keep and peak at, counted on the CPU.

The GPU's allocator counters are what the memory plan reads; without a GPU
the same numbers can be counted by watching every tensor an operator
creates (a ``TorchDispatchMode``) and when its storage dies (a finalizer).
Weights are excluded; what is left is the activations, their gradients and
the temporaries. Activation bytes scale with the pixel count (SDPA keeps no
attention matrix) and with the element size, so an fp32 count at a lower
resolution predicts a bf16 one at the target: ``scale = (target / res)² × 2 / 4``.
Against run 2 on the H100 the prediction was within 1.5 % (SD1.5 step 1.206 vs
1.222 GiB, SDXL step 9.49 vs 9.36 GiB, SDXL decode 6.90 vs 6.91 GiB).

Each record also splits the kept bytes by the operator that made them (bf16 at the
target, entries of about 10 MiB and up), which says what a stored step is made of.

Each case runs with the DNO backward's settings (frozen weights, input-gradient
convolutions) and, for ``blocks``, the host adapter's block checkpointing:

    python bench/live_bytes.py --model sdxl --resolution 512 --cases step,step-blocks \
        --target 1024 --out bench/results/<date>-cpu-live-bytes.jsonl
    python bench/live_bytes.py --model sd15 --resolution 256 --cases decode,decode-blocks --target 1024
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import json
import sys
import time
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parent))
from comfy_env import import_comfy, load_node_pack  # noqa: E402

GIB = 1024 ** 3


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages operators create while active, as they live and die; the peak."""

    def __init__(self, ignore=()):
        super().__init__()
        self.live = self.peak = 0
        self._seen = {}                  # storage -> the operator that created it
        self._ignore = set(ignore)       # the weights' storages (views of them are not new memory)

    def _freed(self, key, nbytes):
        self.live -= nbytes
        self._seen.pop(key, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key == 0 or key in self._seen or key in self._ignore:
                continue
            self._seen[key] = (func.overloadpacket.__name__, storage.nbytes())
            self.live += storage.nbytes()
            weakref.finalize(storage, self._freed, key, storage.nbytes())
        self.peak = max(self.peak, self.live)
        return out

    def by_operator(self) -> dict:
        """Live bytes grouped by the operator that created them, largest first."""
        totals = {}
        for name, nbytes in self._seen.values():
            totals[name] = totals.get(name, 0) + nbytes
        return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def storages_of(module: torch.nn.Module) -> set:
    return {t.untyped_storage().data_ptr() for t in list(module.parameters()) + list(module.buffers())}


def count(fn, x: torch.Tensor, module: torch.nn.Module) -> dict:
    """Kept after ``fn(x)`` and peak over it and a backward of its mean square."""
    leaf = x.clone().requires_grad_(True)
    meter = LiveBytes(storages_of(module))
    with meter:
        out = fn(leaf)
        kept = meter.live
        by_op = meter.by_operator()
        out.float().square().mean().backward()
    return {"kept_bytes": kept, "peak_bytes": meter.peak, "kept_by_operator": by_op}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=("sd15", "sdxl"), required=True)
    ap.add_argument("--resolution", type=int, default=512, help="image side counted at (pixels)")
    ap.add_argument("--target", type=int, default=0, help="image side to predict for (default: the model's)")
    ap.add_argument("--cases", default="step,step-blocks,decode,decode-blocks")
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)

    import_comfy(cpu=True)
    import comfy.model_management as mm
    mm.ENABLE_PYTORCH_ATTENTION = True     # SDPA, as ComfyUI picks on NVIDIA GPUs (before the model is built)
    pack = load_node_pack()
    host = sys.modules[pack.__name__ + ".nodes.host"]
    core = f"{pack.__name__}.dno"
    checkpointed_blocks = importlib.import_module(f"{core}.checkpointing").checkpointed_blocks
    noise_only_backward = importlib.import_module(f"{core}.frozen").noise_only_backward
    from models import RESOLUTION, TEXT, build_model, build_vae

    target = args.target or RESOLUTION[args.model]
    scale = (target / args.resolution) ** 2 * 2 / 4        # pixels, then fp32 -> bf16
    latent = args.resolution // 8
    gen = torch.Generator().manual_seed(0)
    cases = [c for c in args.cases.split(",") if c]
    command = "python " + " ".join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:]))
    out = open(args.out, "a") if args.out else None
    unet = vae = None
    for case in cases:
        if case.startswith("step"):
            if unet is None:
                unet = build_model(args.model, "fp32", torch.device("cpu")).model.diffusion_model
            cross, pooled = TEXT[args.model]
            kwargs = {"context": torch.randn(2, 77, cross, generator=gen)}    # the CFG batch of 2
            if pooled is not None:
                kwargs["y"] = torch.randn(2, 2816, generator=gen)
            t = torch.tensor([500.0, 500.0])
            module, x = unet, torch.randn(2, 4, latent, latent, generator=gen)

            def fn(v, module=module, kwargs=kwargs, t=t):
                return module(v, t, transformer_options={}, **kwargs)
            blocks = host.model_blocks(unet) if case == "step-blocks" else []
        elif case.startswith("decode"):
            if vae is None:
                vae = build_vae("fp32", torch.device("cpu"))
            module, x = vae.first_stage_model, torch.randn(1, 4, latent, latent, generator=gen)
            fn = host.vae_decoder(vae, lambda z: z)
            blocks = fn.checkpoint_segments if case == "decode-blocks" else []
        else:
            raise SystemExit(f"unknown case {case!r}: step, step-blocks, decode, decode-blocks")
        t0 = time.perf_counter()
        with noise_only_backward([module]), checkpointed_blocks(blocks):
            counted = count(fn, x, module)
        record = {"date": datetime.date.today().isoformat(), "device": "cpu (counted)",
                  "torch": torch.__version__, "model": args.model, "case": case,
                  "counted_at": f"{args.resolution}px fp32", "predicted_for": f"{target}px bf16",
                  "kept_gib": round(counted["kept_bytes"] / GIB, 3), "peak_gib": round(counted["peak_bytes"] / GIB, 3),
                  "predicted_kept_gib": round(counted["kept_bytes"] * scale / GIB, 3),
                  "predicted_peak_gib": round(counted["peak_bytes"] * scale / GIB, 3),
                  "predicted_kept_gib_by_operator": {name: round(n * scale / GIB, 3)
                                                     for name, n in counted["kept_by_operator"].items()
                                                     if n * scale >= GIB / 100},
                  "seconds": round(time.perf_counter() - t0, 1), "command": command}
        line = json.dumps(record)
        print(line, flush=True)
        if out:
            out.write(line + "\n")
            out.flush()
    if out:
        out.close()


if __name__ == "__main__":
    main()
