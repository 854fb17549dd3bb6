"""A small pixel-space diffusion model for the shapes dataset, and its k-diffusion denoiser.

Schedule: the continuous cosine VP schedule (Nichol & Dhariwal), written in the
"VE form" that k-diffusion and ComfyUI use for VP models:
    x = x0 + sigma * eps,   sigma(t) = tan(pi/2 * t),   t in [0, T_MAX]
and the network sees x / sqrt(1 + sigma^2) (the VP-scaled input).
Prediction: v-prediction (v = alpha * eps - s * x0 in VP terms), which stays
well conditioned at large sigma where eps-prediction would amplify errors.
Pixels: the model works in [-1, 1]; ``decode`` maps to [0, 1] (see there).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

T_MAX = 0.985  # sigma(T_MAX) ~ 42: at this noise level x0 is invisible (SNR ~ 5e-4).


@dataclass
class UNetConfig:
    channels: Tuple[int, ...] = (32, 64, 96)
    blocks_per_level: int = 1
    attention_at_bottom: bool = True
    emb_dim: int = 128
    image_size: int = 32
    num_classes: int = 0          # > 0: class-conditional, label num_classes = no prompt (for CFG)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @staticmethod
    def from_json(text: str) -> "UNetConfig":
        data = json.loads(text)
        data["channels"] = tuple(data["channels"])
        data.setdefault("num_classes", 0)
        return UNetConfig(**data)


def sigma_from_t(t: torch.Tensor) -> torch.Tensor:
    return torch.tan(t * math.pi / 2)


def t_from_sigma(sigma: torch.Tensor) -> torch.Tensor:
    return torch.atan(sigma) * 2 / math.pi


def sampling_sigmas(num_steps: int, t_max: float = T_MAX) -> torch.Tensor:
    """Descending sigmas for ``num_steps`` steps, uniform in t (like a "simple" scheduler), ending in 0."""
    if num_steps < 1:
        raise ValueError(f"sampling_sigmas: num_steps must be >= 1, got {num_steps}")
    t = torch.linspace(t_max, 0.0, num_steps + 1)
    return sigma_from_t(t).clamp_min(0.0).to(torch.float32).contiguous().index_fill_(0, torch.tensor([num_steps]), 0.0)


def _timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = (t.float()[:, None] * 1000.0) * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb_dim: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(8, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, cout)
        self.norm2 = nn.GroupNorm(8, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(emb)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return h + self.skip(x)


class SelfAttention(nn.Module):
    def __init__(self, ch: int, heads: int = 4):
        super().__init__()
        self.norm = nn.GroupNorm(8, ch)
        self.qkv = nn.Conv2d(ch, ch * 3, 1)
        self.out = nn.Conv2d(ch, ch, 1)
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).unbind(1)
        a = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return x + self.out(a.transpose(-1, -2).reshape(b, c, h, w))


class UNet(nn.Module):
    """Predicts v from the VP-scaled noisy image and the diffusion time t in [0, 1]."""

    def __init__(self, config: UNetConfig = UNetConfig()):
        super().__init__()
        self.config = config
        ch = config.channels
        self.emb = nn.Sequential(nn.Linear(config.emb_dim, config.emb_dim), nn.SiLU(),
                                 nn.Linear(config.emb_dim, config.emb_dim))
        # one more label than classes: the "no prompt" label classifier-free guidance needs
        self.label_emb = nn.Embedding(config.num_classes + 1, config.emb_dim) if config.num_classes > 0 else None
        self.stem = nn.Conv2d(3, ch[0], 3, padding=1)
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        cur = ch[0]
        skips = []
        for i, c in enumerate(ch):
            for _ in range(config.blocks_per_level):
                self.down.append(ResBlock(cur, c, config.emb_dim))
                cur = c
                skips.append(c)
            self.downsample.append(nn.Conv2d(c, c, 3, stride=2, padding=1) if i < len(ch) - 1 else nn.Identity())
        self.mid1 = ResBlock(cur, cur, config.emb_dim)
        self.mid_attn = SelfAttention(cur) if config.attention_at_bottom else nn.Identity()
        self.mid2 = ResBlock(cur, cur, config.emb_dim)
        self.up = nn.ModuleList()
        for i, c in reversed(list(enumerate(ch))):
            for _ in range(config.blocks_per_level):
                self.up.append(ResBlock(cur + skips.pop(), c, config.emb_dim))
                cur = c
        self.out_norm = nn.GroupNorm(8, cur)
        self.out = nn.Conv2d(cur, 3, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor = None) -> torch.Tensor:
        emb = _timestep_embedding(t, self.config.emb_dim)
        if self.label_emb is not None:
            if labels is None:
                labels = torch.full((x.shape[0],), self.config.num_classes, dtype=torch.long, device=x.device)
            emb = emb + self.label_emb(labels)
        elif labels is not None:
            raise ValueError("this UNet is unconditional (num_classes=0): it takes no labels")
        emb = self.emb(emb)
        h = self.stem(x)
        hs = []
        n = self.config.blocks_per_level
        for level in range(len(self.config.channels)):
            for j in range(n):
                h = self.down[level * n + j](h, emb)
                hs.append(h)
            h = self.downsample[level](h)
        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)
        levels = len(self.config.channels)
        for k, level in enumerate(reversed(range(levels))):
            for j in range(n):
                h = self.up[k * n + j](torch.cat([h, hs.pop()], dim=1), emb)
            if level > 0:
                h = F.interpolate(h, scale_factor=2.0, mode="nearest")
        return self.out(F.silu(self.out_norm(h)))


def v_target(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    alpha = torch.cos(t * math.pi / 2)[:, None, None, None]
    s = torch.sin(t * math.pi / 2)[:, None, None, None]
    return alpha * eps - s * x0


class ShapesDenoiser(nn.Module):
    """k-diffusion/ComfyUI convention: ``denoiser(x, sigma) -> x0`` with ``x = x0 + sigma * eps``.

    ``x`` and the returned ``x0`` live in the model's pixel space [-1, 1].
    ``sigma`` is a tensor of shape [B] (or a scalar, broadcast to the batch).
    """

    def __init__(self, unet: UNet):
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
        if sigma.dim() == 0:
            sigma = sigma.expand(x.shape[0])
        c_in = 1.0 / torch.sqrt(1.0 + sigma ** 2)  # = alpha of the VP process
        s = sigma * c_in
        x_vp = x * c_in[:, None, None, None]
        v = self.unet(x_vp, t_from_sigma(sigma))
        return c_in[:, None, None, None] * x_vp - s[:, None, None, None] * v


class GuidedDenoiser(nn.Module):
    """The conditional model as ``denoiser(x, sigma) -> x0`` for fixed prompts, with
    classifier-free guidance: ``v = v_none + guidance * (v_prompt - v_none)``, both in one batch.

    ``labels`` holds one class per image of the batch DNO optimises; the optimiser's estimators
    may call with that batch tiled several times, and the labels are tiled to match. Each call
    is one denoiser evaluation per image (two UNet passes, batched), as a guided host model's is.
    """

    def __init__(self, unet: UNet, labels: torch.Tensor, guidance: float = 3.0):
        super().__init__()
        if unet.config.num_classes <= 0:
            raise ValueError("GuidedDenoiser needs a class-conditional UNet (num_classes > 0)")
        self.unet = unet
        self.register_buffer("labels", torch.as_tensor(labels, dtype=torch.long).reshape(-1), persistent=False)
        self.guidance = float(guidance)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
        if sigma.dim() == 0:
            sigma = sigma.expand(x.shape[0])
        n = self.labels.numel()
        if x.shape[0] % n:
            raise ValueError(f"GuidedDenoiser: a batch of {x.shape[0]} images for {n} labels")
        labels = self.labels.to(x.device).repeat(x.shape[0] // n)
        c_in = 1.0 / torch.sqrt(1.0 + sigma ** 2)
        s = sigma * c_in
        x_vp = x * c_in[:, None, None, None]
        t = t_from_sigma(sigma)
        if self.guidance == 1.0:
            v = self.unet(x_vp, t, labels)
        else:
            none = torch.full_like(labels, self.unet.config.num_classes)
            v_prompt, v_none = self.unet(torch.cat([x_vp, x_vp]), torch.cat([t, t]),
                                         torch.cat([labels, none])).chunk(2)
            v = v_none + self.guidance * (v_prompt - v_none)
        return c_in[:, None, None, None] * x_vp - s[:, None, None, None] * v


def decode(x: torch.Tensor) -> torch.Tensor:
    """Model pixels [-1, 1] -> image [0, 1].

    The clamp is straight-through: the forward value is clamped (an image cannot be
    brighter than white), but gradients pass as if it were the identity, so a reward
    still sees a direction to move in where pixels are saturated. Without this,
    saturated pixels would have zero gradient and the optimiser would stall.
    """
    y = (x + 1.0) / 2.0
    return y + (y.clamp(0.0, 1.0) - y).detach()


def encode(images: torch.Tensor) -> torch.Tensor:
    """Image [0, 1] -> model pixels [-1, 1]."""
    return images * 2.0 - 1.0


WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
DIFFUSION_WEIGHTS = WEIGHTS_DIR / "shapes_diffusion.safetensors"


def read_weights(path: Path, what: str):
    """(fp32 state dict, metadata) of a committed fp16 safetensors file; a clear error when missing."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} weights not found at {path}; run `python -m demo.train` to create them")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    return {k: v.float() for k, v in load_file(str(path)).items()}, meta


OBJECTS_WEIGHTS = WEIGHTS_DIR / "objects_diffusion.safetensors"


def load_network(make: Callable[[int], nn.Module], path: Path, what: str, device: str = "cpu") -> nn.Module:
    """A judge or reward network from a committed file: ``make(width)`` with the width its
    metadata records (32 when it records none), in eval mode and frozen."""
    state, meta = read_weights(path, what)
    net = make(int(meta.get("width", 32)))
    net.load_state_dict(state)
    return net.to(device).eval().requires_grad_(False)


def load_unet(path: Path, what: str = "diffusion") -> Tuple[UNet, dict]:
    """(UNet, metadata) of a file written by ``demo.train`` / ``demo.train_objects``."""
    state, meta = read_weights(path, what)
    if "unet_config" not in meta:
        raise ValueError(f"{path} has no 'unet_config' metadata; it was not written by demo.train")
    unet = UNet(UNetConfig.from_json(meta["unet_config"]))
    unet.load_state_dict(state)
    return unet.eval().requires_grad_(False), meta


def load_denoiser(path: Path = DIFFUSION_WEIGHTS, device: str = "cpu") -> ShapesDenoiser:
    """Load the committed shapes model (fp16 on disk, fp32 in memory)."""
    unet, _ = load_unet(path, "shapes diffusion")
    return ShapesDenoiser(unet).to(device).eval().requires_grad_(False)
