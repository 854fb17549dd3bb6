"""dno/residuals.py: in-place residual adds (as in ComfyUI's Flux blocks) made out-of-place while
DNO differentiates, without touching the model's class or source."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from dno.checkpointing import checkpointed_blocks
from dno.residuals import functional_residuals, rewritten


class InPlaceBlock(nn.Module):
    """The shape of ComfyUI's Flux SingleStreamBlock: a norm saves x, then x grows in place."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.linear = nn.Linear(width, width)

    def forward(self, x, notes=None):
        x += self.linear(self.norm(x))
        x *= 0.5
        if notes is not None:
            notes += ["ran"]             # a list keeps its in-place meaning
        return x


class OutOfPlaceBlock(InPlaceBlock):
    def forward(self, x, notes=None):
        x = x + self.linear(self.norm(x))
        return x * 0.5


class Stack(nn.Module):
    def __init__(self, kind, depth: int = 3):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(kind() for _ in range(depth))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def grad_of(model, x, blocks_checkpointed=False):
    x = x.clone().requires_grad_(True)
    with checkpointed_blocks(model.blocks if blocks_checkpointed else []):
        (model(x) * torch.arange(x.numel()).view_as(x)).sum().backward()
    return x.grad


def test_in_place_blocks_break_autograd_without_it():
    model = Stack(InPlaceBlock)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        model(torch.randn(2, 5, 8, requires_grad=True) * 1).sum().backward()


@pytest.mark.parametrize("blocks_checkpointed", [False, True])
def test_gradients_equal_the_out_of_place_model(blocks_checkpointed):
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    reference = grad_of(Stack(OutOfPlaceBlock).double(), x)
    model = Stack(InPlaceBlock).double()
    with functional_residuals(model.modules()) as replaced:
        got = grad_of(model, x, blocks_checkpointed)
    assert replaced == 3
    torch.testing.assert_close(got, reference, rtol=1e-12, atol=1e-12)


def test_same_output_and_everything_restored():
    model = Stack(InPlaceBlock)
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        before = model(x.clone())
    notes = []
    with functional_residuals(model.modules()):
        assert "forward" in model.blocks[0].__dict__
        with torch.no_grad():
            during = model.blocks[0](x.clone(), notes)
            torch.testing.assert_close(model(x.clone()), before)
        assert notes == ["ran"]
    assert all("forward" not in block.__dict__ for block in model.blocks)
    assert type(model.blocks[0]).forward is InPlaceBlock.forward
    torch.testing.assert_close(during, InPlaceBlock.forward(model.blocks[0], x.clone()))


def test_left_alone_when_nothing_to_do_or_unsafe_to_rebuild():
    assert rewritten(OutOfPlaceBlock.forward) is None         # no augmented assignment

    class UsesSuper(InPlaceBlock):
        def forward(self, x):
            x += 1
            return super().forward(x)

    assert rewritten(UsesSuper.forward) is None               # a closure (__class__): not rebuilt
    assert rewritten(InPlaceBlock.forward) is not None


def test_a_failure_inside_restores_the_methods():
    model = Stack(InPlaceBlock)
    with pytest.raises(ValueError):
        with functional_residuals(model.modules()):
            raise ValueError("boom")
    assert all("forward" not in block.__dict__ for block in model.blocks)
