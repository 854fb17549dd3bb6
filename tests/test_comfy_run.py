"""demo.comfy_run: the example workflow on a given checkpoint through a real ComfyUI server."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from tiny_checkpoints import sd15_checkpoint, sd15_controlnet

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from demo import comfy_run  # noqa: E402

SMALL = ["--width", "64", "--height", "64", "--steps", "4", "--opt-steps", "3", "--precision", "fp32",
         "--threads", "2"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return sd15_checkpoint(tmp_path_factory.mktemp("ckpt"), vae="taesd", filename="tiny-sd15.safetensors")


@pytest.mark.server
def test_runs_workflow_streams_steps_and_writes_outputs(checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    status = comfy_run.main(["--checkpoint", str(checkpoint), *SMALL, "--prompt", "a red barn",
                             "--reward", "brightness", "--out", str(out)])
    printed = capsys.readouterr()
    assert status == 0, printed.err

    rewards = json.loads((out / "rewards.json").read_text())
    assert len(rewards["rewards"]) == 3 + 1  # the initial sample and one per DNO step
    assert [s["step"] for s in rewards["steps"]] == [0, 1, 2, 3]
    assert max(rewards["best"]) > rewards["rewards"][0]
    assert rewards["best"] == list(np.maximum.accumulate(rewards["rewards"]))

    step_lines = [line for line in printed.out.splitlines() if line.startswith("DNO step")]
    assert [line.split()[2] for line in step_lines] == ["0/3", "1/3", "2/3", "3/3"]
    assert printed.out.index("DNO step 3/3") < printed.out.index("done in")

    images = sorted(p.name for p in out.glob("*.png") if p.name != "rewards.png")
    assert images == ["DNO_txt2img_00001_.png", "DNO_txt2img_plain_00001_.png"]
    assert np.asarray(Image.open(out / images[0])).shape == (64, 64, 3)
    plot = Image.open(out / "rewards.png")
    assert plot.size[0] > 200 and len(np.unique(np.asarray(plot.convert("L")))) > 2  # drawn, not blank

    sent = json.loads((out / "prompt.json").read_text())
    assert sent["1"]["inputs"]["ckpt_name"] == "tiny-sd15.safetensors"
    assert sent["2"]["inputs"]["text"] == "a red barn"  # the positive prompt, not the negative
    assert sent["3"]["inputs"]["text"] == "blurry, lowres"
    assert sent["7"]["inputs"]["opt_steps"] == 3 and sent["7"]["inputs"]["precision"] == "fp32"
    assert sent["10"]["inputs"]["steps"] == sent["7"]["inputs"]["steps"] == 4


@pytest.mark.server
@pytest.mark.server
def test_controlnet_workflow_with_the_given_controlnet(checkpoint, tmp_path, capsys):
    image = tmp_path / "layout.png"
    Image.fromarray((np.random.default_rng(1).random((64, 64, 3)) * 255).astype(np.uint8)).save(image)
    controlnet = sd15_controlnet(tmp_path / "cn", filename="my-canny.safetensors")
    out = tmp_path / "out"
    status = comfy_run.main(["--checkpoint", str(checkpoint), "--workflow", "dno_controlnet", *SMALL,
                             "--image", str(image), "--controlnet", str(controlnet), "--out", str(out)])
    printed = capsys.readouterr()
    assert status == 0, printed.err
    sent = json.loads((out / "prompt.json").read_text())
    assert sent["6"]["inputs"]["control_net_name"] == "my-canny.safetensors"
    assert len(json.loads((out / "rewards.json").read_text())["rewards"]) == 3 + 1
    assert (out / "DNO_controlnet_00001_.png").is_file()


def test_failed_prompt_shows_the_node_error(tmp_path, capsys):
    bad = tmp_path / "not-a-model.safetensors"
    save_file({"some.weight": torch.zeros(3)}, str(bad))
    status = comfy_run.main(["--checkpoint", str(bad), *SMALL, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert status == 1
    assert "CheckpointLoaderSimple" in err and "node 1" in err, err
    assert not (tmp_path / "out" / "rewards.json").exists()


@pytest.mark.server
def test_rejected_prompt_names_the_bad_input(checkpoint, tmp_path, capsys):
    status = comfy_run.main(["--checkpoint", str(checkpoint), *SMALL, "--reward", "no-such-reward",
                             "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert status == 1
    assert "rejected" in err and "DNOBuiltinReward" in err and "no-such-reward" in err, err


def test_server_that_fails_to_start_shows_its_log(checkpoint, tmp_path, capsys):
    fake = tmp_path / "ComfyUI"
    (fake / "comfy").mkdir(parents=True)
    (fake / "main.py").write_text("import sys\nprint('boom: this host cannot start')\nsys.exit(3)\n")
    status = comfy_run.main(["--checkpoint", str(checkpoint), "--comfyui", str(fake), "--device", "cpu",
                             "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert status == 1
    assert "failed to start" in err and "boom: this host cannot start" in err, err


def test_bad_inputs_are_named(checkpoint, tmp_path, capsys):
    cases = [
        (["--checkpoint", str(tmp_path / "missing.safetensors")], ["--checkpoint", "no such file"]),
        (["--checkpoint", str(checkpoint), "--workflow", "no_such_flow"],
         ["--workflow", "no_such_flow", "dno_txt2img_ksampler"]),
        (["--checkpoint", str(checkpoint), "--workflow", "dno_img2img_refine"], ["--image"]),
        (["--checkpoint", str(checkpoint), "--workflow", "dno_img2img_refine", "--image", str(checkpoint),
          "--width", "64"], ["--width", "EmptyLatentImage"]),
        (["--checkpoint", str(checkpoint), "--workflow", "dno_controlnet", "--image", str(checkpoint)],
         ["--controlnet PATH"]),
        (["--checkpoint", str(checkpoint), "--workflow", "dno_controlnet", "--image", str(checkpoint),
          "--controlnet", str(tmp_path / "missing-cn.safetensors")], ["--controlnet", "no such file"]),
    ]
    for argv, words in cases:
        assert comfy_run.main([*argv, "--device", "cpu", "--out", str(tmp_path / "out")]) == 1
        err = capsys.readouterr().err
        assert all(w in err for w in words), (argv, err)


def test_step_lines_parse():
    log = ("noise\nDNO step 0/2  reward 0.4253  best 0.4253  noise probability 0.378\n"
           "DNO step 1/2  reward -1.5e-03  best 0.4253\nDNO step 2/2  reward nan  best 0.5\n")
    steps = comfy_run.parse_steps(log)
    assert [(s.step, s.total) for s in steps] == [(0, 2), (1, 2), (2, 2)]
    assert steps[0].probability == pytest.approx(0.378) and steps[1].probability is None
    assert steps[1].reward == pytest.approx(-1.5e-3) and np.isnan(steps[2].reward) and steps[2].best == 0.5
