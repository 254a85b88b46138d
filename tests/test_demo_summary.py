"""data/demo_summary.py measures a demo from its run folders and samples (fake ones here, known values)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

DATA = Path(__file__).resolve().parents[1] / "data"


def _module():
    sys.path.insert(0, str(DATA))
    try:
        spec = importlib.util.spec_from_file_location("demo_summary", DATA / "demo_summary.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(DATA))


def test_summary_reads_steps_time_losses_and_checks_backgrounds(tmp_path):
    ds = _module()
    run = tmp_path / "txt2img"  # make demo: <demo folder>/<stage>, the exact run (no `latest` link)
    run.mkdir(parents=True)
    (run / "metrics.csv").write_text(
        "step,train/loss,val/loss\n9,0.30,\n19,0.20,0.25\n1199,0.02,\n1199,,0.03\n"
    )
    (run / "train.log").write_text(
        "[2026-01-01 00:00:00,100][x][INFO] - start\n[2026-01-01 00:04:59,900][x][INFO] - end\n"
    )
    (run / "model.safetensors").write_bytes(b"")
    samples = tmp_path / "samples" / "txt2img"
    samples.mkdir(parents=True)
    blue, green = ds.COLORS["blue"], ds.COLORS["green"]
    Image.fromarray(np.full((32, 32, 3), blue, np.uint8)).save(samples / "0000_seed0.png")
    Image.fromarray(np.full((32, 32, 3), green, np.uint8)).save(samples / "0001_seed1.png")
    images = [
        {"file": "0000_seed0.png", "prompt": "a large red circle on a blue background"},
        {"file": "0001_seed1.png", "prompt": "a large red circle on a white background"},
    ]
    (samples / "run.json").write_text(json.dumps({"images": images}))
    summary = ds.summarise(tmp_path)
    s = summary["stages"]["txt2img"]
    assert s["steps"] == 1200 and s["seconds"] == 299
    assert (s["train_loss_first"], s["train_loss_last"], s["val/loss"]) == (0.30, 0.02, 0.03)
    bg = summary["txt2img_background"]
    assert (bg["right"], bg["of"]) == (1, 2) and bg["images"][1]["seen"] == "green"
    text = ds.markdown(summary)
    assert "| txt2img | 1200 | 4 min 59 s | 0.300 → 0.020 | val/loss 0.03 |" in text and "1/2" in text


def test_summary_puts_superres_next_to_bicubic(tmp_path, monkeypatch):
    """The SR check reads the demo's superres model on the validation shards and reports both PSNRs."""
    from ldm.evaluate import run, sources

    ds = _module()
    (tmp_path / "superres").mkdir()
    (tmp_path / "superres" / "model.safetensors").write_bytes(b"")
    seen = {}

    def fake_evaluate(model, reference, factor, device, steps):
        seen.update(model=model, n=reference, factor=factor, steps=steps)
        return {
            "reference": {"n": 50},
            "metrics": {"psnr": 14.391, "ssim": 0.6201, "rfid": 1.0},
            "bicubic": {"psnr": 29.402, "ssim": 0.9311, "rfid": 0.5},
        }

    monkeypatch.setattr(run, "evaluate_superres", fake_evaluate)
    monkeypatch.setattr(sources, "read_images", lambda spec, limit: f"{spec}:{limit}")
    summary = ds.summarise(tmp_path, sr_reference="val-*.tar", sr_limit=50)
    assert seen == {"model": tmp_path / "superres" / "model.safetensors", "n": "val-*.tar:50", "factor": 4,
                    "steps": 25}  # fmt: skip
    sr = summary["superres_vs_bicubic"]
    assert sr["model"] == {"psnr": 14.391, "ssim": 0.6201}
    assert sr["bicubic"] == {"psnr": 29.402, "ssim": 0.9311}
    text = ds.markdown(summary)
    want = "PSNR 14.39 dB, SSIM 0.620; bicubic upscaling of the same inputs: PSNR 29.40 dB, SSIM 0.931"
    assert want in text
    assert ds.summarise(tmp_path)["superres_vs_bicubic"] is None  # no --sr-reference: not measured
