"""The pictures README.md and the registry show, made by this project.

    python tests/make_readme_images.py            # both
    python tests/make_readme_images.py icon       # only the registry icon (no browser needed)

* ``docs/images/dno_ksampler_node.png``: the DNO KSampler node in the official ComfyUI frontend
  (headless Debian chromium, ``bash tests/setup_browser.sh``) after a run of the
  ``dno_txt2img_ksampler`` example on a tiny random-weight checkpoint, its live chart filled
  with the run's reward, best-so-far and noise probability per optimisation step.
* ``docs/images/icon.png``: the registry icon (pyproject's ``Icon``), two before/after pairs
  cut from the demo's ``demo/examples/brightness_reg_before_after.png`` (top row: the plain
  sample, bottom row: DNO with the regulariser).

test_web_readme_images.py runs the screenshot path in a browser test; test_packaging.py checks
the committed files.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from PIL import Image  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
IMAGES = REPO / "docs" / "images"
NODE_SCREENSHOT = IMAGES / "dno_ksampler_node.png"
ICON = IMAGES / "icon.png"
BEFORE_AFTER = REPO / "demo" / "examples" / "brightness_reg_before_after.png"
# demo/run_dno.py save_grid: 32 px samples x4 = 128 px tiles, 2 px white padding around each.
TILE, GAP = 128, 2
ICON_COLUMNS = (2, 3)
OPT_STEPS = 8
VIEWPORT = (1280, 1300)

# Page JS: load the example, make it tiny by widget name (our checkpoint, 64x64, 4 steps, fp32).
LOAD_TINY = """async ({workflow, ckpt, optSteps}) => {
    const app = window.comfyAPI.app.app;
    await app.loadGraphData(workflow, true, true, "dno_readme");
    const set = (node, name, value) => {
        const w = node.widgets?.find((w) => w.name === name);
        if (w) w.value = value;
    };
    for (const node of app.graph.nodes) {
        set(node, "ckpt_name", ckpt);
        set(node, "width", 64);
        set(node, "height", 64);
        set(node, "steps", 4);
        set(node, "precision", "fp32");
        set(node, "lr", 0.05);
        set(node, "opt_steps", optSteps);
    }
    return app.graph.nodes.find((n) => n.type === "DNOKSampler").id;
}"""

# Page JS: the other nodes moved out of the way, scale 1, the node's title bar at (left, top) of
# the window (clear of the frontend's side bar and tab bar); returns the clip rect around it.
FRAME_NODE = """({id, left, top, margin}) => {
    const app = window.comfyAPI.app.app;
    const node = app.graph.getNodeById(id);
    for (const other of app.graph.nodes) {
        if (other !== node) other.pos = [other.pos[0] + 5000, other.pos[1]];
    }
    const [x, y, width, height] = node.getBounding();   // the title bar included
    const r = app.canvas.canvas.getBoundingClientRect();
    app.canvas.ds.scale = 1;
    app.canvas.ds.offset = [left - r.left - x, top - r.top - y];
    app.canvas.setDirty(true, true);
    return {x: left - margin, y: top - margin, width: width + 2 * margin, height: height + 2 * margin};
}"""

CHART_DONE = """(id) => (document.querySelector(`.dno-chart[data-dno-node="${id}"]`)?.dataset.summary || "")
    .startsWith("final")"""
CHART_POINTS = """(id) => JSON.parse(document.querySelector(`.dno-chart[data-dno-node="${id}"]`).dataset.points || "[]")"""


def make_icon(out: Path = ICON, source: Path = BEFORE_AFTER) -> Path:
    grid = Image.open(source).convert("RGB")

    def tile(column, row):
        x, y = GAP + column * (TILE + GAP), GAP + row * (TILE + GAP)
        return grid.crop((x, y, x + TILE, y + TILE))

    icon = Image.new("RGB", (2 * TILE + 3 * GAP,) * 2, "white")
    for i, column in enumerate(ICON_COLUMNS):
        for row in (0, 1):
            icon.paste(tile(column, row), (GAP + i * (TILE + GAP), GAP + row * (TILE + GAP)))
    out.parent.mkdir(parents=True, exist_ok=True)
    icon.save(out, optimize=True)
    return out


def make_node_screenshot(out: Path = NODE_SCREENSHOT, timeout: float = 300) -> dict:
    """Run the txt2img example in the browser and screenshot its DNO KSampler; returns the
    chart's points (one per optimisation step, as the page drew them)."""
    from browser import chromium_page, open_comfy, ui_server, write_user_settings
    from tiny_checkpoints import sd15_checkpoint

    workflow = json.loads((REPO / "example_workflows" / "dno_txt2img_ksampler.json").read_text())
    checkpoint = sd15_checkpoint(vae="taesd")
    with ui_server({"checkpoints": [checkpoint]}, threads=2) as server, \
            chromium_page(viewport=VIEWPORT) as (page, console):
        if server.custom_node_import_failed():
            raise RuntimeError(f"the node pack failed to import:\n{server.log_tail()}")
        write_user_settings(server)
        open_comfy(page, server, ("DNOKSampler",))
        node_id = page.evaluate(LOAD_TINY, {"workflow": workflow, "ckpt": checkpoint.name, "optSteps": OPT_STEPS})
        page.evaluate("() => window.comfyAPI.app.app.queuePrompt(0, 1)")
        page.wait_for_function(CHART_DONE, arg=node_id, timeout=timeout * 1000)
        points = page.evaluate(CHART_POINTS, node_id)
        clip = page.evaluate(FRAME_NODE, {"id": node_id, "left": 120, "top": 180, "margin": 16})
        page.wait_for_timeout(700)                         # a frame or two for the canvas to redraw
        out.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(out), clip=clip)
        errors = [m for m in console.errors() if m["type"] == "pageerror"]
        if errors:
            raise RuntimeError(f"page errors while making the screenshot:\n{console.report()}")
    return {"points": points, "clip": clip}


def main(argv: list[str]) -> None:
    which = set(argv) or {"icon", "screenshot"}
    if "icon" in which:
        print("wrote", make_icon().relative_to(REPO))
    if "screenshot" in which:
        t0 = time.monotonic()
        shot = make_node_screenshot()
        print(f"wrote {NODE_SCREENSHOT.relative_to(REPO)} ({len(shot['points'])} chart points, "
              f"{time.monotonic() - t0:.0f} s)")


if __name__ == "__main__":
    main(sys.argv[1:])
