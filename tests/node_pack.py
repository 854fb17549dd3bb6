"""Kept for the tests' imports: the module lives in ``harness/node_pack.py`` (the demo and the benchmark
import it from there); this name is the very same module object."""
import sys
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from harness import node_pack as _module  # noqa: E402

sys.modules[__name__] = _module
