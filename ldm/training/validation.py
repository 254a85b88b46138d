"""Validation images of a fine-tune: fixed prompts (or labels) and seeds, rendered every N optimizer steps.

Step 0 renders the base model before any update; every later grid shows the base row above the current
(EMA) row, so `images/validation_step{N:06d}.png` compares the two side by side. A JSON beside each grid
records the prompts/labels, seeds, guidance scale and sampler steps. Prompts come from
`validation.prompts` or `validation.prompt_file` (one per line); class models read them as label ids.
Inputs the prompts cannot give (a low-res image, a masked image) are taken from the first training batch.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_only
from torch import Tensor

from ldm.errors import UserError
from ldm.interop.checkpoint import atomic_path
from ldm.training.images import make_grid, save_png

PROMPT_KEYS = ("caption", "label")  # conditioning inputs a prompt list can give


def read_prompts(prompts: Sequence[Any] | None, prompt_file: str | None) -> list[Any]:
    """`prompts` plus the non-empty lines of `prompt_file`; UserError when the file is missing."""
    out = list(prompts or [])
    if prompt_file:
        path = Path(prompt_file).expanduser()
        if not path.is_file():
            raise UserError(
                f"validation.prompt_file={prompt_file}: no such file; pass a text file, one prompt a line."
            )
        out += [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return out


def sample_fixed(
    pl_module: pl.LightningModule,
    inputs: dict[str, Any],
    seeds: list[int],
    cfg_scale: float | None,
    latent_size: tuple[int, int] | None,
) -> Tensor:
    """Images (B,3,H,W) in [-1,1] of fixed conditioning inputs, sampled in eval mode with the EMA weights
    swapped in (when the module keeps an EMA); `cfg_scale` None = the module's preview_cfg_scale."""
    inputs = {k: (v.to(pl_module.device) if isinstance(v, Tensor) else v) for k, v in inputs.items()}
    cfg = cfg_scale if cfg_scale is not None else pl_module.preview_cfg_scale
    was_training = pl_module.training
    pl_module.eval()
    try:
        if pl_module.ema is not None:
            with pl_module.ema.swapped_in(pl_module.model):
                return pl_module.sample(inputs, seeds, cfg, latent_size=latent_size)
        return pl_module.sample(inputs, seeds, cfg, latent_size=latent_size)
    finally:
        pl_module.train(was_training)


class ValidationImages(pl.Callback):
    """Every `every_n_steps` optimizer steps, at 0 and at the end: fixed-seed samples to PNG, JSON, logger."""

    def __init__(
        self,
        prompts: Sequence[Any] | None = None,  # strings (text models) or label ids (class models)
        prompt_file: str | None = None,  # more prompts, one a line
        seeds: Sequence[int] = (0,),  # one image per (prompt, seed); the same seeds at every step
        every_n_steps: int = 100,  # 0: off
        cfg_scale: float | None = None,  # null: the module's preview_cfg_scale
        resolution: int | None = None,  # pixels (square); null: the first batch's size
        max_images: int = 8,  # images per row when inputs come from the training batch
        out_dir: str = "images",
    ) -> None:
        self.prompts = read_prompts(prompts, prompt_file)
        self.seeds = [int(s) for s in seeds]
        if not self.seeds:
            raise UserError("validation.seeds is empty: give at least one seed, e.g. validation.seeds=[0].")
        self.every_n_steps = int(every_n_steps)
        self.cfg_scale = cfg_scale
        self.resolution = resolution
        self.max_images = int(max_images)
        self.out_dir = Path(out_dir)
        self._last_step = -1
        self._batch: dict[str, Any] | None = None  # the first training batch's head (non-prompt inputs)
        self.base_images: Tensor | None = None

    # --- when ------------------------------------------------------------------------------------------
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ):
        if self._batch is None:
            self._batch = {k: v[: self.max_images] for k, v in batch.items() if isinstance(v, (Tensor, list))}
        step = trainer.global_step
        if self.every_n_steps > 0 and step != self._last_step and step % self.every_n_steps == 0:
            self.render(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.every_n_steps > 0 and self._batch is not None and trainer.global_step != self._last_step:
            self.render(trainer, pl_module)

    # --- what ------------------------------------------------------------------------------------------
    def inputs(self, pl_module: pl.LightningModule) -> tuple[dict[str, Any], list[int], list[dict]]:
        """(conditioning inputs, seeds, per-image description) for one row."""
        keys = pl_module.model.input_keys
        batch = self._batch or {}
        prompt_key = next((k for k in PROMPT_KEYS if k in keys), None)
        if self.prompts and prompt_key is not None:
            pairs = [(p, s) for p in self.prompts for s in self.seeds]
            values = [p for p, _ in pairs]
            if prompt_key == "label":
                try:
                    values = torch.tensor([int(v) for v in values])
                except (TypeError, ValueError):
                    raise UserError(
                        f"validation.prompts={self.prompts}: this base model is class-conditional; give "
                        "label ids, e.g. validation.prompts=[0,1,2]."
                    ) from None
            inputs = {prompt_key: values}
            described = [{prompt_key: p, "seed": s} for p, s in pairs]
            seeds = [s for _, s in pairs]
            n = len(pairs)
        else:  # everything from the first training batch, one seed per image
            n = min(self.max_images, len(next(iter(batch.values()), [])))
            inputs = {}
            seeds = [self.seeds[0] + i for i in range(n)]
            described = [{"seed": s} for s in seeds]
            for i, d in enumerate(described):
                for k in PROMPT_KEYS:
                    if k in keys and k in batch:
                        v = batch[k][i]
                        d[k] = v.item() if isinstance(v, Tensor) else v
        for key in keys:
            if key not in inputs:
                if key not in batch:
                    raise UserError(
                        f"validation images need '{key}', which the training batches do not hold."
                    )
                value = batch[key][:n]
                inputs[key] = (
                    value
                    if isinstance(value, list) or len(value) == n
                    else value[:1].expand(n, *value.shape[1:])
                )
        return inputs, seeds, described

    @torch.no_grad()
    def render(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Tensor:
        """One row of images (B,3,H,W) in [-1,1] with the EMA weights; written on rank zero."""
        step = trainer.global_step
        self._last_step = step
        inputs, seeds, described = self.inputs(pl_module)
        f = pl_module.first_stage.downsample_factor
        size = (self.resolution // f, self.resolution // f) if self.resolution else None
        if size is None and self._batch is not None and "image" in self._batch:
            size = pl_module.model.latent_size(self._batch)
        images = sample_fixed(pl_module, inputs, seeds, self.cfg_scale, size).float().cpu()
        if step == 0:
            self.base_images = images  # the base model, before any update
        rows = (["base model (step 0)"] if self.base_images is not None else []) + (
            [f"step {step}"] if step else []
        )
        info = {
            "step": step,
            "images": described,
            "cfg_scale": self.cfg_scale if self.cfg_scale is not None else pl_module.preview_cfg_scale,
            "sampler_steps": pl_module.preview_steps.steps,
            "rows": rows,  # a resumed run has no step-0 row
        }
        self._write(trainer, images, info)
        return images

    @rank_zero_only
    def _write(self, trainer: pl.Trainer, images: Tensor, info: dict) -> None:
        from ldm.training.callbacks import _log_image

        step = info["step"]
        rows = images if step == 0 or self.base_images is None else torch.cat([self.base_images, images])
        grid = make_grid(rows, nrow=len(images))
        path = self.out_dir / f"validation_step{step:06d}.png"
        self.out_dir.mkdir(parents=True, exist_ok=True)
        save_png(grid, path)
        with atomic_path(path.with_suffix(".json")) as tmp:
            Path(tmp).write_text(json.dumps(info, indent=1) + "\n")
        for logger in trainer.loggers:
            _log_image(logger, "validation/images", grid, path, step)
