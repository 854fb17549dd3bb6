"""Regenerate the UI-format example workflows from the API-format ones.

    python tests/make_ui_workflows.py

Starts a real ComfyUI server (no models needed) for its /object_info, then
writes example_workflows/<name>.json for every example_workflows/api/<name>.json.
test_workflows_server.py checks the two stay in sync.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from comfy_host import ComfyServer  # noqa: E402
from workflow_format import api_to_ui  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    with ComfyServer() as server:
        info = server.object_info()
    for api_file in sorted((REPO / "example_workflows" / "api").glob("*.json")):
        ui = api_to_ui(json.loads(api_file.read_text()), info)
        out = REPO / "example_workflows" / api_file.name
        out.write_text(json.dumps(ui, indent=2) + "\n")
        print("wrote", out.relative_to(REPO))


if __name__ == "__main__":
    main()
