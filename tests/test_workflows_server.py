"""The example workflows through a real ComfyUI server (0.3.75, or $COMFYUI_PATH).

The workflows in example_workflows/api are posted to /prompt as they are,
except for sizes and step counts turned down for a 2-core CPU. Every model file they name
exists under that name: tiny random-weight files in the real formats (tiny_checkpoints.py,
reward_fixtures.py). SDXL cannot be made tiny, so the SDXL Turbo workflow runs on the tiny
SD1.5-family file under the Turbo file's name: the graph (SDTurboScheduler sigmas, cfg 1) is the
one a user runs.
"""
from __future__ import annotations

import copy
import json
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from comfy_host import ComfyHostError, ComfyServer
from tiny_checkpoints import sd3_checkpoint, sd15_checkpoint, sd15_controlnet
from tests import reward_fixtures as fx
from workflow_format import api_to_ui, same_graph, ui_to_api

pytestmark = pytest.mark.server

REPO = Path(__file__).resolve().parents[1]
API_DIR = REPO / "example_workflows" / "api"
UI_DIR = REPO / "example_workflows"
CKPT = "v1-5-pruned-emaonly.safetensors"
CONTROLNET = "control_v11p_sd15_canny_fp16.safetensors"
# The files the newer examples name (what a user downloads; see pyproject's [tool.comfy] Models)
SD3_CKPT = "sd3.5_medium_incl_clips_t5xxlfp8scaled.safetensors"
TURBO_CKPT = "sd_xl_turbo_1.0_fp16.safetensors"
AESTHETIC_MLP = "sac+logos+ava1-l14-linearMSE.pth"
AESTHETIC_CLIP = "clip-vit-large-patch14.safetensors"
HPS_FILE = "HPS_v2.1_compressed.pt"
STEP_LINE = re.compile(r"DNO step (\d+)/(\d+)\s+reward (-?[\d.]+)")


def load_api(name):
    return json.loads((API_DIR / f"{name}.json").read_text())


def shrink(api, opt_steps=3, steps=4, size=64):
    """The same graph, sized for the CPU."""
    api = copy.deepcopy(api)
    for node in api.values():
        ins = node["inputs"]
        if node["class_type"] in ("EmptyLatentImage", "EmptySD3LatentImage"):
            ins.update(width=size, height=size)
        if node["class_type"] in ("DNOKSampler", "KSampler", "BasicScheduler"):
            ins["steps"] = steps
        if node["class_type"] == "SDTurboScheduler":      # already few-step: keep its count
            ins["steps"] = min(ins["steps"], steps)
        if node["class_type"] in ("DNOKSampler", "DNOSampler"):
            ins.update(opt_steps=opt_steps, precision="fp32", lr=0.05, preview_every=1)
    return api


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    models = tmp_path_factory.mktemp("models")
    sd15 = sd15_checkpoint(models, vae="taesd", filename=CKPT)
    fresh = sd15_checkpoint(models, vae="taesd", filename="fresh-copy.safetensors")
    sd3 = sd3_checkpoint(models, vae="taesd", filename="tiny-sd3.safetensors")
    controlnet = sd15_controlnet(models, filename=CONTROLNET)
    sd3_named = sd3_checkpoint(models, vae="taesd", filename=SD3_CKPT)
    turbo = sd15_checkpoint(models, vae="taesd", filename=TURBO_CKPT)
    rewards, clips = models / "dno_rewards", models / "clip_vision"
    rewards.mkdir()
    clips.mkdir()
    mlp, _ = fx.save_aesthetic_file(str(rewards))                  # the real file's name already
    clip, _ = fx.save_hf_clip_file(str(clips), hidden_act="quick_gelu")
    clip = Path(clip).rename(clips / AESTHETIC_CLIP)
    hps, _ = fx.save_hps_file(str(rewards))
    hps = Path(hps).rename(rewards / HPS_FILE)
    assert Path(mlp).name == AESTHETIC_MLP
    with ComfyServer(models={"checkpoints": [sd15, fresh, sd3, sd3_named, turbo], "controlnet": [controlnet],
                             "dno_rewards": [mlp, hps], "clip_vision": [clip]}, threads=2) as srv:
        assert not srv.custom_node_import_failed(), srv.log_tail()
        Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)).save(
            srv.input_dir / "example.png")
        yield srv


def run(server, api, timeout=240):
    mark = len(server.log())
    entry = server.wait(server.queue(api), timeout=timeout)
    log = server.log()[mark:]
    assert entry["status"]["status_str"] == "success", log[-4000:]
    return entry, log


def rewards_from(log):
    return [float(m.group(3)) for m in STEP_LINE.finditer(log)]


def image_of(server, entry, prefix):
    # Exact match: "DNO_txt2img" must not pick up "DNO_txt2img_plain_00001_.png".
    pattern = re.compile(re.escape(prefix) + r"_\d+_\.png")
    files = [p for p in server.output_files(entry) if pattern.fullmatch(p.name)]
    assert files, f"no image saved with prefix {prefix}"
    return np.asarray(Image.open(files[0]))


def test_ui_workflows_match_api(server):
    info = server.object_info()
    for api_file in sorted(API_DIR.glob("*.json")):
        ui_file = UI_DIR / api_file.name
        assert ui_file.exists(), f"{ui_file.name}: every API workflow has a UI-format twin"
        api = json.loads(api_file.read_text())
        ui = json.loads(ui_file.read_text())
        assert same_graph(ui_to_api(ui, info), api), f"{ui_file.name} is out of sync with api/{api_file.name}"
        assert same_graph(ui_to_api(api_to_ui(api, info), info), api)


def test_txt2img_reward_rises_and_image_differs(server):
    entry, log = run(server, shrink(load_api("dno_txt2img_ksampler")))
    rewards = rewards_from(log)
    print("server-logged DNO rewards:", rewards)
    assert len(rewards) == 4
    assert max(rewards[1:]) > rewards[0]
    dno, plain = image_of(server, entry, "DNO_txt2img"), image_of(server, entry, "DNO_txt2img_plain")
    assert dno.shape == plain.shape == (64, 64, 3)
    assert np.abs(dno.astype(int) - plain.astype(int)).mean() > 0.5
    assert dno.mean() > plain.mean()  # the reward is brightness


def test_sampler_custom_advanced_variant(server):
    entry, log = run(server, shrink(load_api("dno_sampler_custom_advanced")))
    rewards = rewards_from(log)
    assert len(rewards) == 4 and max(rewards[1:]) > rewards[0]
    assert image_of(server, entry, "DNO_custom_advanced").shape == (64, 64, 3)


def test_img2img_refinement(server):
    entry, log = run(server, shrink(load_api("dno_img2img_refine")))
    rewards = rewards_from(log)
    assert len(rewards) == 4 and max(rewards[1:]) > rewards[0]
    assert image_of(server, entry, "DNO_img2img").shape == (64, 64, 3)


def test_controlnet_workflow(server):
    """ControlNetLoader + ControlNetApplyAdvanced (a Canny map of an image) before DNO."""
    api = shrink(load_api("dno_controlnet"))
    assert api["6"]["inputs"]["control_net_name"] == CONTROLNET
    entry, log = run(server, api)
    rewards = rewards_from(log)
    print("server-logged DNO rewards with a ControlNet:", rewards)
    assert len(rewards) == 4 and max(rewards[1:]) > rewards[0]
    assert image_of(server, entry, "DNO_controlnet").shape == (64, 64, 3)


def test_example_workflows_are_all_tested():
    """A new example gets its own test below (and a thumbnail, test_packaging.py)."""
    tested = {"dno_txt2img_ksampler", "dno_sampler_custom_advanced", "dno_img2img_refine", "dno_controlnet",
              "dno_aesthetic_reward", "dno_sd3_sampler_custom_advanced", "dno_few_step_turbo"}
    assert {p.stem for p in API_DIR.glob("*.json")} == tested


def test_regularizers_save_the_node_default_permutations(server):
    default = server.object_info("DNONoiseRegularizer")["DNONoiseRegularizer"]["input"]["required"][
        "permutations"][1]["default"]
    assert default == 100
    for api_file in sorted(API_DIR.glob("*.json")):
        for node in json.loads(api_file.read_text()).values():
            if node["class_type"] == "DNONoiseRegularizer":
                assert node["inputs"]["permutations"] == default, api_file.name


def test_aesthetic_reward_workflow(server):
    """The LAION aesthetic predictor (MLP + CLIP ViT-L/14 from models/clip_vision) as the reward;
    the plain KSampler beside it has the same seed, and DNO Score Image scores both images."""
    api = shrink(load_api("dno_aesthetic_reward"))
    assert api["5"]["inputs"]["aesthetic_mlp"] == AESTHETIC_MLP and api["5"]["inputs"]["clip_model"] == AESTHETIC_CLIP
    entry, log = run(server, api)
    rewards = rewards_from(log)
    print("server-logged aesthetic rewards:", rewards)
    assert len(rewards) == 4 and max(rewards[1:]) > rewards[0]
    dno, plain = image_of(server, entry, "DNO_aesthetic"), image_of(server, entry, "DNO_aesthetic_plain")
    assert dno.shape == plain.shape == (64, 64, 3)
    scores = {key: float(entry["outputs"][key]["text"][0]) for key in ("13", "14")}
    # DNO's image is its best sample; the plain KSampler's is DNO's unoptimised step 0 (same seed)
    assert scores["13"] == pytest.approx(max(rewards), abs=1e-3), (scores, rewards)
    assert scores["14"] == pytest.approx(rewards[0], abs=1e-3), (scores, rewards)


def test_sd3_sampler_custom_advanced_workflow(server):
    """SD3 (a flow model: ModelSamplingSD3, 16-channel EmptySD3LatentImage) through
    SamplerCustomAdvanced with DNO Sampler as its SAMPLER and HPSv2.1 scoring the reward prompt."""
    api = shrink(load_api("dno_sd3_sampler_custom_advanced"))
    assert api["1"]["inputs"]["ckpt_name"] == SD3_CKPT and api["6"]["inputs"]["hps_checkpoint"] == HPS_FILE
    entry, log = run(server, api)
    rewards = rewards_from(log)
    print("server-logged HPSv2 rewards on SD3:", rewards)
    assert len(rewards) == 4 and max(rewards[1:]) > rewards[0]
    assert "model_type FLOW" in log, log[-3000:]
    assert image_of(server, entry, "DNO_sd3").shape == (64, 64, 3)


def test_few_step_turbo_workflow(server):
    """SDTurboScheduler's 4 sigmas, cfg 1 through BasicGuider: DNO optimises x_T and the per-step
    noises of a 4-step run."""
    api = shrink(load_api("dno_few_step_turbo"))
    assert api["9"]["inputs"]["steps"] == 4 and api["1"]["inputs"]["ckpt_name"] == TURBO_CKPT
    entry, log = run(server, api)
    rewards = rewards_from(log)
    print("server-logged saturation rewards, 4-step Turbo graph:", rewards)
    assert len(rewards) == 4 and max(rewards[1:]) > rewards[0]
    assert "over 4 sampling steps" in log, log[-2000:]
    assert image_of(server, entry, "DNO_turbo").shape == (64, 64, 3)


def plain_graph(ckpt, prefix, after_dno=False):
    api = shrink(load_api("dno_txt2img_ksampler"))
    api["1"]["inputs"]["ckpt_name"] = ckpt
    keep = {"1", "2", "3", "4", "10", "11", "12"} | ({"5", "6", "7"} if after_dno else set())
    api = {k: v for k, v in api.items() if k in keep}
    api["12"]["inputs"]["filename_prefix"] = prefix
    if after_dno:
        # the plain KSampler's latent is DNO's output times 0: an all-zero latent like
        # EmptyLatentImage's, but it forces the KSampler to run after DNO in the same graph
        api["20"] = {"class_type": "LatentMultiply", "inputs": {"samples": ["7", 0], "multiplier": 0.0}}
        api["10"]["inputs"]["latent_image"] = ["20", 0]
    return api


def test_plain_ksampler_after_dno_is_unchanged(server):
    before, _ = run(server, plain_graph("fresh-copy.safetensors", "before"))
    after, log = run(server, plain_graph("fresh-copy.safetensors", "after", after_dno=True))
    assert len(rewards_from(log)) == 4  # DNO really ran first, on the same cached model
    assert np.array_equal(image_of(server, before, "before"), image_of(server, after, "after"))


def test_cancel_returns_best_latent_promptly(server):
    api = shrink(load_api("dno_txt2img_ksampler"), opt_steps=400)
    for key in ("10", "11", "12"):
        api.pop(key)
    api["9"]["inputs"]["filename_prefix"] = "cancelled"
    mark = len(server.log())
    pid = server.queue(api)
    deadline = time.monotonic() + 120
    while len(rewards_from(server.log()[mark:])) < 3:
        assert time.monotonic() < deadline, server.log_tail()
        time.sleep(0.2)
    t0 = time.monotonic()
    server.interrupt()
    entry = server.wait(pid, timeout=60)
    took = time.monotonic() - t0
    log = server.log()[mark:]
    print(f"cancel took {took:.2f}s after {len(rewards_from(log))} scored samples")
    assert took < 10
    assert "cancelled by the user" in log or "cancelled" in log
    assert entry["status"]["status_str"] == "success"
    assert len(rewards_from(log)) < 400
    assert image_of(server, entry, "cancelled").shape == (64, 64, 3)


def wait_for_log(server, mark, text, timeout=120):
    """Return once ``text`` appears in the server log after position ``mark``."""
    deadline = time.monotonic() + timeout
    while text not in server.log()[mark:]:
        assert time.monotonic() < deadline, server.log_tail()
        time.sleep(0.02)


def queue_until(server, api, text, timeout=120):
    """Queue ``api``; return (prompt id, log mark) once ``text`` appears in the server log."""
    mark = len(server.log())
    pid = server.queue(api)
    wait_for_log(server, mark, text, timeout)
    return pid, mark


def message_kinds(entry):
    return [message[0] for message in entry["status"]["messages"]]


def test_cancel_before_the_first_sample_ends_the_prompt_as_comfyui_cancel(server):
    """Cancel while the first render runs: nothing to hand on, so the prompt ends as ComfyUI's own
    Cancel ends it (its interrupt, no error, no traceback), and the server takes the next prompt."""
    api = shrink(load_api("dno_txt2img_ksampler"), opt_steps=5, steps=600)
    for key in ("10", "11", "12"):
        api.pop(key)
    pid, mark = queue_until(server, api, "DNO: 5 updates over 600 sampling steps")
    server.interrupt()
    entry = server.wait(pid, timeout=120)
    log = server.log()[mark:]
    assert rewards_from(log) == [], "the interrupt came after the first sample: make the render slower"
    assert entry["status"]["status_str"] == "error"
    assert "execution_interrupted" in message_kinds(entry), entry["status"]
    assert "execution_error" not in message_kinds(entry), entry["status"]
    assert "Traceback" not in log, log[-3000:]
    run(server, shrink(load_api("dno_txt2img_ksampler")))     # the next prompt runs normally


def test_cancelling_twice_stops_the_nodes_after_dno(server):
    """The first Cancel ends DNO with its best latent (its image is saved); the second stops the
    graph, here a long plain KSampler that runs after DNO."""
    api = shrink(load_api("dno_txt2img_ksampler"), opt_steps=400)
    api["9"]["inputs"]["filename_prefix"] = "twice_dno"
    api["12"]["inputs"]["filename_prefix"] = "twice_plain"
    api["20"] = {"class_type": "LatentMultiply", "inputs": {"samples": ["7", 0], "multiplier": 0.0}}
    api["10"]["inputs"].update(latent_image=["20", 0], steps=3000)
    pid, mark = queue_until(server, api, "DNO step 2/400")
    server.interrupt()
    wait_for_log(server, mark, "DNO finished", timeout=60)
    time.sleep(0.5)                                           # into the plain KSampler's 3000 steps
    server.interrupt()
    entry = server.wait(pid, timeout=120)
    assert "execution_interrupted" in message_kinds(entry), entry["status"]
    saved = [p.name for p in server.output_dir.iterdir()]
    assert any(n.startswith("twice_dno") for n in saved), saved
    assert not any(n.startswith("twice_plain") for n in saved), saved


def test_bad_inputs_give_clear_node_errors(server):
    # zero sampling steps: rejected by validation with the input named
    api = shrink(load_api("dno_txt2img_ksampler"))
    for key in ("10", "11", "12"):  # else the valid plain branch still runs
        api.pop(key)
    api["7"]["inputs"]["steps"] = 0
    with pytest.raises(ComfyHostError, match="steps"):
        server.queue(api)
    # a 4-channel (SD1.5 VAE) latent into a 16-channel flow model
    api = shrink(load_api("dno_img2img_refine"))
    api["20"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny-sd3.safetensors"}}
    api["8"]["inputs"]["model"] = ["20", 0]
    entry = server.wait(server.queue(api), timeout=120)
    assert entry["status"]["status_str"] == "error"
    message = json.dumps(entry["status"]["messages"])
    assert "16-channel" in message and "latent" in message, message
    assert "Traceback" not in message.split("exception_message")[1][:300]
    # the same through SamplerCustomAdvanced + DNO Sampler: an SD1.5 (4-channel, non-empty) latent
    # into the SD3 model's guider
    api = shrink(load_api("dno_sampler_custom_advanced"))
    api["20"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny-sd3.safetensors"}}
    api["21"] = {"class_type": "LoadImage", "inputs": {"image": "example.png"}}
    api["22"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["21", 0], "vae": ["1", 2]}}
    api["9"]["inputs"]["model"] = api["10"]["inputs"]["model"] = ["20", 0]
    api["11"]["inputs"]["latent_image"] = ["22", 0]
    entry = server.wait(server.queue(api), timeout=120)
    assert entry["status"]["status_str"] == "error"
    message = json.dumps(entry["status"]["messages"])
    assert "latent_image" in message and "16-channel" in message, message
    assert "expected input" not in message, message


def test_ode_with_a_partial_window_is_refused_when_the_prompt_is_validated(server):
    """Refused by /prompt (validation, before anything loads or runs), naming the node inputs."""
    import sys
    sys.path.insert(0, str(REPO))
    from demo.comfy_run import describe_rejection

    api = shrink(load_api("dno_txt2img_ksampler"))
    for key in ("10", "11", "12"):  # else the valid plain branch still runs
        api.pop(key)
    api["7"]["inputs"].update(sampler_mode="ODE (eta=0)", opt_window=2)
    mark = len(server.log())
    with pytest.raises(ComfyHostError, match="rejected the workflow") as err:
        server.queue(api)
    shown = describe_rejection(str(err.value))
    assert "opt_window 2 < steps 4" in shown and "sampler_mode 'ODE (eta=0)'" in shown, shown
    assert shown.count("optimises nothing") == 1, shown  # ComfyUI lists it once per validated input
    assert "DNO step" not in server.log()[mark:]
    # the same with a window reaching x_T is valid and runs
    api["7"]["inputs"]["opt_window"] = 4
    entry, log = run(server, api)
    assert len(rewards_from(log)) == 4
    # DNO Sampler (SamplerCustomAdvanced): its steps are not known at validation
    api = shrink(load_api("dno_sampler_custom_advanced"))
    dno = next(k for k, v in api.items() if v["class_type"] == "DNOSampler")
    api[dno]["inputs"].update(sampler_mode="ODE (eta=0)", opt_window=1)
    with pytest.raises(ComfyHostError, match="opt_window") as err:
        server.queue(api)
    assert "SIGMAS" in describe_rejection(str(err.value))
