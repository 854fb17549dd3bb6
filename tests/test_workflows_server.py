"""The example workflows through a real ComfyUI server (0.3.75, or $COMFYUI_PATH).

The workflows in example_workflows/api are posted to /prompt as they are,
except for sizes and step counts turned down for a 2-core CPU. Every model file they name
exists under that name: tiny random-weight files in the real formats (example_models.py).
"""
from __future__ import annotations

import json
import re
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from comfy_host import ComfyHostError, ComfyServer
from example_models import (AESTHETIC_CLIP, AESTHETIC_MLP, API_DIR, CONTROLNET, HPS_FILE, REPO, SD3_CKPT,
                            TURBO_CKPT, UI_DIR, example_model_files, load_api, shrink, write_example_input)
from tiny_checkpoints import sd3_checkpoint, sd15_checkpoint
from workflow_format import api_to_ui, same_graph, ui_to_api

pytestmark = pytest.mark.server

STEP_LINE = re.compile(r"DNO step (\d+)/(\d+)\s+reward (-?[\d.]+)")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    models = tmp_path_factory.mktemp("models")
    files = example_model_files(models)
    files["checkpoints"] += [sd15_checkpoint(models, vae="taesd", filename="fresh-copy.safetensors"),
                             sd3_checkpoint(models, vae="taesd", filename="tiny-sd3.safetensors")]
    with ComfyServer(models=files, threads=2) as srv:
        assert not srv.custom_node_import_failed(), srv.log_tail()
        write_example_input(srv)
        yield srv


def run(server, api, timeout=240):
    return server.run(api, timeout)


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
    # DNO's image is decoded and saved before the second Cancel (a fixed sleep was too short on a
    # loaded machine); the plain KSampler's 3000 steps run after it, and the Cancel stops them.
    deadline = time.time() + 60
    while not any(p.name.startswith("twice_dno") for p in server.output_dir.iterdir()):
        assert time.time() < deadline, "DNO's image was not saved within 60 s of the first Cancel"
        time.sleep(0.1)
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


def test_the_thumbnail_script_renders_an_example_from_its_run(server, tmp_path):
    """make_thumbnails.render runs the workflow and writes the image of its DNO branch, with the
    workflow's digest in the JPEG comment."""
    import make_thumbnails

    mark = len(server.log())
    out = make_thumbnails.render(server, "dno_few_step_turbo", out_dir=tmp_path, size=64, opt_steps=1)
    assert len(rewards_from(server.log()[mark:])) == 2          # DNO ran: step 0 and one update
    image = Image.open(out)
    assert image.format == "JPEG" and image.size == (make_thumbnails.THUMBNAIL_SIZE,) * 2
    assert make_thumbnails.recorded_digest(out) == make_thumbnails.workflow_digest(load_api("dno_few_step_turbo"))
    saved = [p for p in server.output_dir.iterdir() if p.name.startswith("DNO_turbo")]
    newest = max(saved, key=lambda p: p.stat().st_mtime)
    expected = Image.open(newest).convert("RGB").resize(image.size, Image.LANCZOS)

    def distance(a, b):
        return np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).mean()

    assert distance(image, expected) < 3                                        # JPEG's loss only
    assert distance(image, expected.transpose(Image.FLIP_LEFT_RIGHT)) > 3 * distance(image, expected)


def test_the_server_lists_every_template_and_serves_its_thumbnail(server):
    """What the template browser asks for: /workflow_templates lists the pack's templates (the UI
    files, not api/), and /api/workflow_templates/<pack>/<name>.jpg is the committed thumbnail."""
    listed = server._request("GET", "/workflow_templates")
    assert sorted(listed["comfyui-dno"]) == sorted(p.stem for p in API_DIR.glob("*.json"))
    for name in listed["comfyui-dno"]:
        with urllib.request.urlopen(f"{server.url}/api/workflow_templates/comfyui-dno/{name}.jpg", timeout=10) as r:
            assert r.headers["Content-Type"] == "image/jpeg", name
            assert r.read() == (UI_DIR / f"{name}.jpg").read_bytes(), name
