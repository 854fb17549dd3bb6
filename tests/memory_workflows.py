"""DNO workflows back to back through ComfyUI's own executor, and what memory they leave behind.

Run by tests/test_memory_release.py in a fresh process per device (``--device cpu|cuda``), so
every counter starts from this process alone. The prompts run through ``execution.PromptExecutor``,
the object the server's prompt worker drives, with its real output cache (a node's outputs stay
cached until a later prompt drops the node), without HTTP; like the prompt worker it collects
garbage and empties the allocator's cache after each prompt. In-process because the counters
that can tell a leaked tensor from noise live in the process: every tensor Python can reach
(bytes per device, and how many still carry an autograd graph), ``torch.cuda.memory_allocated``,
and ComfyUI's list of loaded models. The process's resident memory is reported too (after
``malloc_trim``), a coarser view.

Workflows (the example workflows, shrunk; the reward a tiny CLIP-score model from
models/dno_rewards, so that a reward model is loaded):

* ``plain``: the plain KSampler half of dno_txt2img_ksampler (no DNO);
* ``sampler``: dno_sampler_custom_advanced: DNO Sampler -> SamplerCustomAdvanced; the DNO
  Sampler's SAMPLER stays in the output cache;
* ``controlnet``: dno_controlnet: a ControlNet in the conditioning, DNO KSampler.

Order: plain, then two rounds of (sampler, controlnet, plain); a census after each prompt, one
after ComfyUI unloads every model. The JSON written to ``--out`` holds the censuses, what the
reward model looked like each time DNO scored with it, and each declared model load.
"""
from __future__ import annotations

import argparse
import asyncio
import copy
import ctypes
import gc
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import uuid
import warnings
import weakref
from pathlib import Path

import torch

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
sys.path.insert(0, str(TESTS))

API = REPO / "example_workflows" / "api"
CKPT = "v1-5-pruned-emaonly.safetensors"
CONTROLNET = "control_v11p_sd15_canny_fp16.safetensors"
CLIP_FILE = "tiny_open_clip.safetensors"
PROMPT_TEXT = "a red apple on a wooden table"
PLAIN_NODES = ("1", "2", "3", "4", "10", "11", "12")     # dno_txt2img_ksampler without DNO
STARTED = time.monotonic()


def import_comfy(device: str):
    """ComfyUI on ``device`` with its default memory management (smart memory on)."""
    from comfy_host import comfyui_path
    root = comfyui_path()
    sys.path.insert(0, str(root))
    import comfy.options  # noqa: F401  (keeps ComfyUI from parsing our argv)
    from comfy.cli_args import args
    args.cpu = device == "cpu"
    import comfy.model_management as mm
    if (mm.get_torch_device().type == "cpu") != (device == "cpu"):
        raise SystemExit(f"ComfyUI chose {mm.get_torch_device()} for --device {device}")
    return mm


def lay_out_folders(base: Path, models: Path) -> None:
    import folder_paths
    for sub in ("output", "input", "temp"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    folder_paths.set_output_directory(str(base / "output"))
    folder_paths.set_input_directory(str(base / "input"))
    folder_paths.set_temp_directory(str(base / "temp"))
    for kind in ("checkpoints", "controlnet", "dno_rewards"):
        folder_paths.add_model_folder_path(kind, str(models / kind), is_default=True)
    import numpy as np
    from PIL import Image
    Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)).save(
        base / "input" / "example.png")


def load_nodes(base: Path):
    """ComfyUI's built-in nodes, the two extras the workflows use, and this repository as a custom
    node (linked under the name users give it); returns the node pack's module name."""
    import nodes
    extras = Path(nodes.__file__).parent / "comfy_extras"
    for name in ("nodes_custom_sampler.py", "nodes_canny.py"):
        assert asyncio.run(nodes.load_custom_node(str(extras / name), module_parent="comfy_extras")), name
    link = base / "custom_nodes" / "comfyui-dno"
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(REPO)
    assert asyncio.run(nodes.load_custom_node(str(link))), "the node pack did not load"
    return nodes.NODE_CLASS_MAPPINGS["DNOSampler"].__module__.rsplit(".nodes.", 1)[0]


class Probes:
    """Test instrumentation: what the reward model looks like whenever DNO scores with it, and
    every load the DNO sampler declares."""

    def __init__(self, pack: str, mm):
        self.scores, self.loads, self.reward = [], [], lambda: None
        rewards = sys.modules[pack + ".nodes.rewards"]
        engine = sys.modules[pack + ".nodes.engine"]
        score, load = rewards.ManagedReward.score, engine.load_run_models
        probes = self

        def probed_score(reward, images, prompts=None):
            probes.reward = weakref.ref(reward)
            param = next(reward.inner.parameters())
            probes.scores.append({
                "loaded": any(m is reward.patcher for m in mm.loaded_models()),
                "dtype": str(param.dtype).replace("torch.", ""), "device": param.device.type,
                "grad": torch.is_grad_enabled() and images.requires_grad,
                "model_size": reward.patcher.model_size(),
            })
            return score(reward, images, prompts)

        def probed_load(patchers, memory_required, minimum_memory_required):
            unet = patchers[0].model
            computes = getattr(unet, "manual_cast_dtype", None) or unet.get_dtype()
            probes.loads.append({"models": [type(p.model).__name__ for p in patchers],
                                 "unet_computes": str(computes).replace("torch.", ""),
                                 "memory_required": int(memory_required),
                                 "minimum_memory_required": int(minimum_memory_required)})
            return load(patchers, memory_required, minimum_memory_required)

        rewards.ManagedReward.score = probed_score
        engine.load_run_models = probed_load


class Server:
    """What the executor asks of the server: no client, so nothing is sent."""
    client_id = None
    last_node_id = None
    last_prompt_id = None
    sockets_metadata = {}

    def send_sync(self, *args, **kwargs):
        pass

    def queue_updated(self):
        pass


def shrink(api: dict, size: int, steps: int, opt_steps: int) -> dict:
    api = copy.deepcopy(api)
    for node in api.values():
        ins = node["inputs"]
        if node["class_type"] == "EmptyLatentImage":
            ins.update(width=size, height=size)
        if node["class_type"] in ("DNOKSampler", "KSampler", "BasicScheduler"):
            ins["steps"] = steps
        if node["class_type"] in ("DNOKSampler", "DNOSampler"):
            ins.update(opt_steps=opt_steps, lr=0.05, preview_every=0, reward_prompt=PROMPT_TEXT)
    return api


def with_clip_reward(api: dict) -> dict:
    """The workflow with its built-in reward replaced by the CLIP score of the tiny CLIP file."""
    for node in api.values():
        if node["class_type"] == "DNOBuiltinReward":
            node["class_type"] = "DNOCLIPScoreReward"
            node["inputs"] = {"clip_model": CLIP_FILE, "clip_activation": "gelu (LAION / open_clip)",
                              "scale": 100.0}
    return api


def workflows(size: int, steps: int, opt_steps: int) -> dict:
    def load(name):
        return json.loads((API / f"{name}.json").read_text())
    txt2img = load("dno_txt2img_ksampler")
    plain = {k: v for k, v in txt2img.items() if k in PLAIN_NODES}
    return {
        "plain": shrink(plain, size, steps, opt_steps),
        "sampler": with_clip_reward(shrink(load("dno_sampler_custom_advanced"), size, steps, opt_steps)),
        "controlnet": with_clip_reward(shrink(load("dno_controlnet"), size, steps, opt_steps)),
    }


def trim_heap() -> None:
    """Hand freed heap memory back to the system (glibc), so the resident size means something."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def census(mm, device: torch.device) -> dict:
    """Every tensor Python can reach (unique storages, bytes per device type; tensors that still
    carry an autograd graph), the allocator's counter, ComfyUI's loaded models, resident memory."""
    import psutil
    gc.collect()
    cuda = {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        cuda["allocated_with_workspaces"] = torch.cuda.memory_allocated(device)
        # cuBLAS keeps a workspace per stream it ran on (the CUDA-graph capture stream too), from
        # the caching allocator: not a tensor of anyone's, and freed here so it does not count
        if hasattr(torch._C, "_cuda_clearCublasWorkspaces"):
            torch._C._cuda_clearCublasWorkspaces()
        cuda["allocated"] = torch.cuda.memory_allocated(device)
    storages, graphs = {}, 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")        # isinstance() on deprecated module attributes
        for obj in gc.get_objects():
            try:
                if not torch.is_tensor(obj) or obj.is_meta:
                    continue
                if obj.grad_fn is not None:
                    graphs += 1
                storage = obj.untyped_storage()
                storages[(obj.device.type, storage.data_ptr(), storage.nbytes())] = storage.nbytes()
            except (RuntimeError, ReferenceError):     # tensors without storage (sparse, wrappers)
                continue
    per_device = {}
    for (kind, _, _), nbytes in storages.items():
        per_device[kind] = per_device.get(kind, 0) + nbytes
    trim_heap()
    loaded = [{"model": type(m.model).__name__, "device": str(m.load_device), "loaded_bytes": int(m.loaded_size())}
              for m in mm.loaded_models()]
    return {"tensor_bytes": per_device, "graph_tensors": graphs, "rss": psutil.Process().memory_info().rss,
            "cuda": cuda, "loaded_models": loaded, "time": round(time.monotonic() - STARTED, 1)}


def module_bytes(module: torch.nn.Module) -> dict:
    """Bytes of a module's tensors (parameters and buffers, persistent or not) per device type,
    each rounded up as the CUDA caching allocator rounds a block (512 bytes) on a GPU."""
    storages = {}
    for t in list(module.parameters()) + list(module.buffers()):
        storage = t.untyped_storage()
        storages[(t.device.type, storage.data_ptr())] = storage.nbytes()
    out = {}
    for (kind, _), nbytes in storages.items():
        out[kind] = out.get(kind, 0) + (-(-nbytes // 512) * 512 if kind == "cuda" else nbytes)
    return out


def tensors_reachable(root, skip_types) -> list:
    """Tensors reachable from ``root`` through plain Python objects, not through models (whose
    memory ComfyUI manages): (shape, dtype, device) of each."""
    seen, found, stack = set(), [], [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if torch.is_tensor(obj):
            found.append((tuple(obj.shape), str(obj.dtype), obj.device.type))
            continue
        if isinstance(obj, skip_types) or isinstance(obj, type):
            continue
        stack.extend(gc.get_referents(obj))
    return found


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), required=True)
    ap.add_argument("--models", required=True, help="folder with checkpoints/, controlnet/, dno_rewards/")
    ap.add_argument("--out", required=True)
    ap.add_argument("--size", type=int, default=64, help="image side in pixels")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--opt-steps", type=int, default=2)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    base = Path(tempfile.mkdtemp(prefix="dno-memory-"))
    try:
        run_all(args, base)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def run_all(args, base: Path) -> None:
    mm = import_comfy(args.device)
    device = mm.get_torch_device()
    lay_out_folders(base, Path(args.models))
    pack = load_nodes(base)
    probes = Probes(pack, mm)
    import comfy.model_patcher
    import comfy.sd
    import execution

    executor = execution.PromptExecutor(Server(), cache_type=execution.CacheType.CLASSIC,
                                        cache_args={"lru": 0, "ram": 0})
    flows = workflows(args.size, args.steps, args.opt_steps)
    record = {"device": str(device), "censuses": [], "cached_sampler": [], "errors": []}

    def run(name: str) -> None:
        prompt = flows[name]
        prompt_id = uuid.uuid4().hex
        valid = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
        if not valid[0]:
            raise SystemExit(f"{name} is not a valid prompt: {valid[1]} {valid[3]}")
        executor.execute(prompt, prompt_id, {}, valid[2])
        if not executor.success:
            record["errors"].append({name: [m for m in executor.status_messages if m[0] == "execution_error"]})
            raise SystemExit(f"{name} failed: {executor.status_messages[-1]}")
        gc.collect()               # what the prompt worker does after a prompt
        mm.soft_empty_cache()
        if name == "sampler":      # the DNO Sampler's SAMPLER, as the output cache keeps it
            node = next(k for k, v in prompt.items() if v["class_type"] == "DNOSampler")
            entry = executor.caches.outputs.get(node)
            sampler = entry.outputs[0][0]
            skip = (torch.nn.Module, comfy.model_patcher.ModelPatcher, comfy.sd.VAE)
            record["cached_sampler"].append({"type": type(sampler).__name__,
                                             "result": getattr(sampler, "result", "missing") is not None,
                                             "tensors": tensors_reachable(entry, skip)})
        record["censuses"].append({"after": name, **census(mm, device)})

    record["censuses"].append({"after": "start", **census(mm, device)})
    run("plain")
    for _ in range(2):
        for name in ("sampler", "controlnet", "plain"):
            run(name)
    reward = probes.reward()
    if reward is None:
        raise SystemExit("no reward model was scored")
    sizes = module_bytes(reward.inner)
    record["reward_tensor_bytes"] = sum(sizes.values())
    record["reward_cuda_bytes"] = sizes.get("cuda", 0)
    del reward
    mm.unload_all_models()
    gc.collect()
    mm.soft_empty_cache()
    record["censuses"].append({"after": "unload_all_models", **census(mm, device)})
    record["reward_scores"] = probes.scores
    record["declared_loads"] = probes.loads
    Path(args.out).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("DNO_TEST_THREADS", "2")))
    main()
