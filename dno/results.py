"""A run's results on disk: one JSON line per finished job, written so that a crash loses none.

``results.jsonl`` gets a line only after the job's images are in place, and each line is flushed
to disk before the next job starts; a line cut off by a crash is dropped when the file is opened
again. So a run stopped at any moment (a crash, Ctrl-C, a killed process) and started again with
the same command skips exactly the jobs that have a line, and every job ends with one result.
``settings.json`` holds the settings that shape a result; resuming with other settings is refused
rather than mixing two runs in one folder. Standard library only (the plot imports matplotlib).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, Iterable, List, Optional

from .errors import DNOError

RESULTS = "results.jsonl"
SETTINGS = "settings.json"
PLOT = "rewards.png"
IMAGES = "images"


def write_atomic(path: Path, data: bytes) -> None:
    """``path`` holds ``data`` entirely or keeps what it held (a temporary file, then a rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


class ResultStore:
    """The folder of one run: its settings, its results (keyed by job), its images."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.path = self.folder / RESULTS

    def open(self, settings: dict) -> Dict[str, dict]:
        """Create the folder or check it belongs to a run with these settings; the results so far."""
        self.folder.mkdir(parents=True, exist_ok=True)
        settings_path = self.folder / SETTINGS
        if settings_path.is_file():
            before = json.loads(settings_path.read_text())
            changed = {k: (before.get(k), settings.get(k)) for k in sorted(set(before) | set(settings))
                       if before.get(k) != settings.get(k)}
            if changed:
                listed = "; ".join(f"{k}: was {a!r}, now {b!r}" for k, (a, b) in changed.items())
                raise DNOError(f"--out {self.folder} holds results made with other settings ({listed}). Use "
                               "another --out for the new settings, or the same settings to resume that run")
        else:
            write_atomic(settings_path, (json.dumps(settings, indent=2, sort_keys=True) + "\n").encode())
        return {record["key"]: record for record in self.read()}

    def read(self) -> List[dict]:
        """The complete lines (the first of a key if one repeats); a cut-off last line is removed."""
        if not self.path.is_file():
            return []
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):                     # a line the crash cut off: drop it from the file too
            with open(self.path, "r+b") as handle:
                handle.truncate(end)
        records, seen = [], set()
        for number, line in enumerate(data[:end].decode("utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DNOError(f"{self.path} line {number} is not JSON ({error}); remove that line to "
                               "resume (its job then runs again)") from None
            if record.get("key") not in seen:
                seen.add(record.get("key"))
                records.append(record)
        return records

    def image_path(self, name: str) -> Path:
        return self.folder / IMAGES / name

    def append(self, record: dict, images: Optional[Dict[str, bytes]] = None) -> None:
        """Write the job's images, then its line (flushed to disk)."""
        for name, data in (images or {}).items():
            write_atomic(self.image_path(name), data)
        line = json.dumps(record, sort_keys=True) + "\n"
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())


def plot_rewards(records: Iterable[dict], path: Path, title: str) -> Optional[Path]:
    """Reward per DNO step of every result (thin) and their mean (thick) as a PNG; None if empty."""
    curves = [r["rewards"] for r in records if r.get("rewards")]
    if not curves:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    for curve in curves:
        ax.plot(range(len(curve)), curve, color="0.75", linewidth=0.8)
    longest = max(len(c) for c in curves)
    mean = [sum(c[i] for c in curves if len(c) > i) / sum(1 for c in curves if len(c) > i) for i in range(longest)]
    ax.plot(range(longest), mean, color="C0", linewidth=2, label=f"mean of {len(curves)}")
    ax.set_xlabel("DNO step")
    ax.set_ylabel("reward")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="lower right")
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(path.stem + ".partial.png")
    fig.savefig(str(tmp))
    plt.close(fig)
    os.replace(tmp, path)
    return path
