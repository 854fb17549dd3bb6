"""Run an example DNO workflow on a real checkpoint through a real ComfyUI host.

    python3 -m demo.run_dno --checkpoint /path/to/v1-5-pruned-emaonly.safetensors \\
        [--workflow dno_txt2img_ksampler] [--width 512 --height 512 --steps 50 --opt-steps 20] \\
        [--precision auto] [--prompt "..."] [--reward brightness] [--out outputs/comfy] \\
        [--comfyui /path/to/ComfyUI]

(``python3 -m demo.comfy_run`` takes the same flags; both use the one parser in demo/cli.py.)
A ComfyUI server (``$COMFYUI_PATH``, ``--comfyui``, or ComfyUI 0.3.75 fetched once into
``.cache/comfyui``) is started with this repository as a custom node and the checkpoint linked
into its models folder. The API-format workflow from ``example_workflows/api/`` is posted
with the command-line overrides applied; what the server logs about the run (model loading,
sampling progress bars, DNO's step lines and its in-step progress) is printed as it appears.
When the prompt finishes, the saved images, ``rewards.json`` and a reward-per-step plot land
in ``--out``. SIGINT (Ctrl-C), SIGTERM and SIGHUP stop the server before the client exits.

Options left out keep the workflow's own values (512x512, 50 sampling steps, 20 DNO steps,
precision auto). ``main(argv)`` is the entry point; ``run(options)`` does the work and
returns a :class:`RunResult`.
"""
from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import shutil
import signal
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Optional

from demo import cli

REPO_ROOT = Path(__file__).resolve().parents[1]
WORKFLOW_DIR = REPO_ROOT / "example_workflows" / "api"
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


# What ComfyUI 0.3.75 imports at start-up: requirements-test.txt and the host's own requirements install it, the demo's own
# requirements-demo.txt does not (the shapes demo needs none of it).
HOST_MODULES = ("torchvision", "torchsde", "einops", "tokenizers", "sentencepiece", "transformers", "safetensors",
                "aiohttp", "yarl", "yaml", "scipy", "tqdm", "psutil", "alembic", "sqlalchemy", "av", "kornia",
                "spandrel", "pydantic", "pydantic_settings", "requests", "matplotlib")
INSTALL_HINT = "python3 -m pip install -r requirements-test.txt && python3 tests/install_host_requirements.py"


class ComfyRunError(RuntimeError):
    """A clear, user-facing failure: bad input, a host that did not start, a failed prompt."""


class Stopped(BaseException):
    """SIGTERM or SIGHUP arrived: unwinds like Ctrl-C, so the server is stopped on the way out."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def missing_host_modules() -> list[str]:
    return [m for m in HOST_MODULES if importlib.util.find_spec(m) is None]


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


def options_of(ns) -> RunOptions:
    """RunOptions from parsed arguments; options left out keep RunOptions' defaults (None = the
    workflow's own value)."""
    given = {f.name: getattr(ns, f.name) for f in fields(RunOptions)
             if getattr(ns, f.name, None) is not None}
    return RunOptions(**given)


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


def workload(api: dict) -> dict:
    """Image size, sampling steps and DNO steps of a workflow (None where it has none)."""
    def first(class_types, key):
        values = [n["inputs"][key] for n in nodes_of(api, *class_types)
                  if not isinstance(n["inputs"].get(key, []), list)]
        return values[0] if values else None
    return {"width": first(("EmptyLatentImage",), "width"), "height": first(("EmptyLatentImage",), "height"),
            "steps": first(SAMPLING_STEP_NODES, "steps"), "opt_steps": first(DNO_NODES, "opt_steps")}


def describe_size(api: dict) -> str:
    w = workload(api)
    size = "input image size" if w["width"] is None else f"{w['width']}x{w['height']}"
    return f"{size}, {w['steps']} sampling steps x {w['opt_steps']} DNO steps"


def hint_flags() -> str:
    return " ".join(f"--{k.replace('_', '-')} {v}" for k, v in cli.CPU_HINT.items())


def cpu_notes(api: dict, settings: dict) -> list[str]:
    """What a CPU run should know before it starts: the precision and the size to try first."""
    notes = []
    if settings.get("precision") in ("bf16", "fp16"):
        notes.append(f"note: precision {settings['precision']} on a CPU runs far slower than fp32 (bf16 "
                     "autocast measured ~30x slower on a 2-core CPU); leave --precision out (auto = fp32 "
                     "on the CPU) or give --precision fp32.")
    w = workload(api)
    big = any(w[k] is not None and w[k] > v for k, v in cli.CPU_HINT.items())
    if big:
        notes.append("note: no GPU in use. A full-size model (SD1.5) at 512x512 with 50 sampling steps x 20 "
                     "DNO steps takes hours on a CPU; for a first look try "
                     f"{hint_flags()} (minutes with precision auto).")
    return notes


def needed_input_images(api: dict) -> list[str]:
    return [n["inputs"]["image"] for n in nodes_of(api, "LoadImage")]


# --------------------------------------------------------------------------- host

def load_harness():
    """harness/comfy_host.py, the reusable real-host harness (shared with the tests and the bench)."""
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    try:
        from harness import comfy_host
    except ImportError as error:
        raise ComfyRunError(f"the ComfyUI host harness (harness/comfy_host.py) could not be imported: {error}; "
                            "this script needs the repository's harness/ folder.") from error
    return comfy_host


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
    seen = set()
    for node_id, info in (body.get("node_errors") or {}).items():
        for e in info.get("errors", []):
            details = e.get("details", "")
            if e.get("type") == "custom_validation_failed":
                # ComfyUI repeats a VALIDATE_INPUTS message once per input it takes ("name - why")
                details = details.split(" - ", 1)[-1]
                if (node_id, details) in seen:
                    continue
                seen.add((node_id, details))
            lines.append(f"node {node_id} ({info.get('class_type', '?')}): {e.get('message', '')}: "
                         f"{details}".rstrip(": "))
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


# ComfyUI's tqdm bars: " 30%|###       | 3/10 [00:04<00:10,  1.52s/it]"
PROGRESS_LINE = re.compile(r"^\s*(\d+)%\|.*\|\s*(\d+)/(\d+)\s*\[")
# What the host logs about a prompt that a user wants to see (model loading, timing).
HOST_LINES = ("got prompt", "model weight dtype", "Requested to load", "Prompt executed in")


class LogStream:
    """Turns the server log, read as it grows, into the lines a user sees on the terminal.

    DNO's lines (its step lines, the in-step heartbeat, its notes) pass as they are; the host's
    model-loading and timing lines pass with a ``ComfyUI:`` prefix; the host's sampling progress
    bars pass as ``sampling ...`` lines, at most one per ``every`` seconds per bar, and the last
    one of each bar. Everything else stays in the log (``<out>/server.log``).
    """

    def __init__(self, on_line: Callable[[str], None], every: float = 5.0,
                 clock: Callable[[], float] = time.monotonic):
        self.on_line = on_line
        self.every = every
        self.clock = clock
        self.pending = ""
        self.bar_shown_at: Optional[float] = None
        self.bar_last: Optional[tuple[int, int]] = None

    def feed(self, text: str) -> None:
        self.pending += text
        *complete, self.pending = re.split(r"\r\n|\r|\n", self.pending)
        for line in complete:
            self.line(line)

    def line(self, line: str) -> None:
        text = line.strip()
        if not text:
            return
        bar = PROGRESS_LINE.match(text)
        if bar:
            done, total = int(bar.group(2)), int(bar.group(3))
            now = self.clock()
            new_bar = self.bar_last is None or done < self.bar_last[0] or total != self.bar_last[1]
            if new_bar:
                self.bar_shown_at = None
            if (done, total) == self.bar_last:
                return      # tqdm repeats its final state when the bar closes
            due = self.bar_shown_at is None or now - self.bar_shown_at >= self.every
            self.bar_last = (done, total)
            if due or done == total:
                self.bar_shown_at = now
                self.on_line(f"sampling {text}")
            return
        if text.startswith("DNO"):
            self.on_line(text)
        elif text.startswith(HOST_LINES):
            self.on_line(f"ComfyUI: {text}")


def follow(server, prompt_id: str, log_from: int, timeout: Optional[float],
           on_line: Callable[[str], None], poll: float = 0.25) -> tuple[dict, str]:
    """Wait for ``prompt_id``, handing the log lines a user should see (:class:`LogStream`)
    to ``on_line`` as they appear.

    Returns the history entry and the server log written while the prompt ran.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    seen = log_from
    stream = LogStream(on_line)

    def drain() -> None:
        nonlocal seen
        text = server.log()
        new, seen = text[seen:], len(text)
        stream.feed(new)

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

def say(line: str) -> None:
    print(line, flush=True)


def run(opts: RunOptions, echo: Callable[[str], None] = say) -> RunResult:
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

    custom_host = opts.comfyui is not None or bool(os.environ.get("COMFYUI_PATH"))
    missing = missing_host_modules()
    if missing and not custom_host:
        raise ComfyRunError(f"--checkpoint runs a real ComfyUI server, which needs packages this Python "
                            f"({sys.executable}) lacks: {', '.join(missing)}. The demo's requirements-demo.txt "
                            f"covers only the shapes model; install the host's with:\n  {INSTALL_HINT}")
    harness = load_harness()
    host = resolve_host(harness, opts.comfyui)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "prompt.json").write_text(json.dumps(prompt, indent=2))

    dno = nodes_of(prompt, *DNO_NODES)
    settings = {k: v for k, v in (dno[0]["inputs"] if dno else {}).items() if not isinstance(v, list)}
    echo(f"ComfyUI host: {host}")
    shown = dict(settings)
    if shown.get("precision") == "auto":
        shown["precision"] = "auto (fp32 on the CPU)" if cpu else "auto (the model's dtype on the GPU)"
    echo(f"workflow {opts.workflow} on {checkpoint.name} ({'CPU' if cpu else 'GPU'}); "
         f"{describe_size(prompt)}; DNO settings: "
         + ", ".join(f"{k}={shown[k]}" for k in ("opt_steps", "lr", "precision", "method") if k in shown))
    if cpu:
        for note in cpu_notes(prompt, settings):
            echo(note)

    started = time.monotonic()
    server = harness.ComfyServer(models=models, comfy_path=host, cpu=cpu,
                                 threads=opts.threads)
    try:
        try:
            server.start()
        except harness.ComfyHostError as err:
            hint = (f"\n(a package is missing from this Python; for ComfyUI 0.3.75: {INSTALL_HINT}, "
                    "else your ComfyUI's requirements.txt)" if "No module named" in str(err) else "")
            raise ComfyRunError(f"the ComfyUI server failed to start: {err}{hint}") from None
        if server.custom_node_import_failed():
            raise ComfyRunError("ComfyUI could not import the DNO node pack; log tail:\n"
                                + server.log_tail())
        if image_name is not None:
            shutil.copy2(Path(opts.image).expanduser(), server.input_dir / image_name)
        echo(f"server up on {server.url} (pid {server.proc.pid}, full log: {out / 'server.log'}); "
             "queueing the workflow")
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
    return run_cli(cli.parse(argv, prog="python3 -m demo.comfy_run", require_checkpoint=True))


def run_cli(ns) -> int:
    """Run parsed arguments (``demo.run_dno --checkpoint ...`` comes here); the exit status:
    0 ok, 1 a clear error, 130 Ctrl-C, 128 + the signal for SIGTERM / SIGHUP."""
    opts = options_of(ns)
    previous = catch_stop_signals()
    try:
        run(opts)
    except ComfyRunError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; the server was stopped", file=sys.stderr)
        return 130
    except Stopped as stop:
        print(f"{signal.Signals(stop.signum).name}: the server was stopped", file=sys.stderr)
        return 128 + stop.signum
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 0


def catch_stop_signals() -> dict:
    """SIGTERM and SIGHUP raise :class:`Stopped` in the main thread (their default would end the
    process at once, leaving the server, which runs in its own session, behind). A second
    signal while the server is being stopped is ignored. Returns the handlers it replaced."""
    def stop(signum, frame):
        for s in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(s, signal.SIG_IGN)
        raise Stopped(signum)

    previous = {}
    try:
        for signum in (signal.SIGTERM, signal.SIGHUP):
            previous[signum] = signal.signal(signum, stop)
    except ValueError:  # not the main thread: signals cannot be caught here
        pass
    return previous


if __name__ == "__main__":
    sys.exit(main())
