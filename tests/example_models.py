"""Every model file the example workflows name, as tiny random-weight files in the real formats.

Not a test module. test_workflows_server.py and make_thumbnails.py run the examples through a
real ComfyUI server with these files under the names the workflows use, sized down by
``shrink`` for a CPU. SDXL cannot be made tiny (its detection pins large widths), so the SDXL
Turbo file name holds the tiny SD1.5-family checkpoint: the graph (SDTurboScheduler sigmas,
cfg 1) is the one a user runs.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
from PIL import Image

import reward_fixtures as fx
from tiny_checkpoints import sd3_checkpoint, sd15_checkpoint, sd15_controlnet

REPO = Path(__file__).resolve().parents[1]
API_DIR = REPO / "example_workflows" / "api"
UI_DIR = REPO / "example_workflows"

CKPT = "v1-5-pruned-emaonly.safetensors"
CONTROLNET = "control_v11p_sd15_canny_fp16.safetensors"
SD3_CKPT = "sd3.5_medium_incl_clips_t5xxlfp8scaled.safetensors"
TURBO_CKPT = "sd_xl_turbo_1.0_fp16.safetensors"
AESTHETIC_MLP = "sac+logos+ava1-l14-linearMSE.pth"
AESTHETIC_CLIP = "clip-vit-large-patch14.safetensors"
HPS_FILE = "HPS_v2.1_compressed.pt"
INPUT_IMAGE = "example.png"
DNO_NODES = ("DNOKSampler", "DNOSampler")


def load_api(name: str) -> dict:
    return json.loads((API_DIR / f"{name}.json").read_text())


def example_names() -> list[str]:
    return sorted(p.stem for p in API_DIR.glob("*.json"))


def shrink(api: dict, opt_steps: int = 3, steps: int = 4, size: int = 64) -> dict:
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
        if node["class_type"] in DNO_NODES:
            ins.update(opt_steps=opt_steps, precision="fp32", lr=0.05, preview_every=1)
    return api


def example_model_files(folder: Path) -> dict[str, list[Path]]:
    """The ``models`` argument of ComfyServer: every file the examples name, made in ``folder``."""
    folder = Path(folder)
    rewards, clips = folder / "dno_rewards", folder / "clip_vision"
    rewards.mkdir(parents=True, exist_ok=True)
    clips.mkdir(parents=True, exist_ok=True)
    mlp, _ = fx.save_aesthetic_file(str(rewards))                  # the real file's name already
    clip, _ = fx.save_hf_clip_file(str(clips), hidden_act="quick_gelu")
    hps, _ = fx.save_hps_file(str(rewards))
    return {
        "checkpoints": [sd15_checkpoint(folder, vae="taesd", filename=CKPT),
                        sd3_checkpoint(folder, vae="taesd", filename=SD3_CKPT),
                        sd15_checkpoint(folder, vae="taesd", filename=TURBO_CKPT)],
        "controlnet": [sd15_controlnet(folder, filename=CONTROLNET)],
        "dno_rewards": [Path(mlp), Path(hps).rename(rewards / HPS_FILE)],
        "clip_vision": [Path(clip).rename(clips / AESTHETIC_CLIP)],
    }


def write_example_input(server, size: int = 64) -> None:
    """The image the img2img and ControlNet examples load (LoadImage's example.png)."""
    pixels = (np.random.default_rng(0).random((size, size, 3)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(server.input_dir / INPUT_IMAGE)


def dno_save_node(api: dict) -> str:
    """The SaveImage node whose image comes from a DNO node (examples may save a plain one too)."""
    def upstream(key, seen):
        if key in seen:
            return False
        seen.add(key)
        node = api[key]
        if node["class_type"] in DNO_NODES:
            return True
        return any(upstream(v[0], seen) for v in node["inputs"].values() if isinstance(v, list))

    saves = [k for k, n in api.items() if n["class_type"] == "SaveImage" and upstream(k, set())]
    if len(saves) != 1:
        raise ValueError(f"expected one SaveImage fed by a DNO node, found {saves}")
    return saves[0]
