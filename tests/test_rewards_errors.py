"""Bad reward files: a clear error naming the file and what was expected; nothing executes."""
from __future__ import annotations

import os
import pickle

import pytest
import torch

from dno.rewards import (
    RewardFileError, load_aesthetic_reward, load_clip_score_reward, load_hps_reward,
    load_pickscore_reward, load_state_dict,
)
from tests import reward_fixtures as fx


def test_missing_file_names_the_file(tmp_path):
    path = os.path.join(tmp_path, "nope.safetensors")
    with pytest.raises(RewardFileError, match="nope.safetensors.*does not exist.*HPSv2"):
        load_hps_reward(path)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_corrupt_file_names_the_file(tmp_path, suffix):
    path = os.path.join(tmp_path, "broken" + suffix)
    with open(path, "wb") as handle:
        handle.write(b"\x00\x01garbage" * 10)
    with pytest.raises(RewardFileError, match=r"broken\%s.*corrupt" % suffix):
        load_clip_score_reward(path)


def test_truncated_safetensors(tmp_path):
    path, _ = fx.save_open_clip_file(str(tmp_path))
    with open(path, "rb") as handle:
        data = handle.read()
    with open(path, "wb") as handle:
        handle.write(data[: len(data) // 2])
    with pytest.raises(RewardFileError, match="tiny_open_clip.safetensors"):
        load_clip_score_reward(path)


@pytest.mark.parametrize("make", [fx.save_malicious_pickle, fx.save_malicious_torch_file])
def test_pickle_with_code_is_refused_and_never_runs(tmp_path, make):
    marker = os.path.join(tmp_path, "PWNED")
    path = make(os.path.join(tmp_path, "evil.pth"), marker)
    with pytest.raises(RewardFileError, match=r"Refused to load '.*evil\.pth'.*Nothing from it was executed.*io\.open"):
        load_aesthetic_reward(path, path)
    assert not os.path.exists(marker)
    # the proof is real: an unsafe load of the same file does create the marker
    if make is fx.save_malicious_torch_file:
        torch.load(path, weights_only=False)
    else:
        with open(path, "rb") as handle:
            pickle.load(handle)
    assert os.path.exists(marker)


def test_aesthetic_mlp_given_a_clip_file(tmp_path):
    clip_path, _ = fx.save_open_clip_file(str(tmp_path))
    with pytest.raises(RewardFileError, match=r"tiny_open_clip.*aesthetic MLP.*layers\.0"):
        load_aesthetic_reward(clip_path, clip_path)


def test_aesthetic_clip_given_an_mlp_file(tmp_path):
    mlp_path, _ = fx.save_aesthetic_file(str(tmp_path))
    with pytest.raises(RewardFileError, match=r"linearMSE\.pth.*ViT-L/14"):
        load_aesthetic_reward(mlp_path, mlp_path)


def test_aesthetic_mlp_and_clip_of_different_sizes(tmp_path):
    state = fx.tiny_aesthetic_state(embed=48)
    mlp_path = fx.save_safetensors(state, os.path.join(tmp_path, "mlp48.safetensors"))
    clip_path, _ = fx.save_open_clip_file(str(tmp_path))
    with pytest.raises(RewardFileError, match=r"48-d.*32-d"):
        load_aesthetic_reward(mlp_path, clip_path)


def test_hps_given_a_huggingface_clip(tmp_path):
    path, _ = fx.save_hf_clip_file(str(tmp_path))
    with pytest.raises(RewardFileError, match=r"pickscore_tiny.*HPSv2.*visual\.conv1"):
        load_hps_reward(path)


def test_pickscore_given_an_open_clip_file(tmp_path):
    path, _ = fx.save_open_clip_file(str(tmp_path))
    with pytest.raises(RewardFileError, match=r"tiny_open_clip.*PickScore.*vision_model"):
        load_pickscore_reward(path)


def test_clip_score_given_a_vision_only_file(tmp_path):
    model = fx.tiny_hf_clip()
    vision = {k: v for k, v in model.state_dict().items() if k.startswith(("vision_model.", "visual_projection."))}
    path = fx.save_safetensors(vision, os.path.join(tmp_path, "clip_vision.safetensors"))
    with pytest.raises(RewardFileError, match=r"clip_vision\.safetensors.*text tower"):
        load_clip_score_reward(path)


def test_clip_variant_with_unknown_keys(tmp_path):
    _, model = fx.save_open_clip_file(str(tmp_path))
    state = dict(model.state_dict())
    state["visual.extra_head.weight"] = torch.zeros(3)
    path = fx.save_safetensors(state, os.path.join(tmp_path, "odd_clip.safetensors"))
    with pytest.raises(RewardFileError, match=r"odd_clip.*unexpected.*extra_head"):
        load_clip_score_reward(path)


def test_unsupported_extension(tmp_path):
    path = os.path.join(tmp_path, "weights.onnx")
    open(path, "wb").close()
    with pytest.raises(RewardFileError, match=r"weights\.onnx.*\.safetensors"):
        load_state_dict(path, "anything")


def test_wrapped_and_ddp_prefixed_checkpoints_load(tmp_path):
    state = fx.tiny_aesthetic_state()
    path = os.path.join(tmp_path, "wrapped.pt")
    torch.save({"state_dict": {"module." + k: v for k, v in state.items()}, "epoch": 3}, path)
    loaded = load_state_dict(path, "the aesthetic MLP")
    assert sorted(loaded) == sorted(state)
