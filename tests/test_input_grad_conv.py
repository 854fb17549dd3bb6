"""Frozen convolutions keep their weight, not their input, for the noise's gradient."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from dno.input_grad_conv import input_grad_convolutions


def convnet() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.SiLU(),
                        nn.Conv2d(8, 8, 3, stride=2, padding=2, dilation=2, groups=2), nn.SiLU(),
                        nn.Conv2d(8, 3, 1, bias=False))
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def input_grad(net, x, autocast=False):
    x = x.detach().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = net(x)
    y.float().square().sum().backward()
    return y.detach(), x.grad


def saved_bytes(net, x):
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        net(x.detach().requires_grad_(True)).sum()
    return total[0]


@pytest.mark.parametrize("autocast", [False, True])
def test_same_output_and_input_gradient_as_the_stock_convolution(autocast):
    net, x = convnet(), torch.randn(2, 4, 17, 19)
    y0, g0 = input_grad(net, x, autocast)
    with input_grad_convolutions([net]) as switched:
        y1, g1 = input_grad(net, x, autocast)
    assert switched == 3
    assert y1.dtype == y0.dtype and g1.dtype == g0.dtype == torch.float32
    torch.testing.assert_close(y1, y0, rtol=0, atol=0)
    torch.testing.assert_close(g1, g0, rtol=0, atol=0)


def test_saves_the_weights_instead_of_the_inputs():
    net, x = convnet(), torch.randn(2, 4, 64, 64)
    stock = saved_bytes(net, x)
    with input_grad_convolutions([net]):
        lean = saved_bytes(net, x)
    # both save each weight; the stock convolution also saves its input: x and the two SiLU outputs
    conv_inputs = 4 * (2 * 4 * 64 * 64 + 2 * 8 * 64 * 64 + 2 * 8 * 32 * 32)
    assert stock - lean == conv_inputs


def test_trainable_weights_keep_the_stock_path_and_modules_are_restored():
    net, x = convnet(), torch.randn(1, 4, 8, 8)
    net[0].weight.requires_grad_(True)
    with input_grad_convolutions([net, "not a module"]):
        assert "_conv_forward" in vars(net[2])
        net(x.requires_grad_(True)).sum().backward()
    assert net[0].weight.grad is not None and net[0].weight.grad.abs().sum() > 0
    assert all("_conv_forward" not in vars(m) for m in net.modules())


def test_restored_after_an_error():
    net = convnet()
    with pytest.raises(RuntimeError, match="boom"):
        with input_grad_convolutions([net]):
            raise RuntimeError("boom")
    assert all("_conv_forward" not in vars(m) for m in net.modules())
