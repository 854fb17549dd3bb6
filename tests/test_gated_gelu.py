"""GEGLU feed-forwards recompute their GELU instead of keeping it, with identical gradients."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from dno.frozen import noise_only_backward
from dno.gated_gelu import gated_gelu, lean_gated_gelus
from test_nodes_inprocess import comfy, pack, sd15  # noqa: F401  (fixtures)


class GEGLU(nn.Module):
    """The contract: ``a, gate = proj(x).chunk(2, dim=-1)``, output ``a * gelu(gate)``."""

    def __init__(self, dim, inner, approximate="none"):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner)
        self.approximate = approximate

    def forward(self, x):
        a, gate = self.proj(x).chunk(2, dim=-1)
        return a * nn.functional.gelu(gate, approximate=self.approximate)


def saved_storage_bytes(fn, x):
    """Bytes of the distinct storages autograd keeps for backward (views share one)."""
    storages = {}

    def pack_hook(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack_hook, lambda t: t):
        fn(x.detach().requires_grad_(True))
    return sum(storages.values())


def output_and_input_grad(module, x, dtype, autocast=False):
    x = x.detach().to(dtype).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = module(x)
    upstream = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    (y * upstream).sum().backward()
    return y.detach(), x.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_same_output_and_gradient_as_autograd(dtype, approximate):
    torch.manual_seed(0)
    module = GEGLU(8, 16, approximate).to(dtype).requires_grad_(False)
    x = torch.randn(2, 5, 8)
    y0, g0 = output_and_input_grad(module, x, dtype)
    with lean_gated_gelus([module]) as switched:
        y1, g1 = output_and_input_grad(module, x, dtype)
    assert switched == 1
    assert torch.equal(y1, y0) and torch.equal(g1, g0)      # the same ops on the same values
    assert "forward" not in vars(module)                      # restored


def test_same_gradient_under_autocast():
    """The sampler runs fp32 models under bf16 autocast: the projection is bf16 then, and the
    recomputed GELU in the backward (which runs outside autocast) must match the kept one."""
    torch.manual_seed(0)
    module = GEGLU(8, 16).requires_grad_(False)
    x = torch.randn(2, 5, 8)
    y0, g0 = output_and_input_grad(module, x, torch.float32, autocast=True)
    with lean_gated_gelus([module]):
        y1, g1 = output_and_input_grad(module, x, torch.float32, autocast=True)
    assert y0.dtype == torch.bfloat16
    assert torch.equal(y1, y0) and torch.equal(g1, g0)


def test_keeps_the_projection_but_not_the_gelu_output():
    torch.manual_seed(0)
    module = GEGLU(8, 64).requires_grad_(False)
    x = torch.randn(4, 32, 8)
    stock = saved_storage_bytes(module, x)
    with lean_gated_gelus([module]):
        lean = saved_storage_bytes(module, x)
    gelu_output = 4 * 32 * 64 * 4
    assert stock - lean == gelu_output


def test_graph_free_and_restored_after_an_error():
    module = GEGLU(4, 8).requires_grad_(False)
    with torch.no_grad():                                      # nothing recorded: the stock op
        a, gate = torch.randn(3, 8), torch.randn(3, 8)
        assert torch.equal(gated_gelu(a, gate), a * nn.functional.gelu(gate))
    with pytest.raises(RuntimeError, match="boom"):
        with lean_gated_gelus([module, module]) as switched:   # listed twice: switched once
            assert switched == 1
            raise RuntimeError("boom")
    assert "forward" not in vars(module)


def test_comfy_unet_geglus_are_switched_with_the_same_gradient(pack, sd15):
    """The host adapter names ComfyUI's GEGLU modules; the UNet's input gradient is unchanged
    and it keeps less."""
    model, _, pos, _ = sd15
    unet = model.model.diffusion_model
    pack.nodes.host.make_autograd_ready(unet)
    geglus = pack.nodes.host.gated_gelu_modules(unet)
    assert geglus and all(type(m).__name__ == "GEGLU" for m in geglus)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=gen)
    timesteps = torch.tensor([500.0, 500.0])
    context = torch.randn(2, 77, pos[0][0].shape[-1], generator=gen)

    def step(v):
        return unet(v, timesteps, context=context, transformer_options={})

    def run(gated):
        leaf = x.clone().requires_grad_(True)
        with noise_only_backward([unet], gated_gelus=gated):
            kept = saved_storage_bytes(step, x)
            step(leaf).square().sum().backward()
        return kept, leaf.grad

    stock_kept, stock_grad = run([])
    lean_kept, lean_grad = run(geglus)
    assert lean_kept < stock_kept
    assert torch.equal(lean_grad, stock_grad)
    assert not any("forward" in vars(m) for m in geglus)
