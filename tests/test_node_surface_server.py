"""The DNO nodes' surface through a real ComfyUI server (0.3.75, or $COMFYUI_PATH) on a tiny SD1.5
checkpoint: the reward-history plot (its pixels), the history of DNO Sampler runs inside
SamplerCustomAdvanced, and tooltips / descriptions in /object_info.
"""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image

from comfy_host import ComfyServer
from plot_reading import assert_curve_matches
from tiny_checkpoints import sd15_checkpoint

pytestmark = pytest.mark.server

CKPT = "tiny-sd15.safetensors"
STEP_LINE = re.compile(r"DNO step (\d+)/(\d+)\s+reward (-?[\d.]+)")
PLOT_SIZE = (400, 300)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    models = tmp_path_factory.mktemp("models")
    ckpt = sd15_checkpoint(models, vae="taesd", filename=CKPT)
    with ComfyServer(models={"checkpoints": [ckpt]}, threads=2) as srv:
        assert not srv.custom_node_import_failed(), srv.log_tail()
        yield srv


def base_graph():
    """Checkpoint, prompts, a 64 px latent, the brightness reward and a regulariser."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a bright sky", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "dark", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "DNOBuiltinReward", "inputs": {"kind": "brightness"}},
        "6": {"class_type": "DNONoiseRegularizer",
              "inputs": {"gamma": 1.0, "block_exponent": 1, "permutations": 0, "seed": 0}},
    }


DNO_SETTINGS = {"vae": ["1", 2], "reward": ["5", 0], "regularizer": ["6", 0],
                "sampler_mode": "SDE (eta=1, paper default)", "opt_steps": 4, "lr": 0.1, "method": "auto",
                "precision": "fp32", "time_budget": 0.0, "reward_prompt": "", "preview_every": 0}


def plot_nodes(key, history_source, prefix):
    """DNO Plot Reward History of ``history_source`` and a SaveImage of its IMAGE."""
    return {
        key: {"class_type": "DNOPlotRewardHistory",
              "inputs": {"reward_history": history_source, "width": PLOT_SIZE[0], "height": PLOT_SIZE[1]}},
        key + "0": {"class_type": "SaveImage", "inputs": {"images": [key, 0], "filename_prefix": prefix}},
    }


def run(server, api, timeout=240):
    return server.run(api, timeout)


def logged_runs(log):
    """Mean reward per step of each DNO run in the log (a run starts at step 0), 4 decimals."""
    runs = []
    for m in STEP_LINE.finditer(log):
        if int(m.group(1)) == 0:
            runs.append([])
        runs[-1].append(float(m.group(3)))
    return runs


def saved_image(server, entry, prefix):
    pattern = re.compile(re.escape(prefix) + r"_\d+_\.png")
    files = [p for p in server.output_files(entry) if pattern.fullmatch(p.name)]
    assert len(files) == 1, f"expected one image saved with prefix {prefix}, got {files}"
    return np.asarray(Image.open(files[0]).convert("RGB")).astype(int)


def plotted_history(entry, node):
    (text,) = entry["outputs"][node]["dno_reward_history"]
    return json.loads(text)


def mean_rewards(history):
    return [float(np.mean(s["reward"])) for s in history["steps"]]


def test_ksampler_reward_history_plot_through_the_server(server):
    api = base_graph()
    api["7"] = {"class_type": "DNOKSampler", "inputs": {
        "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
        "seed": 3, "steps": 3, "cfg": 5.0, "scheduler": "normal", "denoise": 1.0, **DNO_SETTINGS}}
    api.update(plot_nodes("20", ["7", 2], "plot_ksampler"))
    entry, log = run(server, api)
    (logged,) = logged_runs(log)
    history = plotted_history(entry, "20")
    rewards = mean_rewards(history)
    print("logged rewards:", logged, "plotted:", rewards)
    assert [s["step"] for s in history["steps"]] == list(range(5))
    assert rewards == pytest.approx(logged, abs=1e-4)        # the history is this run's

    pixels = saved_image(server, entry, "plot_ksampler")     # the IMAGE output, saved by SaveImage
    assert pixels.shape == (PLOT_SIZE[1], PLOT_SIZE[0], 3)
    assert_curve_matches(pixels, rewards)
    # the node's own preview shows the same picture
    (preview,) = server.output_files({"outputs": {"20": entry["outputs"]["20"]}})
    assert np.abs(np.asarray(Image.open(preview).convert("RGB")).astype(int) - pixels).max() <= 1


def test_sampler_custom_advanced_history_per_run(server):
    """One DNO Sampler feeding two SamplerCustomAdvanced nodes (two seeds): each DNO Reward
    History, given its SamplerCustomAdvanced's latent, runs after that sampling and returns that
    run's history (one reads the output, the other the denoised_output)."""
    api = base_graph()
    api["7"] = {"class_type": "DNOSampler", "inputs": dict(DNO_SETTINGS, opt_steps=3)}
    api["9"] = {"class_type": "CFGGuider",
                "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "cfg": 5.0}}
    api["10"] = {"class_type": "BasicScheduler",
                 "inputs": {"model": ["1", 0], "scheduler": "normal", "steps": 3, "denoise": 1.0}}
    for seed, sampled, history, output in ((11, "11", "13", 0), (12, "12", "14", 1)):
        api[f"8{seed}"] = {"class_type": "RandomNoise", "inputs": {"noise_seed": seed}}
        api[sampled] = {"class_type": "SamplerCustomAdvanced", "inputs": {
            "noise": [f"8{seed}", 0], "guider": ["9", 0], "sampler": ["7", 0], "sigmas": ["10", 0],
            "latent_image": ["4", 0]}}
        api[history] = {"class_type": "DNORewardHistory",
                        "inputs": {"history": ["7", 1], "latent": [sampled, output]}}
        api.update(plot_nodes(f"2{seed}", [history, 0], f"plot_seed{seed}"))
    entry, log = run(server, api)
    runs = logged_runs(log)
    assert len(runs) == 2 and all(len(r) == 4 for r in runs), log[-3000:]
    plotted = [mean_rewards(plotted_history(entry, f"2{seed}")) for seed in (11, 12)]
    print("logged runs:", runs, "plotted:", plotted)
    assert plotted[0] != pytest.approx(plotted[1], abs=1e-4)   # two seeds, two different runs
    # each history is one of the runs, and together they are both
    matches = [[i for i, r in enumerate(runs) if p == pytest.approx(r, abs=1e-4)] for p in plotted]
    assert sorted(m[0] for m in matches if len(m) == 1) == [0, 1], (matches, runs, plotted)
    assert_curve_matches(saved_image(server, entry, "plot_seed11"), plotted[0])


def test_reward_history_of_a_latent_dno_did_not_make_is_a_clear_error(server):
    api = base_graph()
    api["7"] = {"class_type": "DNOSampler", "inputs": dict(DNO_SETTINGS, opt_steps=1)}
    api["8"] = {"class_type": "RandomNoise", "inputs": {"noise_seed": 1}}
    api["9"] = {"class_type": "CFGGuider",
                "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "cfg": 5.0}}
    api["10"] = {"class_type": "BasicScheduler",
                 "inputs": {"model": ["1", 0], "scheduler": "normal", "steps": 2, "denoise": 1.0}}
    api["11"] = {"class_type": "SamplerCustomAdvanced", "inputs": {
        "noise": ["8", 0], "guider": ["9", 0], "sampler": ["7", 0], "sigmas": ["10", 0], "latent_image": ["4", 0]}}
    api["12"] = {"class_type": "LatentMultiply", "inputs": {"samples": ["11", 0], "multiplier": 2.0}}
    api["13"] = {"class_type": "DNORewardHistory", "inputs": {"history": ["7", 1], "latent": ["12", 0]}}
    api.update(plot_nodes("20", ["13", 0], "plot_wrong"))
    entry = server.wait(server.queue(api), timeout=240)
    assert entry["status"]["status_str"] == "error"
    message = json.dumps(entry["status"]["messages"])
    assert "not one that its DNO Sampler produced" in message and "SamplerCustomAdvanced" in message, message


def test_every_dno_input_and_output_has_a_tooltip_and_every_node_a_description(server):
    info = server.object_info()
    ours = {name: node for name, node in info.items() if node["python_module"].startswith("custom_nodes.")}
    assert set(ours) == {name for name in info if name.startswith("DNO")}
    assert {"DNOSampler", "DNOKSampler", "DNONoiseRegularizer", "DNORewardHistory", "DNOPlotRewardHistory",
            "DNOScoreImage", "DNOAestheticRewardCLIPVision"} <= set(ours)
    missing = []
    for name, node in sorted(ours.items()):
        if not node.get("description", "").strip():
            missing.append(f"{name}: description")
        for section in ("required", "optional"):
            for input_name, spec in node["input"].get(section, {}).items():
                options = spec[1] if len(spec) > 1 else {}
                if not str(options.get("tooltip", "")).strip():
                    missing.append(f"{name}.{input_name}: tooltip")
        tooltips = node.get("output_tooltips") or []
        if len(tooltips) != len(node["output"]) or not all(str(t).strip() for t in tooltips):
            missing.append(f"{name}: output_tooltips {tooltips} for outputs {node['output']}")
    assert not missing, "\n".join(missing)
