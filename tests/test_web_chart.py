"""The DNO web extension in a real browser: Debian chromium, the official ComfyUI frontend and a
real ComfyUI 0.3.75 server running this node pack on a tiny checkpoint.

Setup: ``bash tests/setup_browser.sh`` (as root). Screenshots go to outputs/test-artifacts/.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from browser import chromium_page, open_comfy, save_screenshot, ui_server, write_user_settings
from comfy_host import REPO_ROOT
from tiny_checkpoints import sd15_checkpoint

pytestmark = [pytest.mark.browser, pytest.mark.server]

EXAMPLES = REPO_ROOT / "example_workflows"
DNO_TYPES = ("DNOKSampler", "DNOSampler")
# Where the frontend loads our web/ files from; console messages from them carry this URL.
EXTENSION_URL = "/extensions/comfyui-dno/"
# The two DNO nodes of the first test get different step counts, so each logged run is
# matched to its node by its length.
OPT_STEPS = (4, 3)
# RunReporter's server log line (nodes/progress.py): reward and best as %.4f, probability %.3g.
LOG_LINE = re.compile(r"DNO step (\d+)/(\d+)  reward (\S+)  best (\S+)(?:  noise probability (\S+))?")

# Page JS: load a workflow through the frontend, then make it tiny by widget name (so the
# test follows the example if its widget order changes): our checkpoint, 64x64, 3 steps, fp32.
SHRINK_WORKFLOW = """async ({workflow, ckpt, optSteps}) => {
    const app = window.comfyAPI.app.app;
    await app.loadGraphData(workflow, true, true, "dno_browser_test");
    const set = (node, name, value) => {
        const w = node.widgets?.find((w) => w.name === name);
        if (w) w.value = value;
        return !!w;
    };
    for (const node of app.graph.nodes) {
        set(node, "ckpt_name", ckpt);
        set(node, "width", 64);
        set(node, "height", 64);
        set(node, "steps", 3);
        set(node, "precision", "fp32");
        set(node, "lr", 0.05);
        set(node, "preview_every", 2);
        if (optSteps !== null) set(node, "opt_steps", optSteps);
    }
    return app.graph.nodes.filter((n) => ["DNOKSampler", "DNOSampler"].includes(n.type)).map((n) => n.id);
}"""

# Page JS: a second DNO KSampler fed by the same inputs as the first, with its own decode
# and preview, so the graph runs two DNO nodes.
ADD_SECOND_DNO = """({optSteps}) => {
    const app = window.comfyAPI.app.app;
    const LG = window.LiteGraph;
    const graph = app.graph;
    const first = graph.nodes.find((n) => n.type === "DNOKSampler");
    const twin = LG.createNode("DNOKSampler");
    twin.pos = [first.pos[0], first.pos[1] + first.size[1] + 80];
    graph.add(twin);
    for (const w of first.widgets) {
        const t = twin.widgets.find((x) => x.name === w.name);
        if (t && w.options?.serialize !== false) t.value = w.value;
    }
    twin.widgets.find((w) => w.name === "opt_steps").value = optSteps;
    const linkOf = (id) => (graph.links.get ? graph.links.get(id) : graph.links[id]);
    let vaeSource = null;
    for (const input of first.inputs) {
        if (input.link == null) continue;
        const link = linkOf(input.link);
        const origin = graph.getNodeById(link.origin_id);
        origin.connect(link.origin_slot, twin, input.name);
        if (input.name === "vae") vaeSource = [origin, link.origin_slot];
    }
    const decode = LG.createNode("VAEDecode");
    decode.pos = [twin.pos[0] + twin.size[0] + 40, twin.pos[1]];
    graph.add(decode);
    twin.connect(0, decode, "samples");
    vaeSource[0].connect(vaeSource[1], decode, "vae");
    const preview = LG.createNode("PreviewImage");
    preview.pos = [decode.pos[0] + 260, decode.pos[1]];
    graph.add(preview);
    decode.connect(0, preview, "images");
    return twin.id;
}"""

# Page JS: serialise the graph and load it again, as opening a saved workflow does.
RELOAD_WORKFLOW = """async () => {
    const app = window.comfyAPI.app.app;
    const saved = JSON.parse(JSON.stringify(app.graph.serialize()));
    await app.loadGraphData(saved, true, true, "dno_browser_test_reloaded");
    return saved;
}"""

# Page JS: what each DNO node's chart shows (the points it plotted and its text line).
READ_CHARTS = """() => {
    const app = window.comfyAPI.app.app;
    const out = {};
    for (const node of app.graph.nodes) {
        if (!["DNOKSampler", "DNOSampler"].includes(node.type)) continue;
        const el = document.querySelector(`.dno-chart[data-dno-node="${node.id}"]`);
        out[node.id] = {
            type: node.type,
            points: el ? JSON.parse(el.dataset.points || "[]") : null,
            summary: el ? el.dataset.summary : null,
            visible: !!(el && el.offsetWidth > 0 && el.offsetHeight > 0),
            saved: node.properties?.dno_chart ?? null,
        };
    }
    return out;
}"""

# Page JS: for the screenshot, put the DNO nodes side by side right of everything else and
# bring them into view (the example's layout is made for reading, not for this viewport).
SHOW_DNO_NODES = """(ids) => {
    const app = window.comfyAPI.app.app;
    const nodes = ids.map((id) => app.graph.getNodeById(id));
    const others = app.graph.nodes.filter((n) => !ids.includes(n.id));
    let x = Math.max(...others.map((n) => n.pos[0] + n.size[0])) + 80;
    const left = x;
    for (const node of nodes) {
        node.pos = [x, 0];
        x += node.size[0] + 40;
    }
    const height = Math.max(...nodes.map((n) => n.size[1]));
    const scale = Math.min(1, (window.innerHeight - 120) / (height + 60), (window.innerWidth - 120) / (x - left));
    app.canvas.ds.scale = scale;
    app.canvas.ds.offset = [-left + 80 / scale, 150 / scale];
    app.canvas.setDirty(true, true);
}"""

# Page JS: count preview images that arrive through the standard preview channel.
COUNT_PREVIEWS = """() => {
    const api = window.comfyAPI.api.api;
    window.__dnoPreviews = {};
    api.addEventListener("b_preview_with_metadata", ({detail}) => {
        const id = String(detail.displayNodeId ?? detail.nodeId);
        window.__dnoPreviews[id] = (window.__dnoPreviews[id] ?? 0) + 1;
    });
}"""


def load_example(name: str) -> dict:
    path = EXAMPLES / f"{name}.json"
    if not path.is_file():
        pytest.fail(f"example workflow {path} is missing (the browser test loads it)")
    return json.loads(path.read_text())


def logged_runs(log: str) -> list[list[tuple]]:
    """The server's DNO step lines, split into runs (a run starts at step 0)."""
    runs: list[list[tuple]] = []
    for m in LOG_LINE.finditer(log):
        step, total, reward, best, prob = m.groups()
        if int(step) == 0:
            runs.append([])
        runs[-1].append((int(step), int(total), reward, best, prob))
    return runs


def as_logged(point) -> tuple:
    """A chart point [step, reward, best, probability] formatted as the server logs it."""
    step, reward, best, prob = point
    return (step, f"{reward:.4f}", f"{best:.4f}", None if prob is None else f"{prob:.3g}")


def wait_for_history(server, count: int, timeout: float) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        entries = list(server.history().values())
        done = [e for e in entries if e.get("status", {}).get("status_str") in ("success", "error")]
        if len(done) >= count:
            return done
        time.sleep(0.5)
    raise AssertionError(f"the queued prompt did not finish in {timeout:.0f}s; log tail:\n{server.log_tail()}")


@pytest.fixture(scope="module")
def checkpoint():
    return sd15_checkpoint(vae="taesd")


def test_live_chart_matches_the_server_log(checkpoint):
    workflow = load_example("dno_txt2img_ksampler")
    with ui_server({"checkpoints": [checkpoint]}) as server, chromium_page() as (page, console):
        assert not server.custom_node_import_failed(), server.log_tail()
        write_user_settings(server)
        open_comfy(page, server, DNO_TYPES)
        dno_ids = page.evaluate(SHRINK_WORKFLOW, {"workflow": workflow, "ckpt": checkpoint.name,
                                                  "optSteps": OPT_STEPS[0]})
        assert len(dno_ids) == 1, f"the example should hold one DNO KSampler, found {dno_ids}"
        first = str(dno_ids[0])
        second = str(page.evaluate(ADD_SECOND_DNO, {"optSteps": OPT_STEPS[1]}))
        page.evaluate(RELOAD_WORKFLOW)  # both nodes come back from a saved workflow
        charts = page.evaluate(READ_CHARTS)
        assert set(charts) == {first, second}
        assert all(c["points"] == [] and c["visible"] for c in charts.values()), charts

        page.evaluate(COUNT_PREVIEWS)
        page.evaluate("() => window.comfyAPI.app.app.queuePrompt(0, 1)")
        entries = wait_for_history(server, 1, timeout=150)
        assert entries[0]["status"]["status_str"] == "success", server.log_tail()
        page.wait_for_function(
            "(ids) => ids.every((id) => (document.querySelector(`.dno-chart[data-dno-node=\"${id}\"]`)"
            "?.dataset.summary || '').startsWith('final'))", arg=[first, second], timeout=20_000)

        charts = page.evaluate(READ_CHARTS)
        runs = logged_runs(server.log())
        assert sorted(len(r) for r in runs) == sorted(n + 1 for n in OPT_STEPS), server.log_tail()
        by_length = {len(r): r for r in runs}
        for node_id, steps in ((first, OPT_STEPS[0]), (second, OPT_STEPS[1])):
            chart = charts[node_id]
            logged = [(s, r, b, p) for s, _, r, b, p in by_length[steps + 1]]
            # One point per optimisation step (step 0 is the unoptimised sample) ...
            assert [p[0] for p in chart["points"]] == list(range(steps + 1)), chart
            # ... with the values the server logged, to the logged precision.
            assert [as_logged(p) for p in chart["points"]] == logged
            assert all(p[3] is not None for p in chart["points"]), "the example uses the regulariser"
            final_best = f"{max(p[2] for p in chart['points']):.4f}"
            assert chart["summary"].startswith(f"final reward {final_best}"), chart["summary"]
            assert "noise p=" in chart["summary"]

        # Step previews came to each DNO node through the standard preview channel, at the
        # interval set on the node (every 2nd step) and at the last step.
        previews = page.evaluate("() => window.__dnoPreviews")
        expected = {node_id: len({*range(0, n + 1, 2), n}) for node_id, n in zip((first, second), OPT_STEPS)}
        assert previews == expected, f"previews per node {previews}, expected {expected}"

        page.evaluate(SHOW_DNO_NODES, [int(first), int(second)])
        page.wait_for_timeout(500)
        shot = save_screenshot(page, "dno_chart.png")
        assert shot.stat().st_size > 10_000

        # The last chart stays: after loading the saved workflow again, and after a page reload
        # (the frontend restores the open workflow), the same points are drawn.
        before = {k: v["points"] for k, v in charts.items()}
        page.evaluate(RELOAD_WORKFLOW)
        assert {k: v["points"] for k, v in page.evaluate(READ_CHARTS).items()} == before
        page.reload(wait_until="domcontentloaded")
        open_comfy(page, server, DNO_TYPES)
        page.wait_for_function("() => document.querySelectorAll('.dno-chart').length >= 2", timeout=30_000)
        assert {k: v["points"] for k, v in page.evaluate(READ_CHARTS).items()} == before

        ours = console.mentioning(EXTENSION_URL)
        print("browser console:\n" + console.report())
        assert not ours, f"console errors/warnings from the DNO extension: {ours}"
        assert not [m for m in console.errors() if m["type"] == "pageerror"], console.report()


def test_page_works_when_no_chart_messages_arrive(checkpoint):
    """An older server (or a run queued by another client) sends no dno.* messages to this
    page: the DNO node still renders with an empty chart, and nothing errors."""
    workflow = load_example("dno_sampler_custom_advanced")
    # A saved chart the extension cannot read (hand-edited or from another version) is dropped.
    for node in workflow["nodes"]:
        if node["type"] in DNO_TYPES:
            node.setdefault("properties", {})["dno_chart"] = {"steps": "x", "points": [None, {"step": 1}]}
    with ui_server({"checkpoints": [checkpoint]}) as server, chromium_page() as (page, console):
        write_user_settings(server)
        open_comfy(page, server, DNO_TYPES)
        page.evaluate(
            "() => { window.__dnoMessages = 0; const api = window.comfyAPI.api.api;"
            " for (const t of ['dno.progress', 'dno.done'])"
            " api.addEventListener(t, () => { window.__dnoMessages += 1; }); }")
        dno_ids = page.evaluate(SHRINK_WORKFLOW, {"workflow": workflow, "ckpt": checkpoint.name,
                                                  "optSteps": 2})
        assert len(dno_ids) == 1
        # Queued over HTTP under the harness's own client id: the server sends the run's
        # messages to that client, never to this page.
        api_prompt = page.evaluate("async () => (await window.comfyAPI.app.app.graphToPrompt()).output")
        prompt_id = server.queue(api_prompt)
        entry = server.wait(prompt_id, timeout=120)
        assert entry["status"]["status_str"] == "success", server.log_tail()
        assert len(logged_runs(server.log())) == 1  # the run happened, with messages sent elsewhere
        page.wait_for_timeout(1000)
        assert page.evaluate("() => window.__dnoMessages") == 0

        chart = page.evaluate(READ_CHARTS)[str(dno_ids[0])]
        assert chart["type"] == "DNOSampler" and chart["visible"]
        assert chart["points"] == [] and chart["summary"] == "DNO: no run yet"
        # The page stays usable: the graph serialises and loads again.
        page.evaluate(RELOAD_WORKFLOW)
        assert page.evaluate(READ_CHARTS)[str(dno_ids[0])]["points"] == []
        page.evaluate(SHOW_DNO_NODES, [int(dno_ids[0])])
        page.wait_for_timeout(300)
        save_screenshot(page, "dno_chart_no_messages.png")

        print("browser console:\n" + console.report())
        assert not console.mentioning(EXTENSION_URL), console.report()
        assert not [m for m in console.errors() if m["type"] == "pageerror"], console.report()


# Page JS: the DNO KSampler moved into a subgraph (the frontend's "Convert to Subgraph"); the
# server then runs it as "<subgraph node>:<inner node>" and tags its messages with that id.
WRAP_IN_SUBGRAPH = """(id) => {
    const app = window.comfyAPI.app.app;
    const {node, subgraph} = app.graph.convertToSubgraph(new Set([app.graph.getNodeById(id)]));
    const inner = subgraph.nodes.find((n) => n.type === "DNOKSampler");
    return [String(node.id), String(inner.id)];
}"""

READ_INNER_CHART = """([outer, inner]) => {
    const node = window.comfyAPI.app.app.graph.getNodeById(Number(outer)).subgraph.getNodeById(Number(inner));
    const el = node.dnoChart.container;
    return {points: JSON.parse(el.dataset.points || "[]"), summary: el.dataset.summary};
}"""


def test_chart_of_a_dno_node_inside_a_subgraph(checkpoint):
    workflow = load_example("dno_txt2img_ksampler")
    with ui_server({"checkpoints": [checkpoint]}) as server, chromium_page() as (page, console):
        write_user_settings(server)
        open_comfy(page, server, DNO_TYPES)
        dno_ids = page.evaluate(SHRINK_WORKFLOW, {"workflow": workflow, "ckpt": checkpoint.name,
                                                  "optSteps": 2})
        outer, inner = page.evaluate(WRAP_IN_SUBGRAPH, dno_ids[0])
        api_ids = page.evaluate("async () => Object.keys((await window.comfyAPI.app.app.graphToPrompt()).output)")
        assert f"{outer}:{inner}" in api_ids  # the id the server will tag the messages with
        page.evaluate("() => window.comfyAPI.app.app.queuePrompt(0, 1)")
        entries = wait_for_history(server, 1, timeout=120)
        assert entries[0]["status"]["status_str"] == "success", server.log_tail()
        page.wait_for_function(
            "(ids) => (" + READ_INNER_CHART + ")(ids).summary.startsWith('final')", arg=[outer, inner],
            timeout=20_000)
        chart = page.evaluate(READ_INNER_CHART, [outer, inner])
        (run,) = logged_runs(server.log())
        assert [as_logged(p) for p in chart["points"]] == [(s, r, b, p) for s, _, r, b, p in run]
        assert len(chart["points"]) == 3
        print("browser console:\n" + console.report())
        assert not console.mentioning(EXTENSION_URL), console.report()
