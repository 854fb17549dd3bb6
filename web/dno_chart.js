// The reward chart of a DNO run: its data (a plain, JSON-serialisable series) and its drawing.
// No ComfyUI imports here: dno.js wires this to the app, the server messages and the node.

export const COLORS = {
    reward: "#4fa3ff",
    best: "#ffb347",
    probability: "#c77dff",
    axis: "#888",
    text: "#ddd",
    grid: "rgba(255,255,255,0.08)",
    background: "#1e1e1e",
};

/** A new, empty series for a run of `steps` optimisation steps (null when unknown). */
export function emptySeries(steps = null) {
    return { steps: Number.isFinite(steps) ? steps : null, points: [], done: null };
}

/** A series read back from a saved workflow; anything malformed becomes an empty series. */
export function seriesFrom(saved) {
    if (!saved || typeof saved !== "object" || !Array.isArray(saved.points)) return emptySeries();
    const points = saved.points
        .filter((p) => p && Number.isInteger(p.step) && Number.isFinite(p.reward))
        .map((p) => ({
            step: p.step,
            reward: p.reward,
            best: Number.isFinite(p.best) ? p.best : p.reward,
            probability: Number.isFinite(p.probability) ? p.probability : null,
        }))
        .sort((a, b) => a.step - b.step);
    const done = saved.done && typeof saved.done === "object" ? saved.done : null;
    return { steps: Number.isFinite(saved.steps) ? saved.steps : null, points, done };
}

/**
 * The series after one "dno.progress" message. A message with `reset` starts a new run;
 * a step is stored by its index, so a repeated or late message replaces, never duplicates.
 */
export function withProgress(series, detail) {
    if (detail.reset) return emptySeries(detail.steps);
    if (!Number.isInteger(detail.step) || detail.step < 0 || !Number.isFinite(detail.reward)) return series;
    const point = {
        step: detail.step,
        reward: detail.reward,
        best: Number.isFinite(detail.best) ? detail.best : detail.reward,
        probability: Number.isFinite(detail.probability) ? detail.probability : null,
    };
    const points = series.points.filter((p) => p.step !== point.step);
    points.push(point);
    points.sort((a, b) => a.step - b.step);
    const steps = Number.isFinite(detail.steps) ? detail.steps : series.steps;
    return { steps, points, done: null };
}

/** The series after the "dno.done" message of its run. */
export function withDone(series, detail) {
    const done = {
        best: Number.isFinite(detail.best) ? detail.best : null,
        initial: Number.isFinite(detail.initial) ? detail.initial : null,
        probability: Number.isFinite(detail.probability) ? detail.probability : null,
        stop_reason: typeof detail.stop_reason === "string" ? detail.stop_reason : null,
    };
    return { ...series, done };
}

const fmt = (x, digits = 4) => (Number.isFinite(x) ? x.toFixed(digits) : "–");
const fmtP = (p) => (Number.isFinite(p) ? Number(p.toPrecision(3)).toString() : null);

/** The one-line summary shown under the chart. */
export function summaryText(series) {
    const last = series.points[series.points.length - 1];
    if (!last) return series.steps === null ? "DNO: no run yet" : `DNO: starting ${series.steps} steps…`;
    const parts = [];
    if (series.done) {
        const d = series.done;
        parts.push(`final reward ${fmt(d.best)} (start ${fmt(d.initial)})`);
        const p = fmtP(d.probability ?? last.probability);
        if (p !== null) parts.push(`noise p=${p}`);
        parts.push(d.stop_reason ? `${d.stop_reason}` : "done");
    } else {
        parts.push(`reward ${fmt(last.reward)} (best ${fmt(last.best)})`);
        const p = fmtP(last.probability);
        if (p !== null) parts.push(`noise p=${p}`);
        parts.push(`step ${last.step}/${series.steps ?? "?"}`);
    }
    return parts.join(" · ");
}

function rewardRange(points) {
    let lo = Infinity;
    let hi = -Infinity;
    for (const p of points) {
        lo = Math.min(lo, p.reward, p.best);
        hi = Math.max(hi, p.reward, p.best);
    }
    if (!Number.isFinite(lo)) return [0, 1];
    const pad = hi > lo ? (hi - lo) * 0.08 : Math.max(Math.abs(hi) * 0.05, 1e-3);
    return [lo - pad, hi + pad];
}

/**
 * Draw the series on a 2D canvas context of CSS size (width, height). Returns the points
 * it plotted as [step, reward, best, probability] rows, so callers can expose what is drawn.
 */
export function drawChart(ctx, width, height, series) {
    ctx.clearRect(0, 0, width, height);
    ctx.fillStyle = COLORS.background;
    ctx.fillRect(0, 0, width, height);
    const points = series.points;
    const hasProbability = points.some((p) => p.probability !== null);
    const box = { left: 46, right: width - (hasProbability ? 30 : 10), top: 16, bottom: height - 18 };
    if (box.right - box.left < 20 || box.bottom - box.top < 20) return [];

    const lastStep = Math.max(series.steps ?? 0, points.length ? points[points.length - 1].step : 0, 1);
    const [lo, hi] = rewardRange(points);
    const x = (step) => box.left + ((box.right - box.left) * step) / lastStep;
    const y = (r) => box.bottom - ((box.bottom - box.top) * (r - lo)) / (hi - lo);
    const yp = (p) => box.bottom - (box.bottom - box.top) * p;

    ctx.font = "10px sans-serif";
    ctx.lineWidth = 1;
    ctx.strokeStyle = COLORS.grid;
    for (let i = 0; i <= 4; i++) {
        const gy = box.top + ((box.bottom - box.top) * i) / 4;
        ctx.beginPath();
        ctx.moveTo(box.left, gy);
        ctx.lineTo(box.right, gy);
        ctx.stroke();
    }
    ctx.strokeStyle = COLORS.axis;
    ctx.strokeRect(box.left, box.top, box.right - box.left, box.bottom - box.top);

    ctx.fillStyle = COLORS.axis;
    ctx.textAlign = "right";
    ctx.textBaseline = "middle";
    if (points.length) {
        ctx.fillText(fmt(hi, 3), box.left - 3, box.top);
        ctx.fillText(fmt(lo, 3), box.left - 3, box.bottom);
    }
    if (hasProbability) {
        ctx.textAlign = "left";
        ctx.fillText("p 1", box.right + 3, box.top);
        ctx.fillText("0", box.right + 3, box.bottom);
    }
    ctx.textAlign = "center";
    ctx.textBaseline = "top";
    ctx.fillText("0", box.left, box.bottom + 3);
    ctx.fillText(String(lastStep), box.right, box.bottom + 3);
    ctx.fillText("step", (box.left + box.right) / 2, box.bottom + 3);

    ctx.textAlign = "left";
    ctx.textBaseline = "top";
    const legend = [["reward", COLORS.reward], ["best", COLORS.best]];
    if (hasProbability) legend.push(["noise p", COLORS.probability]);
    let lx = box.left;
    for (const [label, color] of legend) {
        ctx.fillStyle = color;
        ctx.fillRect(lx, 4, 8, 8);
        ctx.fillStyle = COLORS.text;
        ctx.fillText(label, lx + 11, 2);
        lx += ctx.measureText(label).width + 24;
    }
    if (!points.length) return [];

    const line = (values, scale, color, dash) => {
        ctx.save();
        ctx.strokeStyle = color;
        ctx.lineWidth = 1.5;
        ctx.setLineDash(dash);
        ctx.beginPath();
        let started = false;
        for (const [step, v] of values) {
            if (v === null) {
                started = false;
                continue;
            }
            if (started) ctx.lineTo(x(step), scale(v));
            else ctx.moveTo(x(step), scale(v));
            started = true;
        }
        ctx.stroke();
        ctx.restore();
    };
    if (hasProbability) line(points.map((p) => [p.step, p.probability]), yp, COLORS.probability, [2, 2]);
    line(points.map((p) => [p.step, p.best]), y, COLORS.best, [5, 3]);
    line(points.map((p) => [p.step, p.reward]), y, COLORS.reward, []);
    ctx.fillStyle = COLORS.reward;
    for (const p of points) {
        ctx.beginPath();
        ctx.arc(x(p.step), y(p.reward), 2.2, 0, 2 * Math.PI);
        ctx.fill();
    }
    return points.map((p) => [p.step, p.reward, p.best, p.probability]);
}
