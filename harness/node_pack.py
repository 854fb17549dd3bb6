"""Import this repository as a ComfyUI custom-node package, in-process.

ComfyUI loads a custom node folder as a package (so ``nodes/`` never shadows
ComfyUI's own ``nodes`` module); tests do the same under the name
``comfyui_dno`` after ``import_comfy()``.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "comfyui_dno"


def load_node_pack():
    if PACKAGE in sys.modules:
        return sys.modules[PACKAGE]
    spec = importlib.util.spec_from_file_location(PACKAGE, REPO_ROOT / "__init__.py",
                                                  submodule_search_locations=[str(REPO_ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE] = module
    spec.loader.exec_module(module)
    return module
