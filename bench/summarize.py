"""Print a markdown table of benchmark JSON lines: python bench/summarize.py FILE.jsonl ..."""
from __future__ import annotations

import json
import sys


def rows(paths):
    for path in paths:
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line.startswith("{") and '"mode"' in line:
                    yield json.loads(line)


def fmt(v, spec="{:.2f}"):
    return "-" if v is None else spec.format(v)


def main(paths) -> None:
    print("| model | precision | mode | plain gen s | DNO step s | ratio | peak GiB | stored steps | released |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows(paths):
        if "error" in r:
            print(f"| {r['model']} | {r['precision']} | {r['mode']}{' + compile' if r.get('compile') else ''} | {fmt(r.get('plain_generation_s'))} "
                  f"| {r['error'][:60]} | | | | |")
            continue
        plan = r.get("plan") or {}
        stored = plan.get("stored_steps", "-")
        if plan.get("block_checkpointing"):
            stored = f"{stored} + blocks"
        mode = r["mode"] + (" (weight grads on)" if r.get("weight_grads") else "")
        mode += " + compile" if r.get("compile") else ""
        mode += " (stock conv)" if r.get("stock_conv") else ""
        mode += " [invalid: see note]" if r.get("note") else ""
        mode += " + channels-last" if r.get("channels_last") else ""
        mode += " (expandable segments)" if "expandable_segments:True" in (r.get("allocator") or {}).get("conf", "") else ""
        print(f"| {r['model']} {r['resolution']}² | {r['precision']} | {mode} | {fmt(r['plain_generation_s'])} "
              f"| {fmt(r['dno_step_s'])} | {fmt(r.get('ratio_to_plain'))} | {fmt(r['peak_gib'])} | {stored} "
              f"| {r['released']} |")


if __name__ == "__main__":
    main(sys.argv[1:])
