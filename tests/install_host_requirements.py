"""Install the requirements of the ComfyUI host the tests run against, from the host's own file.

The host is ``$COMFYUI_PATH`` (a user's own ComfyUI) or the pinned ComfyUI fetched into
``.cache/comfyui`` (harness/comfy_host.py). Its ``requirements.txt`` is installed as it stands, less
the torch family: torch and torchvision are pinned by requirements-test.txt (ComfyUI leaves them
unpinned, and pip would otherwise be free to replace the pinned pair), and torchaudio is left out
(ComfyUI runs without it, warning only that two audio models are unavailable; no wheel of it is
guaranteed to match the pinned torch).

    python3 tests/install_host_requirements.py
"""
from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from comfy_host import comfyui_path  # noqa: E402

TORCH_FAMILY = re.compile(r"^\s*(torch|torchvision|torchaudio)\s*([<>=!~;\[].*)?$", re.IGNORECASE)


def host_requirements(path: Path) -> list:
    """The lines of the host's requirements.txt that this script installs."""
    lines = []
    for line in (path / "requirements.txt").read_text().splitlines():
        text = line.split("#", 1)[0].strip()
        if text and not TORCH_FAMILY.match(text):
            lines.append(text)
    return lines


def main() -> int:
    host = comfyui_path()
    lines = host_requirements(host)
    print(f"installing the requirements of the ComfyUI host at {host} ({len(lines)} packages; "
          "torch, torchvision pinned by requirements-test.txt; torchaudio left out)", flush=True)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as handle:
        handle.write("\n".join(lines) + "\n")
    return subprocess.call([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                            "-r", handle.name])


if __name__ == "__main__":
    sys.exit(main())
