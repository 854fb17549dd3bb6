"""Channels-last convolution weights for a run (dno/layout.py): same values, same gradients,
the host's Parameter objects and strides back afterwards."""
from __future__ import annotations

import pytest
import torch

from dno.layout import channels_last_weights, conv_weight_share


def small_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.SiLU(),
                               torch.nn.Conv2d(8, 4, 1), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 2))


def test_weights_are_channels_last_inside_and_restored_after():
    net = small_net()
    params = [p for p in net.parameters()]
    before = [(p.stride(), p.detach().clone()) for p in params]
    with channels_last_weights([net, "not a module"]) as changed:
        # the 3x3 Conv2d weight; a 1x1 one is channels-last already, biases and the Linear are not 4-D
        assert changed == 1
        assert net[0].weight.is_contiguous(memory_format=torch.channels_last)
        assert not net[0].weight.is_contiguous()
        assert net[4].weight.is_contiguous()
    assert [p for p in net.parameters()] == params           # the same Parameter objects
    for p, (stride, value) in zip(params, before):
        assert p.stride() == stride and torch.equal(p, value)


def test_same_output_and_input_gradient_in_either_layout():
    net = small_net().requires_grad_(False)
    x = torch.randn(2, 3, 6, 6)

    def run():
        leaf = x.clone().requires_grad_(True)
        out = net(leaf)
        out.square().sum().backward()
        return out.detach(), leaf.grad

    out, grad = run()
    with channels_last_weights([net]):
        out_cl, grad_cl = run()
    torch.testing.assert_close(out_cl, out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_cl, grad, rtol=1e-5, atol=1e-6)


def test_restored_on_error_and_off_when_disabled():
    net = small_net()
    with pytest.raises(RuntimeError, match="boom"):
        with channels_last_weights([net]):
            raise RuntimeError("boom")
    assert net[0].weight.is_contiguous()
    with channels_last_weights([net], enabled=False) as changed:
        assert changed == 0 and net[0].weight.is_contiguous()


def test_conv_weight_share():
    net = small_net()
    conv = 8 * 3 * 9 + 4 * 8
    total = sum(p.numel() for p in net.parameters())
    assert conv_weight_share(net) == pytest.approx(conv / total)
    assert conv_weight_share(torch.nn.Linear(3, 3)) == 0.0
    assert conv_weight_share(torch.nn.Module()) == 0.0



def test_the_host_sampler_turns_channels_last_on_for_convolution_models_on_cuda(monkeypatch):
    import sys
    from comfy_host import import_comfy
    from node_pack import load_node_pack
    import_comfy()
    engine = sys.modules[load_node_pack().__name__ + ".nodes.engine"]
    convs, linears = torch.nn.Conv2d(8, 8, 3), torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Conv2d(3, 3, 1))
    monkeypatch.delenv("DNO_CHANNELS_LAST", raising=False)
    assert engine.channels_last_wanted("cuda", convs)
    assert not engine.channels_last_wanted("cuda", linears)          # mostly not convolutions
    assert not engine.channels_last_wanted("cpu", convs)             # cuDNN's layout only
    monkeypatch.setenv("DNO_CHANNELS_LAST", "0")
    assert not engine.channels_last_wanted("cuda", convs)
    monkeypatch.setenv("DNO_CHANNELS_LAST", "1")
    assert engine.channels_last_wanted("cuda", linears)
