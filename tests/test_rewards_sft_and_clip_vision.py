"""Reward weights the way ComfyUI users have them: ``.sft`` safetensors files, and the CLIP_VISION
that ComfyUI's own loader built (in-process, real ComfyUI 0.3.75 on the CPU).

ComfyUI's ``clip_vision.load`` picks a JSON config by the depth of the file (24 layers: ViT-L,
32: ViT-H, 48: ViT-bigG), so a tiny file cannot go through it. The tests build the host's own
``ClipVisionModel`` from a tiny config of the same format and fill it from the file with the
host's own reader (``comfy.utils.load_torch_file``) and ``load_sd``: what ``load_clipvision_from_sd``
does once it has chosen the config.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from comfy_host import import_comfy
import reward_fixtures as fx

ACTIVATION = "quick_gelu (OpenAI CLIP)"
# the tiny HF CLIP of reward_fixtures (vision tower) in the format of comfy/clip_vision_config_*.json
TINY_CLIP_VISION_CONFIG = {
    "attention_dropout": 0.0, "dropout": 0.0, "hidden_act": "quick_gelu", "hidden_size": 128,
    "image_size": fx.TINY_IMAGE, "initializer_factor": 1.0, "initializer_range": 0.02,
    "intermediate_size": 512, "layer_norm_eps": 1e-05, "model_type": "clip_vision_model",
    "num_attention_heads": 2, "num_channels": 3, "num_hidden_layers": 2, "patch_size": 8,
    "projection_dim": fx.TINY_EMBED, "torch_dtype": "float32",
}


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    import_comfy()
    import folder_paths

    models = tmp_path_factory.mktemp("models")
    from node_pack import load_node_pack

    module = load_node_pack()
    rewards = __import__(module.__name__ + ".nodes.rewards", fromlist=["x"])
    for name in ("dno_rewards", "clip_vision"):
        os.makedirs(models / name, exist_ok=True)
        folder_paths.folder_names_and_paths[name] = ([str(models / name)], folder_paths.supported_pt_extensions)
    return rewards, models


def _vision_state(seed=7):
    """The vision tower in fp16, as clip_vision files come: ComfyUI keeps a CLIP_VISION in fp16
    (``text_encoder_dtype``), so from an fp32 file it would score with rounded weights."""
    model = fx.tiny_hf_clip(seed=seed, hidden_act="quick_gelu")
    return {k: v.half() for k, v in model.state_dict().items()
            if k.startswith(("vision_model.", "visual_projection."))}


def _images(batch=2, height=44, width=36, seed=0):
    """ComfyUI IMAGE layout (B, H, W, C); not square and not 32 px, so resize and crop both run."""
    return torch.rand(batch, height, width, 3, generator=torch.Generator().manual_seed(seed))


def host_clip_vision(path, directory, config=None):
    """The host's CLIP_VISION for ``path``, built and filled under inference mode as the
    CLIPVisionLoader node is (ComfyUI's executor runs every node under it)."""
    import comfy.clip_vision
    import comfy.utils

    config_path = os.path.join(directory, "tiny_clip_vision_config.json")
    with open(config_path, "w") as handle:
        json.dump(config or TINY_CLIP_VISION_CONFIG, handle)
    with torch.inference_mode():
        clip_vision = comfy.clip_vision.ClipVisionModel(config_path)
        missing, unexpected = clip_vision.load_sd(comfy.utils.load_torch_file(path))
    assert not missing and not unexpected, (missing, unexpected)
    return clip_vision


@pytest.fixture(scope="module")
def files(pack):
    _, models = pack
    mlp, _ = fx.save_aesthetic_file(str(models / "dno_rewards"), suffix=".safetensors")
    clip = fx.save_safetensors(_vision_state(), str(models / "clip_vision" / "clip_vision_tiny.safetensors"))
    return mlp, clip


def test_sft_files_are_listed_and_load_as_safetensors(pack, files):
    rewards, models = pack
    mlp, clip = files
    mlp_sft = str(models / "dno_rewards" / "aesthetic_copy.sft")
    clip_sft = str(models / "clip_vision" / "clip_vision_tiny_copy.sft")
    for source, target in ((mlp, mlp_sft), (clip, clip_sft)):
        with open(source, "rb") as src, open(target, "wb") as dst:
            dst.write(src.read())
    # listed by ComfyUI but read by neither safetensors nor torch.load(weights_only=True): not offered
    for odd in ("model.pkl", "exported.pt2"):
        (models / "dno_rewards" / odd).write_bytes(b"\0" * 16)
    inputs = rewards.DNOAestheticReward.INPUT_TYPES()["required"]
    assert "aesthetic_copy.sft" in inputs["aesthetic_mlp"][0]
    assert "clip_vision_tiny_copy.sft" in inputs["clip_model"][0]
    assert not {"model.pkl", "exported.pt2"} & set(inputs["aesthetic_mlp"][0])

    from dno.rewards import load_state_dict

    assert torch.equal(load_state_dict(mlp_sft, "x")["layers.0.weight"], load_state_dict(mlp, "x")["layers.0.weight"])
    with torch.inference_mode():
        (from_sft,) = rewards.DNOAestheticReward().load("aesthetic_copy.sft", "clip_vision_tiny_copy.sft", ACTIVATION)
        (from_safetensors,) = rewards.DNOAestheticReward().load(
            os.path.basename(mlp), os.path.basename(clip), ACTIVATION)
        image = _images()
        sft_score = rewards.DNOScoreImage().score(image, from_sft)["result"][0]
        safetensors_score = rewards.DNOScoreImage().score(image, from_safetensors)["result"][0]
    assert sft_score == safetensors_score


def test_an_unknown_suffix_still_names_the_readable_ones(tmp_path):
    from dno.rewards import RewardFileError, load_state_dict

    odd = tmp_path / "weights.pkl"
    odd.write_bytes(b"\0" * 16)
    with pytest.raises(RewardFileError, match=r"\.safetensors / \.sft"):
        load_state_dict(str(odd), "the aesthetic MLP")


def test_clip_vision_input_scores_as_the_file_path_and_passes_gradients(pack, files, tmp_path):
    rewards, _ = pack
    mlp, clip = files
    clip_vision = host_clip_vision(clip, str(tmp_path))
    # as the host's loader leaves them: inference tensors, mostly fp16
    assert all(p.is_inference() for p in clip_vision.model.parameters())
    assert clip_vision.model.vision_model.encoder.layers[0].mlp.fc1.weight.dtype == torch.float16
    probe = _images(batch=1, seed=3)
    with torch.inference_mode():
        host_before = clip_vision.encode_image(probe)["image_embeds"]
        (by_file,) = rewards.DNOAestheticReward().load(os.path.basename(mlp), os.path.basename(clip), ACTIVATION)
        (by_clip_vision,) = rewards.DNOAestheticRewardCLIPVision().load(os.path.basename(mlp), clip_vision)
        image = _images(batch=3)
        file_score = rewards.DNOScoreImage().score(image, by_file)
        clip_vision_score = rewards.DNOScoreImage().score(image, by_clip_vision)
    expected = [float(s) for s in file_score["result"][1].split(", ")]
    got = [float(s) for s in clip_vision_score["result"][1].split(", ")]
    print("file path:", expected, "CLIP_VISION:", got)
    assert len(set(expected)) == 3  # three different images, three different scores
    assert clip_vision_score["result"][0] == pytest.approx(file_score["result"][0], abs=1e-5)

    # unrounded scores and the gradient in the pixels, as DNO's differentiable pass sees them
    pixels = image.permute(0, 3, 1, 2).contiguous()
    grads = []
    for reward in (by_file, by_clip_vision):
        reward.prepare(torch.device("cpu"))
        x = pixels.clone().requires_grad_()
        score = reward(x)
        score.sum().backward()
        grads.append((score.detach(), x.grad))
    (file_scores, file_grad), (host_scores, host_grad) = grads
    torch.testing.assert_close(host_scores, file_scores, atol=1e-5, rtol=0)
    assert torch.isfinite(host_grad).all() and host_grad.abs().sum() > 0
    torch.testing.assert_close(host_grad, file_grad, atol=1e-6, rtol=1e-3)
    assert not any(p.requires_grad or p.grad is not None for p in clip_vision.model.parameters())

    # the host's model still encodes as before, for the host's own nodes
    with torch.inference_mode():
        host_after = clip_vision.encode_image(probe)["image_embeds"]
    assert torch.equal(host_before, host_after)


def test_clip_vision_of_the_wrong_width_or_kind_is_refused(pack, files, tmp_path):
    rewards, models = pack
    mlp, _ = files
    narrow = dict(TINY_CLIP_VISION_CONFIG, projection_dim=16)
    state = _vision_state()
    state["visual_projection.weight"] = state["visual_projection.weight"][:16]
    narrow_file = fx.save_safetensors(state, str(tmp_path / "narrow.safetensors"))
    clip_vision = host_clip_vision(narrow_file, str(tmp_path), narrow)
    with pytest.raises(rewards.RewardFileError, match="takes 32-d embeddings but the CLIP of the clip_vision "
                                                      "input gives 16-d ones.*ViT-L/14"):
        rewards.DNOAestheticRewardCLIPVision().load(os.path.basename(mlp), clip_vision)

    siglip = dict(TINY_CLIP_VISION_CONFIG, model_type="siglip_vision_model")
    config_path = tmp_path / "siglip.json"
    config_path.write_text(json.dumps(siglip))
    import comfy.clip_vision

    with pytest.raises(ValueError, match="clip_vision is a SigLIP vision model.*Load CLIP Vision"):
        rewards.DNOAestheticRewardCLIPVision().load(os.path.basename(mlp), comfy.clip_vision.ClipVisionModel(
            str(config_path)))
