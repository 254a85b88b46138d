"""Terminal tables: one evaluation record, and a comparison of training runs (`--runs outputs/<exp>/*`)."""

from __future__ import annotations

import csv
import glob
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ldm.errors import UserError

# How to read each metric: which direction is better (shown in the tables)
BETTER = {
    "fid": "lower",
    "kid": "lower",
    "kid_std": "",
    "rfid": "lower",
    "clip_score": "higher",
    "psnr": "higher",
    "ssim": "higher",
    "lpips": "lower",
}


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value != 0 and abs(value) < 0.01:
            return f"{value:.3e}"
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:.1f}"
    return "" if value is None else str(value)


def table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    """A plain aligned text table (first column left-aligned, the others right-aligned)."""
    cells = [[str(h) for h in header]] + [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = []
    for n, row in enumerate(cells):
        parts = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        lines.append("  ".join(parts).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def record_table(record: Mapping[str, Any]) -> str:
    """The metrics of one `python -m ldm.evaluate` record, with a bicubic column for SR records."""
    metrics = record.get("metrics", {})
    bicubic = record.get("bicubic")
    header = ["metric", "value"] + (["bicubic"] if bicubic else []) + ["better"]
    rows = []
    for key, value in metrics.items():
        row = [key, value] + ([bicubic.get(key)] if bicubic else []) + [BETTER.get(key, "")]
        rows.append(row)
    lines = [table(rows, header)]
    gen, ref = record.get("generated") or {}, record.get("reference") or {}
    if gen:
        lines.append(f"generated: {gen.get('n')} images at {gen.get('size')} px from {gen.get('source')}")
    if ref:
        cached = " (features from the cache)" if ref.get("cached") else ""
        lines.append(f"reference: {ref.get('n')} images from {ref.get('source')}{cached}")
    if record.get("features"):
        lines.append(f"features: {record['features']}")
    if isinstance(record.get("lpips"), str):
        lines.append(f"lpips: {record['lpips']}")
    return "\n".join(lines)


# --- comparing training runs --------------------------------------------------------------------------
def find_metrics_csv(run: Path) -> Path | None:
    """A run folder's metrics.csv (always written), else a Lightning CSVLogger's csv/version_*/metrics.csv."""
    if (run / "metrics.csv").is_file():
        return run / "metrics.csv"
    found = sorted(run.glob("csv/version_*/metrics.csv"))
    return found[-1] if found else None


def read_metrics_csv(path: str | Path) -> tuple[list[dict[str, float]], list[str]]:
    """(rows, columns) of a metrics CSV (ours, or Lightning's CSVLogger metrics.csv); empty cells absent."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        keys = list(reader.fieldnames or [])
        rows = []
        for raw in reader:
            row = {k: float(v) for k, v in raw.items() if k and v not in ("", None)}
            if "step" in row:
                row["step"] = int(row["step"])
            rows.append(row)
    return rows, keys


def summarise_run(path: Path) -> dict[str, Any]:
    """{"run", "steps", <key>: last logged value} of one run folder."""
    csv_path = find_metrics_csv(path)
    if csv_path is None:
        return {"run": str(path), "steps": None}
    rows, keys = read_metrics_csv(csv_path)
    out: dict[str, Any] = {"run": str(path), "steps": max((r.get("step", 0) for r in rows), default=None)}
    for key in keys:
        if key in ("step", "epoch"):
            continue
        values = [r[key] for r in rows if key in r]
        if values:
            out[key] = values[-1]
    return out


def compare_runs(patterns: Sequence[str], keys: Sequence[str] | None = None) -> tuple[list[dict], str]:
    """Summaries of the run folders matching `patterns` (globs; `latest` links are skipped) and a table of
    their last logged values: val/*, eval/* and train/loss columns by default, or `keys`."""
    runs: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(os.path.expanduser(pattern))) or [pattern]
        for match in matches:
            p = Path(match)
            if p.is_dir() and not p.is_symlink() and p.resolve() not in [r.resolve() for r in runs]:
                runs.append(p)
    if not runs:
        raise UserError(f"--runs {' '.join(patterns)}: no run folders found (e.g. outputs/txt2img/*).")
    summaries = [summarise_run(r) for r in runs]
    if keys is None:
        present = sorted({k for s in summaries for k in s} - {"run", "steps"})
        keys = [k for k in present if k.startswith(("val/", "eval/")) or k in ("train/loss", "train/g_loss")]
    rows = [[s["run"], s.get("steps")] + [s.get(k) for k in keys] for s in summaries]
    text = table(rows, ["run", "steps", *keys])
    missing = [s["run"] for s in summaries if s["steps"] is None]
    if missing:  # runs from before metrics.csv existed, or logged to W&B/TensorBoard only
        text += "\nno metrics.csv (nor csv/version_*/metrics.csv) in: " + ", ".join(missing)
    return summaries, text
