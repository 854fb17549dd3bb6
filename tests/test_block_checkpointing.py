"""Block checkpointing reaches the layers of ComfyUI's UNet and recomputes them as they ran."""
from __future__ import annotations

import torch
from torch import nn

from dno.checkpointing import checkpointed_blocks
from dno.frozen import frozen_parameters
from test_nodes_inprocess import comfy, pack, sd15  # noqa: F401  (fixtures)


def saved_bytes_and_input_grad(unet, blocks, x, timesteps, context):
    saved = [0]

    def pack_hook(t):
        saved[0] += t.numel() * t.element_size()
        return t
    leaf = x.clone().requires_grad_(True)
    with frozen_parameters([unet]), checkpointed_blocks(blocks):
        with torch.autograd.graph.saved_tensors_hooks(pack_hook, lambda t: t):
            out = unet(leaf, timesteps, context=context, transformer_options={})
        out.square().sum().backward()
    return saved[0], leaf.grad


def test_comfy_unet_blocks_are_really_checkpointed(pack, sd15):
    """ComfyUI's UNet calls the layers of its TimestepEmbedSequential blocks, never the
    container's forward: wrapping the containers checkpointed nothing."""
    model, _, pos, _ = sd15
    unet = model.model.diffusion_model
    pack.nodes.host.make_autograd_ready(unet)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=gen)
    timesteps = torch.tensor([500.0, 500.0])
    context = torch.randn(2, 77, pos[0][0].shape[-1], generator=gen)
    blocks = pack.nodes.host.model_blocks(unet)
    assert blocks and not any(isinstance(b, nn.Sequential) for b in blocks)
    plain, grad = saved_bytes_and_input_grad(unet, [], x, timesteps, context)
    checkpointed, grad_ckpt = saved_bytes_and_input_grad(unet, blocks, x, timesteps, context)
    # outside the checkpointed layers only the glue between them is saved
    assert checkpointed < plain / 4, (checkpointed, plain)
    torch.testing.assert_close(grad_ckpt, grad, rtol=1e-5, atol=1e-6)


class ReadsOptions(nn.Module):
    """A layer whose output depends on an option the caller changes after the call, as
    ComfyUI's UNet changes transformer_options["block"] from block to block."""

    def forward(self, x, options):
        return x.square() * options["scale"]


def test_recompute_sees_the_options_of_its_own_call():
    layer = ReadsOptions()
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    options = {"scale": 3.0}
    with checkpointed_blocks([layer]):
        y = layer(x, options)
        options["scale"] = 100.0          # the next block's value, set before the backward
        y.sum().backward()
    assert x.grad.tolist() == [6.0, 12.0]  # d/dx 3 x² = 6 x
