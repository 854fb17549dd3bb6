"""Tiny torch denoisers of the three parameterisations, for core tests.

Each wraps a small random conv net in the k-diffusion convention
``denoiser(x, sigma) -> x0`` exactly as ComfyUI's model_sampling does:
EPS  x0 = x - sigma * net(x / sqrt(1 + sigma^2))
V    x0 = x / (sigma^2 + 1) - net(x / sqrt(1 + sigma^2)) * sigma / sqrt(sigma^2 + 1)
FLOW x0 = x - sigma * net(x)
"""
from __future__ import annotations

import torch
from torch import nn

from dno import DNONoise
from dno.rewards.base import Reward


class TinyNet(nn.Module):
    def __init__(self, channels=4, hidden=16, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.c1 = nn.Conv2d(channels, hidden, 3, padding=1)
        self.c2 = nn.Conv2d(hidden, channels, 3, padding=1)
        self.emb = nn.Linear(1, hidden)
        for p in self.parameters():
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    def forward(self, x, sigma):
        h = self.c1(x) + self.emb(torch.log(sigma.to(x.dtype) + 1e-3)[:, None])[:, :, None, None]
        return self.c2(torch.tanh(h))


class ToyDenoiser(nn.Module):
    def __init__(self, kind="eps", channels=4, seed=0):
        super().__init__()
        self.kind = kind
        self.net = TinyNet(channels, seed=seed)
        self.calls = 0

    def forward(self, x, sigma):
        self.calls += 1
        s = sigma.view(-1, 1, 1, 1).to(x.dtype)
        if self.kind == "flow":
            return x - s * self.net(x, sigma)
        c_in = 1 / torch.sqrt(s * s + 1)
        out = self.net(x * c_in, sigma)
        if self.kind == "eps":
            return x - s * out
        return x / (s * s + 1) - out * s / torch.sqrt(s * s + 1)


def vp_sigmas(n, sigma_max=14.6, sigma_min=0.03):
    """Karras-free simple schedule: log-uniform sigmas then 0, like a VP model's."""
    s = torch.exp(torch.linspace(torch.log(torch.tensor(sigma_max)), torch.log(torch.tensor(sigma_min)), n))
    return torch.cat([s, s.new_zeros(1)])


def flow_sigmas(n):
    return torch.linspace(1.0, 0.0, n + 1)


class Brightness(Reward):
    name = "brightness"

    def score(self, images, prompts=None):
        return images.float().mean(dim=(1, 2, 3))


class Float64Head(Reward):
    """A reward whose weights are float64: fails on float32 images (a dtype mismatch)."""
    name = "float64 head"

    def __init__(self):
        super().__init__()
        self.head = torch.nn.Linear(3, 1).double()

    def score(self, images, prompts=None):
        return self.head(images.mean(dim=(2, 3)))[:, 0]


class _BrightnessThenFailure(Reward):
    """Brightness for the first ``calls`` evaluations, then the subclass's ``failure``."""
    label = "fail"

    def __init__(self, calls):
        super().__init__()
        self.name = f"{self.label}-after-{calls}"
        self.good_calls = calls
        self.calls = 0

    def score(self, images, prompts=None):
        self.calls += 1
        r = images.mean(dim=(1, 2, 3))
        return r if self.calls <= self.good_calls else self.failure(r)


class NaNAfter(_BrightnessThenFailure):
    """NaN rewards after ``calls`` good ones."""
    label = "nan"

    def failure(self, r):
        return r * float("nan")


class OutOfMemoryAfter(_BrightnessThenFailure):
    """CUDA's out-of-memory error after ``calls`` good rewards, as a reward model on a full card
    raises it."""
    label = "oom"

    def failure(self, r):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def to_image(latent):
    """A fixed differentiable 'decoder': 4 latent channels -> RGB in (0, 1)."""
    w = torch.tensor([[0.6, -0.3, 0.2, 0.1], [0.1, 0.5, -0.2, 0.3], [-0.2, 0.2, 0.6, -0.1]],
                     dtype=latent.dtype, device=latent.device)
    return torch.sigmoid(torch.einsum("rc,bchw->brhw", w, latent))


class BlockDenoiser(nn.Module):
    """A small EPS denoiser made of blocks it offers for block checkpointing."""

    def __init__(self, channels=4, hidden=16, depth=3, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.blocks = nn.ModuleList(
            [nn.Conv2d(channels, hidden, 3, padding=1)]
            + [nn.Conv2d(hidden, hidden, 3, padding=1) for _ in range(depth - 2)]
            + [nn.Conv2d(hidden, channels, 3, padding=1)])
        for p in self.parameters():
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        self.checkpoint_segments = list(self.blocks)
        self.block_calls = 0
        for block in self.blocks:
            block.forward = self._counted(block.forward)

    def _counted(self, forward):
        # counts every evaluation, including checkpoint recomputations (which bypass hooks)
        def run(*args):
            self.block_calls += 1
            return forward(*args)
        return run

    def forward(self, x, sigma):
        s = sigma.view(-1, 1, 1, 1).to(x.dtype)
        h = x / torch.sqrt(s * s + 1)
        for i, block in enumerate(self.blocks):
            h = block(h)
            if i < len(self.blocks) - 1:
                h = torch.tanh(h)
        return x - s * h


class DeepBlockDenoiser(nn.Module):
    """An EPS denoiser of residual blocks of three convolutions each, offered for block
    checkpointing: a checkpointed block keeps its input instead of its three saved activations,
    as a real UNet's resnet blocks do, so block checkpointing saves memory here."""

    def __init__(self, channels=4, hidden=32, depth=4, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        conv = lambda i, o: nn.Conv2d(i, o, 3, padding=1)
        self.inp, self.out = conv(channels, hidden), conv(hidden, channels)
        self.blocks = nn.ModuleList(
            nn.Sequential(conv(hidden, hidden), nn.Tanh(), conv(hidden, hidden), nn.Tanh(),
                          conv(hidden, hidden), nn.Tanh()) for _ in range(depth))
        for p in self.parameters():
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        self.checkpoint_segments = list(self.blocks)

    def forward(self, x, sigma):
        s = sigma.view(-1, 1, 1, 1).to(x.dtype)
        h = self.inp(x / torch.sqrt(s * s + 1))
        for block in self.blocks:
            h = h + block(h)
        return x - s * self.out(h)


def block_decode(z):
    return torch.sigmoid(z[:, :3])


def block_noise(sigmas, device="cpu", seed=0):
    return DNONoise.from_seed((1, 4, 8, 8), len(sigmas) - 1, seed=seed, sde=True, device=device)
