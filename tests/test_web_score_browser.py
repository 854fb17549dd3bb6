"""DNO Score Image shows its score on the node: Debian chromium, the official ComfyUI frontend and
a real ComfyUI 0.3.75 server (no model: LoadImage -> DNO Score Image with the brightness reward).

Setup: ``bash tests/setup_browser.sh`` (as root). Screenshots go to outputs/test-artifacts/.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from browser import chromium_page, open_comfy, save_screenshot, ui_server, write_user_settings
from test_web_chart import EXTENSION_URL, RELOAD_WORKFLOW, wait_for_history

pytestmark = [pytest.mark.browser, pytest.mark.server]

# Page JS: LoadImage and the brightness reward into DNO Score Image, all in view.
BUILD_GRAPH = """({image}) => {
    const app = window.comfyAPI.app.app;
    const LG = window.LiteGraph;
    app.graph.clear();
    const load = LG.createNode("LoadImage");
    load.pos = [40, 40];
    app.graph.add(load);
    load.widgets.find((w) => w.name === "image").value = image;
    const reward = LG.createNode("DNOBuiltinReward");
    reward.pos = [40, 420];
    app.graph.add(reward);
    const score = LG.createNode("DNOScoreImage");
    score.pos = [420, 160];
    app.graph.add(score);
    load.connect(0, score, "image");
    reward.connect(0, score, "reward");
    app.canvas.ds.scale = 1;
    app.canvas.ds.offset = [20, 20];
    app.canvas.setDirty(true, true);
    return String(score.id);
}"""

# Page JS: the score widget of a node as the user sees it: its text, its box, and whether it is
# the element on top at its own centre (nothing covers it).
READ_SCORE = """(id) => {
    const el = document.querySelector(`.dno-scores[data-dno-node="${id}"]`);
    if (!el) return null;
    const box = el.getBoundingClientRect();
    const top = document.elementFromPoint(box.x + box.width / 2, box.y + box.height / 2);
    return {text: el.textContent, scores: el.dataset.scores, box: [box.x, box.y, box.width, box.height],
            onTop: el === top || el.contains(top), visibility: getComputedStyle(el).visibility,
            saved: window.comfyAPI.app.app.graph.getNodeById(Number(id)).properties?.dno_scores ?? null};
}"""


def test_score_image_shows_its_score_on_the_node(tmp_path):
    rng = np.random.default_rng(1)
    pixels = (rng.random((48, 40, 3)) ** 2 * 255).astype(np.uint8)   # mean brightness about 1/3
    expected = float(np.mean(pixels / 255.0))
    with ui_server({}) as server, chromium_page() as (page, console):
        assert not server.custom_node_import_failed(), server.log_tail()
        Image.fromarray(pixels).save(server.input_dir / "score_me.png")
        write_user_settings(server)
        open_comfy(page, server, ("DNOScoreImage", "DNOBuiltinReward"))
        node_id = page.evaluate(BUILD_GRAPH, {"image": "score_me.png"})
        # the frontend mounts DOM widgets on its next frame
        page.wait_for_function("(id) => (" + READ_SCORE + ")(id) !== null", arg=node_id, timeout=10_000)
        before = page.evaluate(READ_SCORE, node_id)
        assert before is not None and before["text"] == "DNO: not scored yet", before

        page.evaluate("() => window.comfyAPI.app.app.queuePrompt(0, 1)")
        (entry,) = wait_for_history(server, 1, timeout=120)
        assert entry["status"]["status_str"] == "success", server.log_tail()
        (sent,) = entry["outputs"][node_id]["text"]          # the ui.text the server sent
        assert float(sent) == pytest.approx(expected, abs=1e-4)
        page.wait_for_function("([id, sent]) => (" + READ_SCORE + ")(id)?.scores === sent", arg=[node_id, sent],
                               timeout=20_000)

        shown = page.evaluate(READ_SCORE, node_id)
        print("score widget:", shown)
        assert shown["text"] == f"score {sent}"
        width, height = page.viewport_size["width"], page.viewport_size["height"]
        x, y, w, h = shown["box"]
        assert w > 50 and h > 10 and 0 <= x and x + w <= width and 0 <= y and y + h <= height, shown
        assert shown["onTop"] and shown["visibility"] == "visible", shown
        assert page.locator(f'.dno-scores[data-dno-node="{node_id}"]').is_visible()
        save_screenshot(page, "dno_score_image.png")

        # saved with the workflow: shown again after loading it
        assert shown["saved"] == sent
        page.evaluate(RELOAD_WORKFLOW)
        assert page.evaluate(READ_SCORE, node_id)["text"] == f"score {sent}"

        print("browser console:\n" + console.report())
        assert not console.mentioning(EXTENSION_URL), console.report()
        assert not [m for m in console.errors() if m["type"] == "pageerror"], console.report()
