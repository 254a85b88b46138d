"""metrics.csv beside any logger; the SampleMetrics callback in short train.py runs (issue 12, items 2-3)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from train_helpers import RESOLUTION, compose_train, tiny_overrides

import train
from ldm.errors import UserError
from ldm.evaluate import scores
from ldm.evaluate.report import compare_runs
from ldm.training.metrics import MetricsCSVLogger, SampleMetrics, read_metrics_csv

STEPS = 4


def test_csv_logger_merges_a_step_adds_columns_and_writes_atomically(tmp_path):
    path = tmp_path / "run" / "metrics.csv"
    logger = MetricsCSVLogger(path, flush_every_n_steps=2)
    logger.log_metrics({"train/loss": torch.tensor(0.5)}, step=1)
    assert not path.exists()  # one unsaved step < flush_every_n_steps
    logger.log_metrics({"lr": 1e-4}, step=1)  # same step: same row
    logger.log_metrics({"train/loss": 0.25, "val/loss": 0.75}, step=2)  # a new column
    assert path.is_file()  # two steps logged: flushed
    logger.log_metrics({"eval/fid": 12.5}, step=4)
    logger.log_metrics({"val/loss": 0.5}, step=3)  # an earlier step logged later: rows stay in step order
    logger.finalize("success")
    rows, keys = read_metrics_csv(path)
    assert keys == ["step", "train/loss", "lr", "val/loss", "eval/fid"]
    assert rows == [
        {"step": 1, "train/loss": 0.5, "lr": 1e-4},
        {"step": 2, "train/loss": 0.25, "val/loss": 0.75},
        {"step": 3, "val/loss": 0.5},
        {"step": 4, "eval/fid": 12.5},
    ]
    assert sorted(p.name for p in path.parent.iterdir()) == ["metrics.csv"]  # no temporary file left
    again = MetricsCSVLogger(path)  # the same folder again: earlier rows are kept
    again.log_metrics({"train/loss": 0.125}, step=5)
    again.save()
    assert [r["step"] for r in read_metrics_csv(path)[0]] == [1, 2, 3, 4, 5]


def test_unknown_metric_and_clip_without_model_are_user_errors():
    with pytest.raises(UserError, match=r"unknown \['is'\]"):
        SampleMetrics(every_n_steps=1, metrics=["fid", "is"], features="tiny")
    with pytest.raises(UserError, match="clip_score needs clip_model"):
        SampleMetrics(every_n_steps=1, metrics=["clip_score"])
    with pytest.raises(UserError, match="weights-inception-2015-12-05"):  # before training starts
        SampleMetrics(every_n_steps=1, metrics=["fid"], features="inception")


def _rows_with(rows: list[dict], key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in rows if key in r}


def test_autoencoder_run_logs_reconstruction_metrics_to_csv_and_grid(tiny_data, tiny_ae, tmp_path):
    run_dir = tmp_path / "runs" / "autoencoder_kl" / "a"
    overrides = tiny_overrides("autoencoder_kl", tiny_data, run_dir, tiny_ae, max_steps=STEPS)
    overrides += [
        "callbacks.sample_metrics.every_n_steps=2",
        "callbacks.sample_metrics.metrics=[psnr,ssim,rfid]",
        "callbacks.sample_metrics.features=tiny",
        "callbacks.sample_metrics.num_images=4",
        f"callbacks.sample_metrics.reference={tiny_data}/val-*.tar",
        "callbacks.metrics_csv.flush_every_n_steps=1",
    ]
    train.train(compose_train(overrides))

    rows, _ = read_metrics_csv(run_dir / "metrics.csv")
    psnr = _rows_with(rows, "eval/psnr")
    assert sorted(psnr) == [2, 4] and sorted(_rows_with(rows, "eval/rfid")) == [2, 4]
    assert sorted(_rows_with(rows, "train/g_loss")) == [0, 1, 2, 3]  # every logged value is in the CSV
    assert sorted(_rows_with(rows, "val/psnr")) == [1, 3] and [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    # the numbers beside the grid are those of the CSV, and they are those of the images in the grid
    info = json.loads((run_dir / "images" / "metrics_step000004.json").read_text())
    assert info["metrics"]["eval/psnr"] == pytest.approx(psnr[4], rel=1e-12)
    grid = torch.from_numpy(np.asarray(Image.open(run_dir / "images/metrics_step000004.png")))
    side = RESOLUTION + 2
    assert grid.shape == (side * 2 + 2, side * 4 + 2, 3)  # originals row over reconstructions row
    cells = [
        grid[2 + r * side : r * side + side, 2 + c * side : c * side + side].permute(2, 0, 1)
        for r in (0, 1)
        for c in range(4)
    ]
    real, recon = torch.stack(cells[:4]), torch.stack(cells[4:])
    assert scores.reconstruction_scores(real, recon)["psnr"] == pytest.approx(psnr[4], abs=1e-4)
    # Lightning's own CSVLogger (logger=csv) still writes its file; ours is the one at the run's root
    assert (run_dir / "csv" / "version_0" / "metrics.csv").is_file()


def test_diffusion_run_logs_fid_kid_beside_tensorboard_and_runs_compare(tiny_data, tiny_ae, tmp_path):
    runs = tmp_path / "runs" / "class_cond"
    for name in ("a", "b"):
        overrides = tiny_overrides("class_cond", tiny_data, runs / name, tiny_ae, max_steps=STEPS)
        overrides += [
            "logger=tensorboard",  # not a CSV logger: metrics.csv is written all the same
            "callbacks.sample_metrics.every_n_steps=2",
            "callbacks.sample_metrics.features=tiny",
            "callbacks.sample_metrics.kid_subset_size=4",
            "callbacks.metrics_csv.flush_every_n_steps=1",
            "callbacks.image_logger.every_n_steps=0",
            "data.batch_size=4",
        ]
        if name == "b":
            overrides += ["seed=1"]  # another initialisation: other samples, another FID
        train.train(compose_train(overrides))

    rows, _ = read_metrics_csv(runs / "a" / "metrics.csv")
    fid, kid = _rows_with(rows, "eval/fid"), _rows_with(rows, "eval/kid")
    assert sorted(fid) == [2, 4] and sorted(kid) == [2, 4]
    assert all(math.isfinite(v) and v > 0 for v in fid.values())
    assert (runs / "a" / "tensorboard").is_dir()
    # the FID in the CSV is that of the logged samples against the first batch's real images
    info = json.loads((runs / "a" / "images" / "metrics_step000004.json").read_text())
    assert info["metrics"]["eval/fid"] == pytest.approx(fid[4], rel=1e-12) and info["images"] == 4

    summaries, text = compare_runs([str(runs / "*")])
    assert [s["run"] for s in summaries] == [str(runs / "a"), str(runs / "b")]
    assert summaries[0]["eval/fid"] == pytest.approx(fid[4], rel=1e-12) and summaries[0]["steps"] == STEPS
    assert "eval/fid" in text.splitlines()[0] and summaries[0]["eval/fid"] != summaries[1]["eval/fid"]


def test_evaluate_draws_samples_from_a_checkpoint(tiny_data, tiny_ae, tmp_path, capsys):
    from ldm.evaluate import cli
    from ldm.evaluate.features import TinyFeatures, extract
    from ldm.evaluate.sources import read_images
    from ldm.pipeline import Pipeline

    run_dir = tmp_path / "class_cond"
    overrides = tiny_overrides("class_cond", tiny_data, run_dir, tiny_ae, max_steps=1)
    train.train(compose_train(overrides + ["callbacks.image_logger.every_n_steps=0"]))
    model = run_dir / "model.safetensors"
    args = [
        "--checkpoint",
        str(model),
        "--labels",
        "0",
        "1",
        "--n",
        "3",
        "--steps",
        "2",
        "--features",
        "tiny",
    ]
    args += ["--reference", f"{tiny_data}/val-*.tar", "--kid-subset-size", "4", "--no-cache"]
    assert cli.main(args) == 0
    record = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert record["generated"]["n"] == 6 and record["generated"]["size"] == RESOLUTION
    # the same images as Pipeline.class_cond with those settings (image i: seed i), the same FID
    images = Pipeline.from_file(model, device="cpu").class_cond([0, 1], n=3, steps=2, seed=0).tensors
    fake = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    real = read_images(f"{tiny_data}/val-*.tar", RESOLUTION).images
    net = TinyFeatures()
    assert record["metrics"]["fid"] == pytest.approx(
        scores.fid(extract(net, real), extract(net, fake)), abs=1e-9
    )


@pytest.mark.slow  # W&B's offline service takes a few seconds to start and stop
def test_metrics_csv_is_written_beside_offline_wandb(tiny_data, tiny_ae, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    run_dir = tmp_path / "runs" / "uncond" / "w"
    overrides = tiny_overrides("uncond", tiny_data, run_dir, tiny_ae, max_steps=2)
    overrides += ["logger=wandb", "callbacks.image_logger.every_n_steps=0"]
    metrics = train.train(compose_train(overrides))
    rows, keys = read_metrics_csv(run_dir / "metrics.csv")
    assert (run_dir / "wandb").is_dir() and {"train/loss", "val/loss"} <= set(keys)
    assert _rows_with(rows, "val/loss")[1] == pytest.approx(metrics["val/loss"], rel=1e-6)
