"""Reward nodes in-process against a real ComfyUI (0.3.75) on the CPU."""
from __future__ import annotations

import os
import shutil

import pytest
import torch

from comfy_host import import_comfy
from tests import reward_fixtures as fx


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    import_comfy()
    import folder_paths

    models = tmp_path_factory.mktemp("models")
    folder_paths.models_dir = str(models)
    from node_pack import load_node_pack

    module = load_node_pack()
    rewards = __import__(module.__name__ + ".nodes.rewards", fromlist=["x"])
    # the pack registered its folder type; point it at this test's folder
    folder_paths.folder_names_and_paths["dno_rewards"] = (
        [str(models / "dno_rewards")], folder_paths.supported_pt_extensions)
    folder_paths.folder_names_and_paths["clip_vision"] = (
        [str(models / "clip_vision")], folder_paths.supported_pt_extensions)
    for name in ("dno_rewards", "clip_vision"):
        os.makedirs(models / name, exist_ok=True)
    folder_paths.filename_list_cache.clear() if hasattr(folder_paths, "filename_list_cache") else None
    return rewards, models


def _image(batch=2, size=40, seed=0):
    return torch.rand(batch, size, size, 3, generator=torch.Generator().manual_seed(seed))


def test_importing_the_reward_nodes_registers_the_folder_and_exports_mappings(pack):
    import folder_paths

    rewards, _ = pack
    del folder_paths.folder_names_and_paths["dno_rewards"]
    rewards.register_reward_folder()  # what the module does at import
    paths, extensions = folder_paths.folder_names_and_paths["dno_rewards"]
    assert paths == [os.path.join(folder_paths.models_dir, "dno_rewards")]
    assert {".safetensors", ".pth", ".pt", ".bin"} <= set(extensions)
    for name in ("DNOAestheticReward", "DNOHPSReward", "DNOPickScoreReward", "DNOCLIPScoreReward",
                 "DNOBuiltinReward", "DNOJPEGReward", "DNOCombineRewards", "DNOScoreImage"):
        cls = rewards.NODE_CLASS_MAPPINGS[name]
        assert name in rewards.NODE_DISPLAY_NAME_MAPPINGS
        assert cls.CATEGORY == "DNO/rewards" and cls.INPUT_TYPES()["required"]
    assert rewards.DNOScoreImage.OUTPUT_NODE
    # restore this test module's folder
    folder_paths.folder_names_and_paths["dno_rewards"] = (
        [str(pack[1] / "dno_rewards")], folder_paths.supported_pt_extensions)


def test_a_users_extra_model_paths_entry_stays_beside_the_default_folder(pack, tmp_path):
    """extra_model_paths.yaml is read before custom nodes load, through add_model_folder_path:
    the user's folder stays listed, after models/dno_rewards, with weight-file extensions."""
    import folder_paths

    rewards, models = pack
    saved = folder_paths.folder_names_and_paths.pop("dno_rewards")
    try:
        folder_paths.add_model_folder_path("dno_rewards", str(tmp_path))      # what the yaml loader does
        rewards.register_reward_folder()
        paths, extensions = folder_paths.folder_names_and_paths["dno_rewards"]
        assert paths == [os.path.join(folder_paths.models_dir, "dno_rewards"), str(tmp_path)]
        assert ".safetensors" in extensions and ".txt" not in extensions
        rewards.register_reward_folder()                                       # a second load adds nothing
        assert folder_paths.folder_names_and_paths["dno_rewards"][0] == paths
    finally:
        folder_paths.folder_names_and_paths["dno_rewards"] = saved


def test_hps_node_scores_like_the_library_and_is_cached(pack):
    rewards, models = pack
    path, _ = fx.save_hps_file(str(models / "dno_rewards"))
    name = os.path.basename(path)
    assert name in rewards.DNOHPSReward.INPUT_TYPES()["required"]["hps_checkpoint"][0]
    (reward,) = rewards.DNOHPSReward().load(name)
    (again,) = rewards.DNOHPSReward().load(name)
    assert again is reward  # loaded once
    assert not any(p.requires_grad for p in reward.parameters())

    image = _image()
    with torch.inference_mode():  # as ComfyUI's executor runs nodes
        out = rewards.DNOScoreImage().score(image, reward, prompt="a cat")
    from dno.rewards import load_hps_reward

    expected = load_hps_reward(path)(image.permute(0, 3, 1, 2), ["a cat"])
    mean, text = out["result"]
    assert mean == pytest.approx(float(expected.mean()), abs=1e-5)
    assert text.count(",") == 1 and out["ui"]["text"] == [text]


def test_managed_reward_gives_gradients_after_loading_in_inference_mode(pack):
    rewards, models = pack
    mlp, _ = fx.save_aesthetic_file(str(models / "dno_rewards"))
    model = fx.tiny_hf_clip(seed=7, hidden_act="quick_gelu")
    vision = {k: v for k, v in model.state_dict().items()
              if k.startswith(("vision_model.", "visual_projection."))}
    fx.save_safetensors(vision, str(models / "clip_vision" / "clip_vision_tiny.safetensors"))
    with torch.inference_mode():
        (reward,) = rewards.DNOAestheticReward().load(
            os.path.basename(mlp), "clip_vision_tiny.safetensors", "quick_gelu (OpenAI CLIP)")
    reward.prepare(torch.device("cpu"))
    images = torch.rand(1, 3, 48, 48).requires_grad_()
    reward(images).sum().backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0


def test_builtin_jpeg_and_combine_nodes(pack):
    rewards, _ = pack
    (bright,) = rewards.DNOBuiltinReward().make("brightness")
    (jpeg,) = rewards.DNOJPEGReward().make("incompressibility (larger files)", 90)
    (both,) = rewards.DNOCombineRewards().combine(bright, 2.0, reward_2=jpeg, weight_2=0.5)
    assert not both.differentiable
    image = _image()
    images = image.permute(0, 3, 1, 2)
    expected = 2.0 * bright(images) + 0.5 * jpeg(images)
    mean, _ = rewards.DNOScoreImage().score(image, both)["result"]
    assert mean == pytest.approx(float(expected.mean()), rel=1e-6)


def test_missing_file_name_is_a_clear_error(pack):
    rewards, _ = pack
    with pytest.raises(rewards.RewardFileError, match="HPSv2 file 'gone.pt'.*models/dno_rewards"):
        rewards.DNOHPSReward().load("gone.pt")


def test_a_text_reward_without_a_prompt_names_the_input_to_fill(pack):
    """HPSv2 (or a sum holding it) with an empty or blank reward_prompt: the error names the input
    on the node and says what to type there, on the DNO nodes and on DNO Score Image."""
    rewards, models = pack
    sampler = __import__(rewards.__name__.rsplit(".", 1)[0] + ".sampler", fromlist=["x"])
    path, _ = fx.save_hps_file(str(models / "dno_rewards"))
    (hps,) = rewards.DNOHPSReward().load(os.path.basename(path))
    (combined,) = rewards.DNOCombineRewards().combine(rewards.DNOBuiltinReward().make("brightness")[0], 1.0,
                                                      reward_2=hps, weight_2=0.5)
    args = dict(vae=object(), sampler_mode=list(sampler.MODES)[0], opt_steps=2, lr=0.01, method="auto",
                precision="fp32", time_budget=0.0)
    for reward in (hps, combined):
        for blank in ("", "   \n"):
            with pytest.raises(ValueError, match="reward_prompt on the DNO node is empty.*positive prompt"):
                sampler.settings_from(reward=reward, reward_prompt=blank, **args)
        assert sampler.settings_from(reward=reward, reward_prompt="a cat", **args).prompts == ["a cat"]
        with pytest.raises(ValueError, match="prompt on the DNO Score Image node is empty"):
            rewards.DNOScoreImage().score(_image(), reward, prompt=" ")
    # rewards of the pixels alone need no text
    (brightness,) = rewards.DNOBuiltinReward().make("brightness")
    assert sampler.settings_from(reward=brightness, reward_prompt="", **args).prompts is None


def test_score_image_of_one_pixel_is_finite(pack):
    rewards, _ = pack
    for kind in ("contrast", "brightness", "saturation"):
        (reward,) = rewards.DNOBuiltinReward().make(kind)
        out = rewards.DNOScoreImage().score(_image(batch=1, size=1), reward)
        assert out["result"][0] == out["result"][0] and abs(out["result"][0]) < float("inf"), (kind, out)
    (contrast,) = rewards.DNOBuiltinReward().make("contrast")
    assert rewards.DNOScoreImage().score(_image(batch=1, size=1), contrast)["result"][0] == 0.0
