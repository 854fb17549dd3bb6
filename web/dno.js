// ComfyUI extension: a live reward chart inside the DNO nodes.
//
// The DNO nodes send "dno.progress" (one per scored optimisation step, and a reset at the start
// of a run) and "dno.done" through PromptServer.send_sync, tagged with the DNO node's id. The
// series lives in node.properties, so it is saved with the workflow and redrawn after a reload;
// a server that never sends these messages just leaves the chart empty.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { drawChart, emptySeries, seriesFrom, summaryText, withDone, withProgress } from "./dno_chart.js";

const DNO_NODE_TYPES = new Set(["DNOKSampler", "DNOSampler"]);
const PROPERTY = "dno_chart";
const WIDGET = "dno_chart";
const CHART_HEIGHT = 150;
const TEXT_HEIGHT = 30; // two lines of 11px text

const isDNONode = (node) => DNO_NODE_TYPES.has(node?.comfyClass ?? node?.type);

/** The node an execution id names: "12" at the top level, "7:12" inside subgraph node 7. */
function nodeByExecutionId(executionId) {
    let graph = app.rootGraph ?? app.graph;
    let node = null;
    for (const id of String(executionId).split(":")) {
        node = graph?.getNodeById?.(id) ?? graph?.getNodeById?.(Number(id)) ?? null;
        if (!node) return null;
        graph = node.subgraph;
    }
    return node;
}

function seriesOf(node) {
    return seriesFrom(node.properties?.[PROPERTY]);
}

function render(node) {
    const view = node.dnoChart;
    if (!view) return;
    const series = seriesOf(node);
    const width = Math.max(view.canvas.clientWidth || (node.size?.[0] ?? 300) - 20, 60);
    const height = Math.max(view.canvas.clientHeight || CHART_HEIGHT - TEXT_HEIGHT, 40);
    const ratio = window.devicePixelRatio || 1;
    if (view.canvas.width !== Math.round(width * ratio) || view.canvas.height !== Math.round(height * ratio)) {
        view.canvas.width = Math.round(width * ratio);
        view.canvas.height = Math.round(height * ratio);
    }
    const ctx = view.canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    const plotted = drawChart(ctx, width, height, series);
    const text = summaryText(series);
    view.text.textContent = text;
    view.text.title = text;
    // What is on screen, for tests and for anyone inspecting the page.
    view.container.dataset.points = JSON.stringify(plotted);
    view.container.dataset.summary = text;
}

function store(node, series) {
    node.properties ??= {};
    node.properties[PROPERTY] = series;
    render(node);
    node.setDirtyCanvas?.(true, false);
}

function addChartWidget(node) {
    if (node.dnoChart) return;
    const container = document.createElement("div");
    container.className = "dno-chart";
    container.dataset.dnoNode = String(node.id);
    Object.assign(container.style, {
        display: "flex", flexDirection: "column", width: "100%", height: "100%",
        boxSizing: "border-box", minHeight: `${CHART_HEIGHT}px`,
    });
    const canvas = document.createElement("canvas");
    Object.assign(canvas.style, { flex: "1 1 auto", width: "100%", minHeight: "0", display: "block" });
    const text = document.createElement("div");
    Object.assign(text.style, {
        flex: `0 0 ${TEXT_HEIGHT}px`, font: "11px sans-serif", color: "#ddd", overflow: "hidden",
        lineHeight: "14px", padding: "1px 4px", boxSizing: "border-box",
    });
    container.append(canvas, text);
    node.dnoChart = { container, canvas, text, observer: null };

    node.addDOMWidget(WIDGET, "dno_chart", container, {
        serialize: false, // the series is saved in node.properties, not in widgets_values
        hideOnZoom: false,
        getMinHeight: () => CHART_HEIGHT,
    });
    if (typeof ResizeObserver !== "undefined") {
        node.dnoChart.observer = new ResizeObserver(() => render(node));
        node.dnoChart.observer.observe(container);
    }
    render(node);
}

function onProgress(event) {
    const detail = event?.detail;
    if (!detail || detail.node === undefined || detail.node === null) return;
    const node = nodeByExecutionId(detail.node);
    if (!isDNONode(node)) return; // another workflow is open, or the node was deleted
    store(node, withProgress(seriesOf(node), detail));
}

function onDone(event) {
    const detail = event?.detail;
    if (!detail || detail.node === undefined || detail.node === null) return;
    const node = nodeByExecutionId(detail.node);
    if (!isDNONode(node)) return;
    store(node, withDone(seriesOf(node), detail));
}

app.registerExtension({
    name: "dno.rewardChart",

    setup() {
        api.addEventListener("dno.progress", onProgress);
        api.addEventListener("dno.done", onDone);
    },

    async beforeRegisterNodeDef(nodeType, nodeData) {
        if (!DNO_NODE_TYPES.has(nodeData?.name)) return;

        const onNodeCreated = nodeType.prototype.onNodeCreated;
        nodeType.prototype.onNodeCreated = function () {
            const result = onNodeCreated?.apply(this, arguments);
            this.properties ??= {};
            this.properties[PROPERTY] ??= emptySeries();
            addChartWidget(this);
            const [w, h] = this.computeSize?.() ?? this.size;
            this.setSize?.([Math.max(this.size?.[0] ?? 0, w, 340), Math.max(this.size?.[1] ?? 0, h)]);
            return result;
        };

        // A loaded workflow brings its saved series back in properties: redraw from it.
        const onConfigure = nodeType.prototype.onConfigure;
        nodeType.prototype.onConfigure = function () {
            const result = onConfigure?.apply(this, arguments);
            if (this.dnoChart) {
                this.dnoChart.container.dataset.dnoNode = String(this.id);
                render(this);
            }
            return result;
        };

        const onRemoved = nodeType.prototype.onRemoved;
        nodeType.prototype.onRemoved = function () {
            this.dnoChart?.observer?.disconnect();
            return onRemoved?.apply(this, arguments);
        };
    },
});
