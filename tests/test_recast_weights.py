"""fp8 weights (ComfyUI's weight_dtype, computed in a wider dtype): the backward pass casts each
Linear weight again instead of keeping the cast copy (dno/recast_linear.py, nodes/host.py).

A tiny Flux.1 built by the host's own classes with fp8 weights, on the CPU: the noise gradient is
the same with and without, and what autograd keeps for backward shrinks by the compute-dtype
copies of the Linear weights.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from comfy_host import import_comfy
from node_pack import load_node_pack

BENCH = Path(__file__).resolve().parents[1] / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))


@pytest.fixture(scope="module")
def pack():
    import_comfy()
    return load_node_pack()


def saved_and_gradient(model, x, **inputs):
    """(shape, dtype, bytes) of what autograd keeps for the backward pass of two chained model
    calls, and x's gradient."""
    saved = []

    def pack_hook(t):
        saved.append((tuple(t.shape), t.dtype, t.numel() * t.element_size()))
        return t

    leaf = x.clone().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack_hook, lambda t: t):
        h = leaf
        for t in (0.9, 0.5):
            h = h - 0.3 * model(h, torch.tensor([t]), **inputs)
    (h * torch.linspace(-1, 1, h.numel()).view_as(h)).sum().backward()
    return saved, leaf.grad


def test_fp8_linear_weights_are_cast_again_not_kept(pack):
    import dit_models
    host = sys.modules[pack.__name__ + ".nodes.host"]
    residuals = sys.modules[pack.__name__ + ".dno.residuals"]
    base = dit_models.build_diffusion_model("flux-schnell", torch.float8_e4m3fn, "cpu", tiny=True)
    model = base.diffusion_model.requires_grad_(False)      # as a DNO run freezes it (dno/frozen.py)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(m.weight.dtype == torch.float8_e4m3fn and m.comfy_cast_weights for m in linears)
    compute = base.manual_cast_dtype
    assert compute is not None and compute != torch.float8_e4m3fn
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 8, 8, generator=gen, dtype=compute)
    inputs = {"context": torch.randn(1, 8, 4096, generator=gen, dtype=compute),
              "y": torch.randn(1, 768, generator=gen, dtype=compute)}
    # as saved: the weight itself or its transpose (the matmul's operand)
    weight_shapes = {tuple(m.weight.shape) for m in linears} | {tuple(m.weight.shape)[::-1] for m in linears}
    with residuals.functional_residuals(model.modules()):
        stock, grad_stock = saved_and_gradient(model, x, **inputs)
        with host.linear_weights_recast_in_backward(model.modules()) as switched:
            recast, grad = saved_and_gradient(model, x, **inputs)
    assert switched == len(linears)
    assert all("forward_comfy_cast_weights" not in vars(m) for m in linears)       # restored
    torch.testing.assert_close(grad, grad_stock, rtol=1e-5, atol=1e-7)

    def weight_copies(saved):
        return [b for shape, dtype, b in saved if shape in weight_shapes and dtype == compute]

    # autograd's linear kept a compute-dtype copy of each weight on the gradient's path; now none,
    # and nothing is kept in their place
    assert len(weight_copies(stock)) >= 10 and weight_copies(recast) == []
    assert sum(b for *_, b in recast) <= sum(b for *_, b in stock) - sum(weight_copies(stock))
