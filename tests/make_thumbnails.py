"""Thumbnails of the example workflows, each made by running that workflow.

    python tests/make_thumbnails.py                    # all examples, tiny models, CPU
    python tests/make_thumbnails.py dno_controlnet     # one example
    python tests/make_thumbnails.py --models ComfyUI/models   # the real files, full size, GPU

ComfyUI's template browser lists a custom node pack's ``example_workflows/<name>.json`` and shows
``example_workflows/<name>.jpg`` as its card (frontend 1.32.9, the one ComfyUI 0.3.75 pins, gives
custom-node templates ``mediaType "image"``, ``mediaSubtype "jpg"`` and fetches
``/api/workflow_templates/<pack>/<name>.jpg``; the server serves the folder as it is).

This starts a real ComfyUI server with tiny random-weight models under the file names the
workflows use (example_models.py), runs every ``example_workflows/api/<name>.json`` sized down for
a CPU, and writes the image that the workflow's DNO branch saved as ``<name>.jpg``. The tiny models
are random, so those pictures show what the graph does to noise, not what a real checkpoint draws;
with ``--models`` the workflows run as saved, on the files in that ComfyUI models folder. The
JPEG comment records the SHA-256 of the API workflow that ran, so test_packaging.py finds a
thumbnail that no longer matches its workflow.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from PIL import Image  # noqa: E402

from comfy_host import ComfyServer  # noqa: E402
from example_models import (UI_DIR, dno_save_node, example_model_files, example_names, load_api,  # noqa: E402
                            shrink, write_example_input)

# Rendered at 128 px (a 16x16 latent: seconds per step on a CPU), shown at 256 px.
RENDER_SIZE = 128
THUMBNAIL_SIZE = 256
OPT_STEPS = 6
COMMENT_PREFIX = "dno-thumbnail workflow-sha256="


def workflow_digest(api: dict) -> str:
    """Independent of the file's whitespace and key order."""
    return hashlib.sha256(json.dumps(api, sort_keys=True).encode()).hexdigest()


def recorded_digest(jpg: Path) -> str | None:
    comment = Image.open(jpg).info.get("comment", b"")
    text = comment.decode(errors="replace") if isinstance(comment, bytes) else str(comment)
    return text[len(COMMENT_PREFIX):].strip() if text.startswith(COMMENT_PREFIX) else None


def render(server: ComfyServer, name: str, out_dir: Path = UI_DIR, size: int | None = RENDER_SIZE,
           opt_steps: int = OPT_STEPS, timeout: float = 1800) -> Path:
    """Run example ``name`` on ``server`` and write ``out_dir/<name>.jpg`` from its DNO image.
    ``size=None`` runs the workflow as saved (full size and step counts)."""
    api = load_api(name)
    graph = api if size is None else shrink(api, opt_steps=opt_steps, size=size)
    save_key = dno_save_node(graph)
    entry = server.wait(server.queue(graph), timeout=timeout)
    if entry["status"]["status_str"] != "success":
        raise RuntimeError(f"{name} failed on the server:\n{server.log_tail()}")
    saved = entry["outputs"][save_key]["images"]
    root = {"output": server.output_dir, "temp": server.base_dir / "temp"}[saved[0].get("type", "output")]
    image = Image.open(root / saved[0].get("subfolder", "") / saved[0]["filename"]).convert("RGB")
    image = image.resize((THUMBNAIL_SIZE, THUMBNAIL_SIZE), Image.LANCZOS)
    out = Path(out_dir) / f"{name}.jpg"
    # full-resolution colour (no 4:2:0 subsampling): these pictures are mostly fine detail
    image.save(out, "JPEG", quality=92, subsampling=0, comment=(COMMENT_PREFIX + workflow_digest(api)).encode())
    return out


def real_models_server(models: Path, base: Path) -> ComfyServer:
    """A server that reads the model files from an existing ComfyUI models folder."""
    folders = ["checkpoints", "controlnet", "clip_vision", "clip", "dno_rewards"]
    config = base / "real_models.yaml"
    config.write_text(json.dumps({"dno_real_models": {"base_path": str(models.resolve()),
                                                      **{f: f for f in folders}}}))
    return ComfyServer(threads=2, cpu=False, extra_args=["--extra-model-paths-config", str(config)])


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="examples to render (default: all)")
    parser.add_argument("--models", type=Path, help="a ComfyUI models folder with the files the workflows "
                        "name; the workflows then run as saved, on the GPU when there is one")
    args = parser.parse_args(argv)
    names = args.names or example_names()
    unknown = set(names) - set(example_names())
    if unknown:
        parser.error(f"no example_workflows/api/<name>.json for {sorted(unknown)}; the examples are {example_names()}")
    with tempfile.TemporaryDirectory(prefix="dno-thumbnail-") as tmp:
        tmp = Path(tmp)
        server = (real_models_server(args.models, tmp) if args.models
                  else ComfyServer(models=example_model_files(tmp), threads=2))
        with server:
            if server.custom_node_import_failed():
                raise SystemExit(f"the node pack failed to import:\n{server.log_tail()}")
            write_example_input(server, size=512 if args.models else RENDER_SIZE)
            for name in names:
                out = render(server, name, size=None if args.models else RENDER_SIZE)
                print("wrote", out.relative_to(UI_DIR.parent))


if __name__ == "__main__":
    main(sys.argv[1:])
