"""What `make demo` produced, measured from its own outputs: `outputs/demo_summary.{md,json}`.

`make demo` writes every stage of one chain into one folder (`outputs/demo/<stamp>/<stage>`). Per training
stage: steps, wall time (first to last line of its train.log), first/last logged training loss and the last
validation metrics (its metrics.csv), and where the model is. For the txt2img samples
(`<demo>/samples/txt2img/run.json`): an automatic check of each image's background colour against the one its
prompt names (the nearest of the data set's named colours to the mean of the image's 4-px border). For the
superres model: PSNR/SSIM on validation images next to bicubic upscaling of the same low-res inputs
(`ldm.evaluate.run.evaluate_superres`). The README's demo figures are copied from this file.

    python data/demo_summary.py --demo outputs/demo/latest [--out outputs/demo/latest/summary]
        [--sr-reference 'data/shards/shapes/val-*.tar' --sr-limit 50]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import re
import subprocess
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from make_dataset import COLORS
from PIL import Image

STAGES = ("autoencoder_kl", "txt2img", "class_cond", "semantic", "superres")
STAMP = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),\d+\]")
VAL_KEYS = ("val/loss", "val/psnr", "val/rec_loss")


def _floats(rows: list[dict], key: str) -> list[float]:
    return [float(r[key]) for r in rows if r.get(key) not in (None, "")]


def stage_summary(run: Path) -> dict:
    """Steps, seconds, losses and validation metrics of one run folder."""
    out: dict = {"run": str(run.resolve()), "model": None, "steps": None, "seconds": None}
    model = run / "model.safetensors"
    out["model"] = str(model) if model.is_file() else None
    metrics = run / "metrics.csv"
    if metrics.is_file():
        rows = list(csv.DictReader(metrics.open()))
        steps = [int(float(r["step"])) for r in rows if r.get("step")]
        out["steps"] = max(steps) + 1 if steps else None  # rows carry the step index before the update
        key = "train/rec_loss" if any(r.get("train/rec_loss") for r in rows) else "train/loss"  # stage 1: L1
        out["train_loss_key"] = key
        loss = _floats(rows, key)
        if loss:
            out["train_loss_first"], out["train_loss_last"] = loss[0], loss[-1]
        for key in VAL_KEYS:
            values = _floats(rows, key)
            if values:
                out[key] = values[-1]
    log = run / "train.log"
    if log.is_file():
        times = [
            m.group(1) for line in log.read_text(errors="replace").splitlines() if (m := STAMP.match(line))
        ]
        if len(times) >= 2:
            first, last = (datetime.strptime(t, "%Y-%m-%d %H:%M:%S") for t in (times[0], times[-1]))
            out["seconds"] = int((last - first).total_seconds())
    return out


def nearest_colour(rgb: np.ndarray) -> str:
    names = list(COLORS)
    table = np.array([COLORS[n] for n in names], dtype=float)
    return names[int(np.argmin(((table - rgb) ** 2).sum(axis=1)))]


def background_check(samples: Path) -> dict | None:
    """Images whose border colour is the background their prompt names ("... on a blue background")."""
    record = samples / "run.json"
    if not record.is_file():
        return None
    images = json.loads(record.read_text())["images"]
    checked, right = [], 0
    for entry in images:
        named = re.search(r"on an? (\w+) background", entry.get("prompt") or "")
        if not named or named.group(1) not in COLORS:
            continue
        a = np.asarray(Image.open(samples / entry["file"]).convert("RGB"), dtype=float)
        border = np.concatenate([a[:4].reshape(-1, 3), a[-4:].reshape(-1, 3), a[:, :4].reshape(-1, 3),
                                 a[:, -4:].reshape(-1, 3)])  # fmt: skip
        seen = nearest_colour(border.mean(axis=0))
        right += seen == named.group(1)
        checked.append({"file": entry["file"], "asked": named.group(1), "seen": seen})
    return {"right": right, "of": len(checked), "images": checked}


def superres_check(model: Path, reference: str, limit: int, steps: int = 25) -> dict | None:
    """PSNR/SSIM of the SR model and of bicubic upscaling on `limit` reference images (seed i per image)."""
    if not model.is_file():
        return None
    from ldm.evaluate.run import evaluate_superres
    from ldm.evaluate.sources import read_images

    images = read_images(reference, limit=limit)
    record = evaluate_superres(model, images, factor=4, device="cpu", steps=steps)
    keep = ("psnr", "ssim")
    return {
        "n": record["reference"]["n"],
        "steps": steps,
        "model": {k: record["metrics"][k] for k in keep},
        "bicubic": {k: record["bicubic"][k] for k in keep},
    }


def summarise(demo: Path, sr_reference: str | None = None, sr_limit: int = 50) -> dict:
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    summary = {
        "commit": commit or None,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
        "stages": {},
    }
    summary["demo"] = str(demo.resolve())
    for name in STAGES:
        run = demo / name
        if run.exists():
            summary["stages"][name] = stage_summary(run)
    summary["txt2img_background"] = background_check(demo / "samples" / "txt2img")
    sr_model = demo / "superres" / "model.safetensors"
    sr = superres_check(sr_model, sr_reference, sr_limit) if sr_reference else None
    summary["superres_vs_bicubic"] = sr
    summary["samples"] = sorted(str(p) for p in (demo / "samples").glob("*") if p.is_dir())
    return summary


def markdown(summary: dict) -> str:
    lines = [
        f"make demo summary (commit {summary['commit']}, {summary['machine']})",
        "",
        "| stage | steps | time | train loss first → last (stage 1: rec. L1) | validation | model |",
        "|---|---|---|---|---|---|",
    ]
    for name, s in summary["stages"].items():
        secs = s.get("seconds")
        time = f"{secs // 60} min {secs % 60} s" if secs is not None else "?"
        loss = f"{s['train_loss_first']:.3f} → {s['train_loss_last']:.3f}" if "train_loss_first" in s else "?"
        val = ", ".join(f"{k} {s[k]:.4g}" for k in VAL_KEYS if k in s) or "-"
        lines.append(f"| {name} | {s.get('steps')} | {time} | {loss} | {val} | {s.get('model')} |")
    bg = summary.get("txt2img_background")
    if bg:
        lines += [
            "",
            f"txt2img samples with the background colour their prompt names: {bg['right']}/{bg['of']}",
        ]
    sr = summary.get("superres_vs_bicubic")
    if sr:
        m, b = sr["model"], sr["bicubic"]
        lines += [
            "",
            f"superres x4 on {sr['n']} validation images ({sr['steps']} steps): PSNR {m['psnr']:.2f} dB, "
            f"SSIM {m['ssim']:.3f}; bicubic upscaling of the same inputs: PSNR {b['psnr']:.2f} dB, "
            f"SSIM {b['ssim']:.3f}",
        ]
    lines += ["", "samples: " + ", ".join(summary["samples"])]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", default="outputs/demo/latest", help="the folder of one make demo chain")
    parser.add_argument("--out", default=None, help="summary.{md,json} path stem (default: <demo>/summary)")
    parser.add_argument("--sr-reference", default=None, help="validation shards for the SR vs bicubic check")
    parser.add_argument("--sr-limit", type=int, default=50, help="images in the SR check")
    args = parser.parse_args()
    demo = Path(args.demo)
    if not demo.is_dir():
        raise SystemExit(f"error: --demo {demo}: no such folder (make demo writes outputs/demo/<stamp>)")
    summary = summarise(demo, args.sr_reference, args.sr_limit)
    out = Path(args.out) if args.out else demo / "summary"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(summary, indent=2))
    text = markdown(summary)
    out.with_suffix(".md").write_text(text)
    print(text, end="")


if __name__ == "__main__":
    main()
