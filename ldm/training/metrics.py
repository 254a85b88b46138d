"""Metrics during training: a CSV of every logged value beside any logger, and a callback that scores a
fixed, seeded sample set every N steps (FID/KID/CLIP score for diffusion models; PSNR/SSIM/LPIPS/rFID of
reconstructions for autoencoders) with `ldm.evaluate`.

`metrics.csv` (run folder): one row per step, one column per key (`step` first), written atomically every
`flush_every_n_steps` logged steps and at the end; W&B stays offline and optional, the CSV is always there.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import Logger
from pytorch_lightning.utilities import rank_zero_only
from torch import Tensor

from ldm.errors import UserError
from ldm.evaluate.report import read_metrics_csv
from ldm.interop.checkpoint import atomic_path
from ldm.training.images import make_grid, save_png

log = logging.getLogger(__name__)

CSV_NAME = "metrics.csv"
GENERATION_METRICS = ("fid", "kid", "clip_score")
RECONSTRUCTION_METRICS = ("psnr", "ssim", "lpips", "rfid")


def _number(value: Any) -> float:
    return float(value.item() if isinstance(value, Tensor) else value)


class MetricsCSVLogger(Logger):
    """A Lightning logger writing `path` (CSV): columns `step` + every key ever logged, one row per step in
    step order (values logged at the same step merge into one row; a key missing at a step is an empty
    cell). Rank zero only."""

    def __init__(self, path: str | Path, flush_every_n_steps: int = 50) -> None:
        super().__init__()
        self.path = Path(path)
        self.flush_every_n_steps = max(1, int(flush_every_n_steps))
        self.rows: dict[int, dict[str, float]] = {}  # step -> its row
        self.keys: list[str] = ["step"]
        self._unsaved = 0
        if self.path.is_file():  # the same run folder again (a second fit): append, do not erase
            rows, self.keys = read_metrics_csv(self.path)
            self.rows = {int(r["step"]): r for r in rows if "step" in r}

    @property
    def name(self) -> str:
        return "metrics_csv"

    @property
    def version(self) -> str:
        return ""

    @property
    def save_dir(self) -> str:
        return str(self.path.parent)

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        """The run config is config.yaml in the run folder; nothing to add here."""

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Record scalar `metrics` at `step` (merged into that step's row)."""
        values = {k: _number(v) for k, v in metrics.items() if k != "step"}
        step = int(step if step is not None else metrics.get("step", len(self.rows)))
        if step not in self.rows:
            self.rows[step] = {"step": step}
            self._unsaved += 1
        self.rows[step].update(values)
        self.keys += [k for k in values if k not in self.keys]
        if self._unsaved >= self.flush_every_n_steps:
            self.save()

    @rank_zero_only
    def save(self) -> None:
        """Rewrite the whole CSV atomically (a kill leaves the previous complete file)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=self.keys, restval="")
            writer.writeheader()
            for _, row in sorted(self.rows.items()):
                writer.writerow({k: (int(v) if k == "step" else repr(v)) for k, v in row.items()})
        self._unsaved = 0

    @rank_zero_only
    def finalize(self, status: str) -> None:
        self.save()


class MetricsCSV(pl.Callback):
    """Adds a `MetricsCSVLogger` writing `path` beside whichever logger the run uses (or none)."""

    def __init__(self, path: str = CSV_NAME, flush_every_n_steps: int = 50) -> None:
        self.path = Path(path)
        self.flush_every_n_steps = int(flush_every_n_steps)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # after RunLifecycle (first in the list) attached the chosen loggers
        if not any(isinstance(lg, MetricsCSVLogger) for lg in trainer.loggers):
            trainer.loggers = [*trainer.loggers, MetricsCSVLogger(self.path, self.flush_every_n_steps)]


class SampleMetrics(pl.Callback):
    """Every `every_n_steps` (and at the end): score a fixed, seeded set with `ldm.evaluate`.

    Diffusion models: one image per (prompt or label, seed) from `prompts` / `prompt_file`, else
    `num_images` images for the first training batch's conditions (seeds seed + i), sampled with the EMA
    weights; `metrics` from fid, kid (against `reference`, a folder or shards, else the real images of that
    batch) and clip_score (needs `clip_model`, a local CLIP folder, and prompts). Autoencoders: the first
    `num_images` images of `reference` (else of the training batches) are reconstructed; metrics from
    psnr, ssim, lpips, rfid. Values go to every logger (`eval/<metric>`, so to metrics.csv too), and the
    images to `out_dir/metrics_step{N:06d}.png` with a JSON of the numbers. `every_n_steps=0`: off.
    """

    def __init__(
        self,
        every_n_steps: int = 0,
        metrics: Sequence[str] = ("fid", "kid"),
        prompts: Sequence[Any] | None = None,
        prompt_file: str | None = None,
        seeds: Sequence[int] = (0,),
        num_images: int = 16,
        reference: str | None = None,
        reference_limit: int | None = 1000,
        features: str = "inception",  # inception (+ feature_extractor_weights_path) | inception-random | tiny
        feature_extractor_weights_path: str | None = None,
        clip_model: str | None = None,
        lpips_vgg_weights: str | None = None,
        lpips_lin_weights: str | None = None,
        cfg_scale: float | None = None,
        resolution: int | None = None,
        kid_subset_size: int = 1000,
        cache_dir: str | None = None,
        out_dir: str = "images",
    ) -> None:
        from ldm.training.validation import ValidationImages

        self.every_n_steps = int(every_n_steps)
        self.metrics = [str(m) for m in metrics]
        unknown = sorted(set(self.metrics) - set(GENERATION_METRICS) - set(RECONSTRUCTION_METRICS))
        if unknown:
            raise UserError(
                f"callbacks.sample_metrics.metrics: unknown {unknown}; use some of "
                f"{', '.join(GENERATION_METRICS + RECONSTRUCTION_METRICS)}."
            )
        if "clip_score" in self.metrics and self.every_n_steps > 0 and not clip_model:
            raise UserError("callbacks.sample_metrics: clip_score needs clip_model=<local CLIP folder>.")
        self.inputs = ValidationImages(
            prompts, prompt_file, seeds, every_n_steps=0, cfg_scale=cfg_scale, resolution=resolution,
            max_images=num_images,
        )  # fmt: skip
        self.num_images = int(num_images)
        self.reference, self.reference_limit = reference, reference_limit
        self.features, self.weights = features, feature_extractor_weights_path
        self.clip_model = clip_model
        self.lpips_weights = (lpips_vgg_weights, lpips_lin_weights)
        self.kid_subset_size = int(kid_subset_size)
        from ldm.evaluate.run import DEFAULT_CACHE

        self.cache_dir = cache_dir or DEFAULT_CACHE
        self.out_dir = Path(out_dir)
        self._last_step = -1
        self._extractor = self._lpips = None
        self._real: list[Tensor] = []  # uint8 images of the fixed batch (training images, for fid/kid/ae)
        self._reference_feats: Tensor | None = None
        self._fixed: Tensor | None = None  # the first num_images of `reference`
        if self.every_n_steps > 0 and "lpips" in self.metrics and not lpips_vgg_weights:
            raise UserError(
                "callbacks.sample_metrics: lpips needs lpips_vgg_weights=<torchvision vgg16 weights file> "
                "(a random VGG is no perceptual metric); or drop lpips from metrics."
            )
        if self.every_n_steps > 0 and {"fid", "kid", "rfid"} & set(self.metrics):
            self._extractor = self._make_extractor()  # a missing weights file stops the run before step 1

    def _make_extractor(self):
        from ldm.evaluate.features import feature_extractor

        return feature_extractor(self.features, self.weights)

    # --- when --------------------------------------------------------------------------------------
    def on_train_batch_start(self, trainer, pl_module, batch: Any, batch_idx: int) -> None:
        if self.every_n_steps <= 0:
            return
        if self.inputs._batch is None:
            self.inputs.on_train_batch_start(trainer, pl_module, batch, batch_idx)  # keeps the first batch
        have = sum(len(x) for x in self._real)
        if have < self.num_images and isinstance(batch, Mapping) and isinstance(batch.get("image"), Tensor):
            self._real.append(_uint8(batch["image"][: self.num_images - have]))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps > 0 and step > 0 and step != self._last_step and step % self.every_n_steps == 0:
            self.score(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (
            self.every_n_steps > 0
            and self.inputs._batch is not None
            and trainer.global_step != self._last_step
        ):
            self.score(trainer, pl_module)

    # --- what --------------------------------------------------------------------------------------
    def _fixed_real(self, size: int | None) -> Tensor:
        """The reference's first `num_images` images (read once), else the first training images (uint8)."""
        if self.reference:
            if self._fixed is None:
                from ldm.evaluate.sources import read_images

                self._fixed = read_images(self.reference, size, self.num_images).images
            return self._fixed
        if not self._real:
            raise UserError(
                "callbacks.sample_metrics: the batches hold no 'image' to compare with; set "
                "callbacks.sample_metrics.reference=<folder or shards of real images>."
            )
        return torch.cat(self._real)[: self.num_images]

    @torch.no_grad()
    def score(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        """Draw the fixed set, compute the metrics, log and write them; returns {"eval/<metric>": value}."""
        self._last_step = trainer.global_step
        if hasattr(pl_module, "autoencoder") and not hasattr(pl_module, "model"):
            values, images, nrow = self._score_autoencoder(pl_module)
        else:
            values, images, nrow = self._score_samples(pl_module)
        values = {f"eval/{k}": v for k, v in values.items()}
        self._write(trainer, values, images, nrow)
        return values

    def _score_autoencoder(self, pl_module) -> tuple[dict[str, float], Tensor, int]:
        from ldm.evaluate.run import compare, reconstruct

        size = self.inputs.resolution or (int(self._real[0].shape[-1]) if self._real else None)
        real = self._fixed_real(size)
        was_training = pl_module.autoencoder.training
        try:
            recon = reconstruct(pl_module.autoencoder, real, device=pl_module.device)
        finally:
            pl_module.autoencoder.train(was_training)
        wanted = set(self.metrics)
        lpips = self._lpips_module(pl_module.device) if "lpips" in wanted else None
        extractor = self._extractor if "rfid" in wanted else None
        scores = compare(real, recon, lpips, extractor, device=str(pl_module.device))
        return {k: v for k, v in scores.items() if k in wanted}, torch.cat([real, recon]), len(real)

    def _score_samples(self, pl_module) -> tuple[dict[str, float], Tensor, int]:
        from ldm.evaluate import scores
        from ldm.evaluate.features import extract
        from ldm.evaluate.run import reference_features, to_uint8
        from ldm.training.validation import sample_fixed

        inputs, seeds, described = self.inputs.inputs(pl_module)
        f = pl_module.first_stage.downsample_factor
        res = self.inputs.resolution
        size = (res // f, res // f) if res else pl_module.model.latent_size(self.inputs._batch)
        fake = to_uint8(sample_fixed(pl_module, inputs, seeds, self.inputs.cfg_scale, size))
        values: dict[str, float] = {}
        if {"fid", "kid"} & set(self.metrics):
            device = str(pl_module.device)
            if self._reference_feats is None:
                if self.reference:
                    self._reference_feats = reference_features(
                        self.reference, self._extractor, fake.shape[-1], self.reference_limit,
                        self.cache_dir, device=device,
                    )[0]  # fmt: skip
                else:
                    self._reference_feats = extract(self._extractor, self._fixed_real(fake.shape[-1]))
            fake_feats = extract(self._extractor, fake, device=device)
            if "fid" in self.metrics:
                values["fid"] = scores.fid(self._reference_feats, fake_feats)
            if "kid" in self.metrics:
                values["kid"] = scores.kid(
                    self._reference_feats, fake_feats, subset_size=self.kid_subset_size
                )[0]
        if "clip_score" in self.metrics:
            prompts = [d.get("caption") for d in described]
            values["clip_score"] = scores.clip_score(fake, prompts, self._clip())["clip_score"]
        return values, fake, min(len(fake), 8)

    def _clip(self):
        if not isinstance(self.clip_model, tuple):
            from ldm.evaluate.scores import load_clip

            self.clip_model = load_clip(self.clip_model)
        return self.clip_model

    def _lpips_module(self, device):
        if self._lpips is None:
            from ldm.evaluate.scores import lpips_network

            self._lpips = lpips_network(*self.lpips_weights)
        return self._lpips.to(device)

    @rank_zero_only
    def _write(self, trainer: pl.Trainer, values: dict[str, float], images: Tensor, nrow: int) -> None:
        from ldm.training.callbacks import _log_image

        step = trainer.global_step
        for logger in trainer.loggers:
            logger.log_metrics(values, step=step)
        path = self.out_dir / f"metrics_step{step:06d}.png"
        grid = make_grid(images.float() / 127.5 - 1.0, nrow=nrow)
        save_png(grid, path)
        finite = {k: (v if math.isfinite(v) else None) for k, v in values.items()}
        info = {"step": step, "metrics": finite, "features": self.features, "images": len(images)}
        with atomic_path(path.with_suffix(".json")) as tmp:
            Path(tmp).write_text(json.dumps(info, indent=1) + "\n")
        for logger in trainer.loggers:
            _log_image(logger, "eval/images", grid, path, step)
        log.info("step %d: %s", step, ", ".join(f"{k}={v:.4g}" for k, v in values.items()))


def _uint8(images: Tensor) -> Tensor:
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
