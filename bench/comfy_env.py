"""Import ComfyUI in-process for the benchmark, on the GPU (or the CPU with ``cpu=True``).

The tests' harness (harness/comfy_host.py) forces the CPU; the benchmark needs
ComfyUI's own device choice. ``comfy.cli_args.args`` must be set before
``comfy.model_management`` is imported, so this is the first ComfyUI import.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_COMFYUI = REPO_ROOT / ".cache" / "comfyui"


def comfyui_root() -> Path:
    root = Path(os.environ.get("COMFYUI_PATH") or DEFAULT_COMFYUI).resolve()
    if not (root / "comfy").is_dir():
        raise SystemExit(f"no ComfyUI checkout at {root}: run the tests once on this machine to fetch "
                         "ComfyUI 0.3.75 into .cache/comfyui, or set COMFYUI_PATH")
    return root


def import_comfy(cpu: bool = False):
    """Make ``comfy`` importable and pick its device (CUDA unless ``cpu``)."""
    root = comfyui_root()
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    import comfy.options  # noqa: F401  (keeps ComfyUI from parsing our argv)
    from comfy.cli_args import args
    if "comfy.model_management" in sys.modules:
        import comfy.model_management as mm
        if (mm.cpu_state == mm.CPUState.CPU) != cpu:
            raise SystemExit("comfy.model_management was imported before with another device choice")
    else:
        args.cpu = cpu
    import comfy.model_management  # noqa: F401
    import comfy
    return comfy


def load_node_pack():
    """This repository as ComfyUI loads a custom node (a package named ``comfyui_dno``);
    the same loader the tests use."""
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    from harness.node_pack import load_node_pack as load
    return load()
