"""Run an example DNO workflow on a real checkpoint through a real ComfyUI host.

    python3 -m demo.comfy_run --checkpoint /path/to/v1-5-pruned-emaonly.safetensors \\
        [--workflow dno_txt2img_ksampler] [--width 512 --height 512 --steps 50 --opt-steps 20] \\
        [--precision bf16] [--prompt "..."] [--reward brightness] [--out outputs/comfy] \\
        [--comfyui /path/to/ComfyUI]

A ComfyUI server (``$COMFYUI_PATH``, ``--comfyui``, or ComfyUI 0.3.75 fetched once into
``.cache/comfyui``) is started with this repository as a custom node and the checkpoint linked
into its models folder. The API-format workflow from ``example_workflows/api/`` is posted
with the command-line overrides applied; every ``DNO step`` line the server logs is printed as
it appears. When the prompt finishes, the saved images, ``rewards.json`` and a reward-per-step
plot land in ``--out``.

Options left out keep the workflow's own values (512x512, 50 sampling steps, 20 DNO steps, bf16
for the txt2img example). ``main(argv)`` is the entry point; ``run(options)`` does the work and
returns a :class:`RunResult`.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import re
import shutil
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

REPO_ROOT = Path(__file__).resolve().parents[1]
WORKFLOW_DIR = REPO_ROOT / "example_workflows" / "api"
HARNESS_PATH = REPO_ROOT / "tests" / "comfy_host.py"
DEFAULT_WORKFLOW = "dno_txt2img_ksampler"
DEFAULT_OUT = REPO_ROOT / "outputs" / "comfy"

# ComfyUI's folder_paths.supported_pt_extensions: anything else is not listed as a checkpoint.
CHECKPOINT_EXTENSIONS = (".safetensors", ".sft", ".ckpt", ".pt", ".pt2", ".pth", ".bin", ".pkl")

# nodes/progress.py logs "DNO step 3/20  reward 0.4123  best 0.4200[  noise probability 0.9]".
_NUMBER = r"(-?(?:\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|nan|inf))"
STEP_LINE = re.compile(
    rf"DNO step (\d+)/(\d+)\s+reward {_NUMBER}\s+best {_NUMBER}(?:\s+noise probability {_NUMBER})?")

DNO_NODES = ("DNOKSampler", "DNOSampler")
SAMPLING_STEP_NODES = ("DNOKSampler", "KSampler", "BasicScheduler")


class ComfyRunError(RuntimeError):
    """A clear, user-facing failure: bad input, a host that did not start, a failed prompt."""


# --------------------------------------------------------------------------- options

@dataclass
class RunOptions:
    checkpoint: Path
    workflow: str = DEFAULT_WORKFLOW
    out: Path = DEFAULT_OUT
    comfyui: Optional[Path] = None
    # None = keep the workflow's own value
    width: Optional[int] = None
    height: Optional[int] = None
    steps: Optional[int] = None
    opt_steps: Optional[int] = None
    precision: Optional[str] = None
    lr: Optional[float] = None
    seed: Optional[int] = None
    prompt: Optional[str] = None
    negative: Optional[str] = None
    reward: Optional[str] = None
    image: Optional[Path] = None
    controlnet: Optional[Path] = None
    device: str = "auto"  # auto | cpu | gpu
    timeout: Optional[float] = None
    threads: int = field(default_factory=lambda: max(1, os.cpu_count() or 1))


@dataclass
class StepRecord:
    step: int
    total: int
    reward: float
    best: float
    probability: Optional[float] = None


@dataclass
class RunResult:
    steps: list[StepRecord]
    images: list[Path]
    plot: Optional[Path]
    rewards_json: Path
    seconds: float


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python3 -m demo.comfy_run",
        description="Run an example DNO workflow on your checkpoint through a real ComfyUI host. "
                    "Options left out keep the workflow's values.")
    p.add_argument("--checkpoint", type=Path, required=True,
                   help="checkpoint file (e.g. v1-5-pruned-emaonly.safetensors)")
    p.add_argument("--workflow", default=DEFAULT_WORKFLOW,
                   help=f"name in example_workflows/api/ or a path to an API-format .json "
                        f"(default {DEFAULT_WORKFLOW})")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default outputs/comfy)")
    p.add_argument("--comfyui", type=Path, default=None,
                   help="ComfyUI checkout to use (default $COMFYUI_PATH, else ComfyUI 0.3.75 cached "
                        "in .cache/comfyui)")
    p.add_argument("--width", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--steps", type=int, help="sampling steps")
    p.add_argument("--opt-steps", type=int, help="DNO optimisation steps")
    p.add_argument("--precision", choices=("bf16", "fp16", "fp32"))
    p.add_argument("--lr", type=float, help="DNO learning rate")
    p.add_argument("--seed", type=int)
    p.add_argument("--prompt", help="positive prompt")
    p.add_argument("--negative", help="negative prompt")
    p.add_argument("--reward", help="built-in reward (brightness, darkness, saturation, contrast, ...)")
    p.add_argument("--image", type=Path, help="input image for the img2img and ControlNet workflows")
    p.add_argument("--controlnet", type=Path, help="ControlNet .safetensors for the dno_controlnet workflow")
    p.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto",
                   help="auto: a CUDA GPU when torch sees one, else the CPU")
    p.add_argument("--timeout", type=float, default=None, help="give up after this many seconds")
    p.add_argument("--threads", type=int, default=max(1, os.cpu_count() or 1),
                   help="CPU threads for the server")
    return p


def options_from(argv: Optional[list[str]]) -> RunOptions:
    ns = build_parser().parse_args(argv)
    return RunOptions(**vars(ns))


# --------------------------------------------------------------------------- inputs

def check_checkpoint(path: Path) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise ComfyRunError(f"--checkpoint {str(path)!r}: no such file. Give the path to a checkpoint "
                            "file, e.g. --checkpoint ~/models/v1-5-pruned-emaonly.safetensors.")
    if not path.is_file():
        raise ComfyRunError(f"--checkpoint {str(path)!r} is not a file; give the checkpoint file itself.")
    if path.suffix.lower() not in CHECKPOINT_EXTENSIONS:
        raise ComfyRunError(f"--checkpoint {path.name!r}: ComfyUI lists checkpoints ending in "
                            f"{', '.join(CHECKPOINT_EXTENSIONS)}; rename or convert the file.")
    return path.resolve()


def available_workflows() -> list[str]:
    return sorted(p.stem for p in WORKFLOW_DIR.glob("*.json"))


def load_workflow(name: str) -> dict:
    """An API-format workflow by name (example_workflows/api/<name>.json) or by path."""
    candidate = Path(name).expanduser()
    path = candidate if candidate.suffix == ".json" and candidate.is_file() else WORKFLOW_DIR / f"{name}.json"
    if not path.is_file():
        raise ComfyRunError(f"--workflow {name!r}: not found (looked for {path}). Available: "
                            f"{', '.join(available_workflows())}, or a path to an API-format .json.")
    try:
        api = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ComfyRunError(f"--workflow {name!r}: {path} is not valid JSON ({err}).") from None
    if not isinstance(api, dict) or "nodes" in api or not all(
            isinstance(v, dict) and "class_type" in v for v in api.values()):
        raise ComfyRunError(f"--workflow {name!r}: {path} is not in ComfyUI's API format (save it with "
                            "'Export (API)'; the API versions of the examples are in example_workflows/api/).")
    return api


def nodes_of(api: dict, *class_types: str) -> list[dict]:
    return [node for node in api.values() if node["class_type"] in class_types]


def text_nodes_feeding(api: dict, input_name: str) -> list[dict]:
    """The CLIPTextEncode nodes wired into any node's ``input_name`` (positive / negative)."""
    ids = {value[0] for node in api.values() for key, value in node["inputs"].items()
           if key == input_name and isinstance(value, list)}
    return [api[i] for i in sorted(ids) if i in api and api[i]["class_type"] == "CLIPTextEncode"]


def _set(nodes: list[dict], key: str, value: Any, flag: str, where: str) -> None:
    targets = [n for n in nodes if key in n["inputs"]]
    if not targets:
        raise ComfyRunError(f"{flag}: this workflow has no {where} to apply it to; leave {flag} out.")
    for node in targets:
        node["inputs"][key] = value


def apply_overrides(api: dict, opts: RunOptions, checkpoint_name: str,
                    image_name: Optional[str] = None) -> dict:
    """A copy of ``api`` with the checkpoint and every given option set."""
    api = copy.deepcopy(api)
    loaders = nodes_of(api, "CheckpointLoaderSimple")
    if not loaders:
        raise ComfyRunError("this workflow has no CheckpointLoaderSimple node, so --checkpoint has "
                            "nowhere to go; use one of the example workflows.")
    for node in loaders:
        node["inputs"]["ckpt_name"] = checkpoint_name
    if opts.width is not None:
        _set(nodes_of(api, "EmptyLatentImage"), "width", opts.width, "--width", "EmptyLatentImage")
    if opts.height is not None:
        _set(nodes_of(api, "EmptyLatentImage"), "height", opts.height, "--height", "EmptyLatentImage")
    if opts.steps is not None:
        _set(nodes_of(api, *SAMPLING_STEP_NODES), "steps", opts.steps, "--steps", "sampler")
    if opts.opt_steps is not None:
        _set(nodes_of(api, *DNO_NODES), "opt_steps", opts.opt_steps, "--opt-steps", "DNO sampler")
    if opts.precision is not None:
        _set(nodes_of(api, *DNO_NODES), "precision", opts.precision, "--precision", "DNO sampler")
    if opts.lr is not None:
        _set(nodes_of(api, *DNO_NODES), "lr", opts.lr, "--lr", "DNO sampler")
    if opts.seed is not None:
        seeded = nodes_of(api, "DNOKSampler", "KSampler") + nodes_of(api, "RandomNoise")
        for node in seeded:
            key = "noise_seed" if node["class_type"] == "RandomNoise" else "seed"
            node["inputs"][key] = opts.seed
        if not seeded:
            raise ComfyRunError("--seed: this workflow has no seeded sampler; leave --seed out.")
    if opts.prompt is not None:
        _set(text_nodes_feeding(api, "positive"), "text", opts.prompt, "--prompt", "positive CLIPTextEncode")
    if opts.negative is not None:
        _set(text_nodes_feeding(api, "negative"), "text", opts.negative, "--negative", "negative CLIPTextEncode")
    if opts.reward is not None:
        _set(nodes_of(api, "DNOBuiltinReward"), "kind", opts.reward, "--reward", "DNOBuiltinReward")
    if image_name is not None:
        _set(nodes_of(api, "LoadImage"), "image", image_name, "--image", "LoadImage")
    if opts.controlnet is not None:
        _set(nodes_of(api, "ControlNetLoader"), "control_net_name", Path(opts.controlnet).name,
             "--controlnet", "ControlNetLoader")
    return api


def needed_input_images(api: dict) -> list[str]:
    return [n["inputs"]["image"] for n in nodes_of(api, "LoadImage")]


# --------------------------------------------------------------------------- host

def load_harness():
    """tests/comfy_host.py, the reusable real-host harness (imported by path, shared with pytest)."""
    module = sys.modules.get("comfy_host")
    if module is not None:
        return module
    if not HARNESS_PATH.is_file():
        raise ComfyRunError(f"the ComfyUI host harness {HARNESS_PATH} is missing; this script needs "
                            "the repository's tests/ folder.")
    spec = importlib.util.spec_from_file_location("comfy_host", HARNESS_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["comfy_host"] = module
    spec.loader.exec_module(module)
    return module


def resolve_host(harness, comfyui: Optional[Path]) -> Path:
    if comfyui is not None:
        path = Path(comfyui).expanduser().resolve()
        if not (path / "main.py").is_file() or not (path / "comfy").is_dir():
            raise ComfyRunError(f"--comfyui {str(comfyui)!r} is not a ComfyUI checkout (no main.py and "
                                "comfy/ there); point it at the folder holding ComfyUI's main.py.")
        return path
    try:
        return harness.comfyui_path()
    except harness.ComfyHostError as err:
        raise ComfyRunError(str(err)) from None


def use_cpu(device: str) -> bool:
    if device == "cpu":
        return True
    import torch
    has_gpu = torch.cuda.is_available()
    if device == "gpu" and not has_gpu:
        raise ComfyRunError("--device gpu: torch sees no CUDA device; use --device cpu or auto.")
    return not has_gpu


def describe_rejection(message: str) -> str:
    """Turn /prompt's JSON rejection (node_errors) into one readable line per problem."""
    start = message.find("{")
    try:
        body = json.loads(message[start:])
    except (ValueError, TypeError):
        return message
    lines = []
    error = body.get("error") or {}
    if error.get("message"):
        lines.append(f"{error['message']}: {error.get('details', '')}".rstrip(": "))
    for node_id, info in (body.get("node_errors") or {}).items():
        for e in info.get("errors", []):
            lines.append(f"node {node_id} ({info.get('class_type', '?')}): {e.get('message', '')}: "
                         f"{e.get('details', '')}".rstrip(": "))
    return "\n  ".join(lines) or message


def queue_whole(server, prompt: dict) -> str:
    """Queue ``prompt``; refuse it if any node failed validation.

    ComfyUI runs the outputs that did validate and only lists the others in ``node_errors``
    (a 200 answer), so a bad DNO input would otherwise quietly run just the plain branch.
    """
    request = urllib.request.Request(
        server.url + "/prompt", method="POST", headers={"Content-Type": "application/json"},
        data=json.dumps({"prompt": prompt, "client_id": server.client_id}).encode())
    try:
        with urllib.request.urlopen(request, timeout=60) as resp:
            answer = json.loads(resp.read())
    except urllib.error.HTTPError as err:
        body = err.read().decode(errors="replace")
        raise ComfyRunError("ComfyUI rejected the workflow:\n  " + describe_rejection(body)) from None
    if answer.get("node_errors"):
        raise ComfyRunError("ComfyUI rejected part of the workflow:\n  " + describe_rejection(json.dumps(answer)))
    return answer["prompt_id"]


def describe_failure(entry: dict) -> str:
    """The node error of a prompt that failed while executing."""
    for kind, data in entry.get("status", {}).get("messages", []):
        if kind == "execution_error":
            hint = ("\n  (is --checkpoint a complete model checkpoint ComfyUI can load, e.g. an SD1.5 "
                    "single-file .safetensors?)" if data.get("node_type") == "CheckpointLoaderSimple" else "")
            return (f"node {data.get('node_id')} ({data.get('node_type')}) failed: "
                    f"{data.get('exception_type', 'Error')}: {str(data.get('exception_message', '')).strip()}"
                    + hint)
        if kind == "execution_interrupted":
            return f"the prompt was interrupted at node {data.get('node_id')} ({data.get('node_type')})"
    return f"the prompt ended with status {entry.get('status', {}).get('status_str')!r}"


# --------------------------------------------------------------------------- progress

def parse_steps(text: str) -> list[StepRecord]:
    records = []
    for m in STEP_LINE.finditer(text):
        records.append(StepRecord(step=int(m.group(1)), total=int(m.group(2)), reward=float(m.group(3)),
                                  best=float(m.group(4)),
                                  probability=None if m.group(5) is None else float(m.group(5))))
    return records


def follow(server, prompt_id: str, log_from: int, timeout: Optional[float],
           on_line: Callable[[str], None], poll: float = 0.25) -> tuple[dict, str]:
    """Wait for ``prompt_id``, handing each new DNO step log line to ``on_line`` as it appears.

    Returns the history entry and the server log written while the prompt ran.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    seen = log_from
    pending = ""

    def drain() -> None:
        nonlocal seen, pending
        text = server.log()
        new, seen = text[seen:], len(text)
        pending += new
        *complete, pending = pending.split("\n")
        for line in complete:
            if STEP_LINE.search(line):
                on_line(line.strip())

    while True:
        drain()
        entry = server.history(prompt_id).get(prompt_id)
        if entry and entry.get("status", {}).get("status_str") in ("success", "error"):
            time.sleep(poll)  # the last log lines may land just after the history entry
            drain()
            return entry, server.log()[log_from:]
        if server.proc is None or server.proc.poll() is not None:
            raise ComfyRunError(f"ComfyUI exited while running the workflow; log tail:\n{server.log_tail()}")
        if deadline is not None and time.monotonic() > deadline:
            server.interrupt()
            raise ComfyRunError(f"the workflow did not finish within --timeout {timeout:.0f}s; "
                                f"log tail:\n{server.log_tail()}")
        time.sleep(poll)


# --------------------------------------------------------------------------- outputs

def write_rewards(path: Path, steps: list[StepRecord], meta: dict) -> Path:
    payload = {**meta,
               "rewards": [s.reward for s in steps],
               "best": [s.best for s in steps],
               "steps": [asdict(s) for s in steps]}
    path.write_text(json.dumps(payload, indent=2))
    return path


def plot_rewards(path: Path, steps: list[StepRecord], title: str) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    xs = [s.step for s in steps]
    ax.plot(xs, [s.reward for s in steps], "o-", label="reward of this step's sample")
    ax.plot(xs, [s.best for s in steps], "--", label="best so far (returned)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("DNO optimisation step")
    ax.set_ylabel("reward")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def copy_images(files: list[Path], out: Path) -> list[Path]:
    copied = []
    for f in files:
        if not f.is_file():
            raise ComfyRunError(f"the server reported {f.name} as saved, but the file is missing")
        dest = out / f.name
        shutil.copy2(f, dest)
        copied.append(dest)
    return copied


# --------------------------------------------------------------------------- run

def run(opts: RunOptions, echo: Callable[[str], None] = print) -> RunResult:
    """Run the workflow on the checkpoint through a ComfyUI server; write images, plot, rewards."""
    checkpoint = check_checkpoint(opts.checkpoint)
    api = load_workflow(opts.workflow)
    image_name = None
    if opts.image is not None:
        image = Path(opts.image).expanduser()
        if not image.is_file():
            raise ComfyRunError(f"--image {str(image)!r}: no such file.")
        image_name = image.name
    elif needed_input_images(api):
        raise ComfyRunError(f"--workflow {opts.workflow!r} starts from an input image; give one with "
                            "--image PATH.")
    models = {"checkpoints": [checkpoint]}
    if opts.controlnet is not None:
        controlnet = Path(opts.controlnet).expanduser()
        if not controlnet.is_file():
            raise ComfyRunError(f"--controlnet {str(controlnet)!r}: no such file.")
        models["controlnet"] = [controlnet.resolve()]
    elif nodes_of(api, "ControlNetLoader"):
        raise ComfyRunError(f"--workflow {opts.workflow!r} applies a ControlNet; give its file with "
                            "--controlnet PATH.")
    prompt = apply_overrides(api, opts, checkpoint.name, image_name)
    cpu = use_cpu(opts.device)

    harness = load_harness()
    host = resolve_host(harness, opts.comfyui)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "prompt.json").write_text(json.dumps(prompt, indent=2))

    dno = nodes_of(prompt, *DNO_NODES)
    settings = {k: v for k, v in (dno[0]["inputs"] if dno else {}).items() if not isinstance(v, list)}
    echo(f"ComfyUI host: {host}")
    echo(f"workflow {opts.workflow} on {checkpoint.name} ({'CPU' if cpu else 'GPU'}); DNO settings: "
         + ", ".join(f"{k}={settings[k]}" for k in ("opt_steps", "lr", "precision", "method") if k in settings))
    if cpu:
        echo("note: no GPU in use; a full-size model at 512x512 with 50x20 steps takes hours on a CPU "
             "(try --width 256 --height 256 --steps 10 --opt-steps 5).")

    started = time.monotonic()
    server = harness.ComfyServer(models=models, comfy_path=host, cpu=cpu,
                                 threads=opts.threads)
    try:
        try:
            server.start()
        except harness.ComfyHostError as err:
            raise ComfyRunError(f"the ComfyUI server failed to start: {err}") from None
        if server.custom_node_import_failed():
            raise ComfyRunError("ComfyUI could not import the DNO node pack; log tail:\n"
                                + server.log_tail())
        if image_name is not None:
            shutil.copy2(Path(opts.image).expanduser(), server.input_dir / image_name)
        echo(f"server up on {server.url}; queueing the workflow")
        mark = len(server.log())
        prompt_id = queue_whole(server, prompt)
        entry, log = follow(server, prompt_id, mark, opts.timeout, on_line=echo)
        if entry["status"]["status_str"] != "success":
            raise ComfyRunError(describe_failure(entry))
        images = copy_images(server.output_files(entry), out)
    finally:
        server.stop()
        (out / "server.log").write_text(server.log())
    seconds = time.monotonic() - started

    steps = parse_steps(log)
    meta = {"workflow": opts.workflow, "checkpoint": checkpoint.name, "device": "cpu" if cpu else "gpu",
            "settings": settings, "images": [p.name for p in images], "seconds": round(seconds, 2)}
    rewards_json = write_rewards(out / "rewards.json", steps, meta)
    reward_kind = ", ".join(n["inputs"].get("kind", "?") for n in nodes_of(prompt, "DNOBuiltinReward")) or "reward"
    plot = plot_rewards(out / "rewards.png", steps, f"DNO ({reward_kind}) on {checkpoint.name}") if steps else None

    echo("")
    if steps:
        echo(f"done in {seconds:.1f}s: {len(steps) - 1} DNO steps, reward {steps[0].reward:.4f} -> "
             f"best {max(s.best for s in steps):.4f}")
    else:
        echo(f"done in {seconds:.1f}s, but the server logged no DNO steps (does the workflow have a DNO node?)")
    for p in images:
        echo(f"  image   {p}")
    if plot:
        echo(f"  plot    {plot}")
    echo(f"  rewards {rewards_json}")
    return RunResult(steps=steps, images=images, plot=plot, rewards_json=rewards_json, seconds=seconds)


def main(argv: Optional[list[str]] = None) -> int:
    """CLI entry point; returns the exit status (0 ok, 1 a clear error, 130 Ctrl-C)."""
    opts = options_from(argv)
    try:
        run(opts)
    except ComfyRunError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; the server was stopped", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
