// ComfyUI extension: DNO Score Image shows its scores on the node.
//
// The node returns {"ui": {"text": ["0.4587, 0.4601"]}}; the frontend hands that to the node's
// onExecuted and, for a "text" key, displays nothing by itself. The last scores live in
// node.properties, so they are saved with the workflow and shown again after a reload.
import { app } from "../../scripts/app.js";

const NODE_TYPE = "DNOScoreImage";
const PROPERTY = "dno_scores";
const WIDGET = "dno_scores";
const HEIGHT = 40;

/** The line shown for the scores of one run: "score 0.4587" or "scores 0.4587, 0.4601". */
export function scoreLine(text) {
    if (typeof text !== "string" || !text.trim()) return "DNO: not scored yet";
    return `${text.includes(",") ? "scores" : "score"} ${text}`;
}

function render(node) {
    const view = node.dnoScores;
    if (!view) return;
    const text = node.properties?.[PROPERTY] ?? "";
    const line = scoreLine(text);
    view.textContent = line;
    view.title = line;
    view.dataset.scores = text; // what is on screen, for tests and anyone inspecting the page
    view.dataset.dnoNode = String(node.id); // the id is assigned when the node joins a graph
}

function addScoreWidget(node) {
    if (node.dnoScores) return;
    const view = document.createElement("div");
    view.className = "dno-scores";
    Object.assign(view.style, {
        font: "13px sans-serif", color: "#ddd", background: "#1e1e1e", borderRadius: "4px",
        padding: "4px 6px", boxSizing: "border-box", width: "100%", minHeight: `${HEIGHT - 8}px`,
        overflow: "hidden", textOverflow: "ellipsis", whiteSpace: "nowrap", userSelect: "text",
    });
    node.dnoScores = view;
    node.addDOMWidget(WIDGET, "dno_scores", view, {
        serialize: false, // the scores are saved in node.properties, not in widgets_values
        hideOnZoom: false,
        getMinHeight: () => HEIGHT,
    });
    render(node);
}

app.registerExtension({
    name: "dno.scoreImage",

    async beforeRegisterNodeDef(nodeType, nodeData) {
        if (nodeData?.name !== NODE_TYPE) return;

        const onNodeCreated = nodeType.prototype.onNodeCreated;
        nodeType.prototype.onNodeCreated = function () {
            const result = onNodeCreated?.apply(this, arguments);
            this.properties ??= {};
            this.properties[PROPERTY] ??= "";
            addScoreWidget(this);
            const [w, h] = this.computeSize?.() ?? this.size;
            this.setSize?.([Math.max(this.size?.[0] ?? 0, w, 260), Math.max(this.size?.[1] ?? 0, h)]);
            return result;
        };

        const onExecuted = nodeType.prototype.onExecuted;
        nodeType.prototype.onExecuted = function (output) {
            const result = onExecuted?.apply(this, arguments);
            const text = Array.isArray(output?.text) ? output.text.join(", ") : output?.text;
            if (typeof text === "string") {
                this.properties ??= {};
                this.properties[PROPERTY] = text;
                render(this);
                this.setDirtyCanvas?.(true, false);
            }
            return result;
        };

        // Added to a graph (its id is known now), or loaded with saved scores: show them.
        for (const hook of ["onAdded", "onConfigure"]) {
            const previous = nodeType.prototype[hook];
            nodeType.prototype[hook] = function () {
                const result = previous?.apply(this, arguments);
                render(this);
                return result;
            };
        }
    },
});
