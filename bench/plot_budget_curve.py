"""DNO step time against the memory budget (``memory_budget_gb``), from bench/run.py JSON lines.

    python bench/plot_budget_curve.py bench/results/<file>.jsonl --model sdxl --out bench/sdxl_budget_curve.png

Plots the measured step time and peak memory of every ``auto=<GiB>`` run (and the ``blocks`` and
``step`` runs as reference lines where present) and prints the same as a markdown table.
"""
from __future__ import annotations

import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def load(paths, model):
    """The runs of ``model``, one per mode: a later file's run replaces an earlier one (a newer
    commit measured again). A 2-update run's only timed interval includes the warm-up; its
    second interval (a backward, the update and the final render) stands in, marked ``*``; a run
    with channels-last weights is marked (NHWC)."""
    runs = {}
    for path in paths:
        for line in open(path):
            if line.startswith("{") and '"mode"' in line:
                r = json.loads(line)
                if r.get("model") != model or not r.get("dno_step_s") or r.get("channels_last"):
                    continue
                r["mark"] = ""
                if r.get("step_time_includes_warmup") and len(r.get("dno_step_s_all") or []) >= 2:
                    r["dno_step_s"], r["mark"] = r["dno_step_s_all"][1], "*"
                if r.get("dno_channels_last"):     # measured with channels-last weights (dno/layout.py)
                    r["mark"] += " (NHWC)"
                runs[r["mode"]] = r
    return list(runs.values())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("paths", nargs="+")
    ap.add_argument("--model", default="sdxl")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    runs = load(args.paths, args.model)
    budgeted = sorted((r for r in runs if r["mode"].startswith("auto=")), key=lambda r: r["memory_budget_gb"])
    if not budgeted:
        raise SystemExit(f"no auto=<GiB> runs of {args.model} in {args.paths}")
    gpu = budgeted[0].get("gpu", "?")
    print(f"| budget GiB | plan | DNO step s | peak GiB | first update s | commit |   ({args.model}, {gpu})")
    print("|---|---|---|---|---|---|")
    for r in budgeted:
        plan = r.get("plan") or {}
        what = "blocks" if plan.get("block_checkpointing") else f"{plan.get('stored_steps', '?')} stored"
        print(f"| {r['memory_budget_gb']:g} | {what} | {r['dno_step_s']:.2f}{r['mark']} | {r['peak_gib']:.2f} "
              f"| {r['first_update_s']:.1f} | {r.get('commit', '?')} |")
    fig, ax = plt.subplots(figsize=(6, 4))
    budgets = [r["memory_budget_gb"] for r in budgeted]
    ax.plot(budgets, [r["dno_step_s"] for r in budgeted], "o-", label="auto with memory_budget_gb")
    for r in runs:
        if r["mode"] in ("blocks", "step"):
            ax.axhline(r["dno_step_s"], ls="--", lw=1, color="grey")
            ax.annotate(f"{r['mode']} ({r['peak_gib']:.1f} GiB peak)", (budgets[0], r["dno_step_s"]),
                        fontsize=8, va="bottom")
    for r in budgeted:
        ax.annotate(f"{r['peak_gib']:.1f} GiB", (r["memory_budget_gb"], r["dno_step_s"]), fontsize=8,
                    textcoords="offset points", xytext=(4, 4))
    ax.set_xlabel("memory_budget_gb (GiB)")
    ax.set_ylabel("DNO step (s)")
    ax.set_title(f"{args.model.upper()} {budgeted[0]['resolution']}², {budgeted[0]['steps']} steps, "
                 f"{budgeted[0]['precision']}, {gpu}", fontsize=9)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
