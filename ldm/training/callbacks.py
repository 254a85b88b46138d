"""Lightning callbacks: run start, checkpoints, image grids, safetensors export, progress, interrupt."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint, TQDMProgressBar
from pytorch_lightning.utilities import rank_zero_only
from pytorch_lightning.utilities.exceptions import SIGTERMException

from ldm.interop.checkpoint import atomic_path, save_safetensors
from ldm.training.images import describe_images, make_grid, save_png
from ldm.training.runtime import find_user_error, leave_rank_error, mark_latest

log = logging.getLogger(__name__)


class ImageLogger(pl.Callback):
    """Every `every_n_steps`, render `pl_module.log_images(batch)` to the logger and to PNG files."""

    def __init__(self, every_n_steps: int = 200, max_images: int = 8, out_dir: str = "images") -> None:
        self.every_n_steps = every_n_steps
        self.max_images = max_images
        self.out_dir = Path(out_dir)
        self._last_step = -1

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx
    ):
        step = trainer.global_step
        if self.every_n_steps <= 0 or step == self._last_step or step % self.every_n_steps != 0:
            return
        self._last_step = step
        self.log_now(trainer, pl_module, batch, split="train")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        batch = getattr(pl_module, "last_batch", None)
        if self.every_n_steps <= 0 or batch is None or trainer.global_step == self._last_step:
            return  # every_n_steps=0 turns the grids off, the final ones included
        for callback in trainer.callbacks:  # the export first: the grids take a while and are optional
            if isinstance(callback, ExportSafetensors):
                callback.export(trainer, pl_module)
        self.log_now(trainer, pl_module, batch, split="train")

    @torch.no_grad()
    def log_now(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, split: str) -> None:
        """Render one set of grids; every rank computes (models may sync), rank zero writes."""
        was_training = pl_module.training
        pl_module.eval()
        try:
            images = pl_module.log_images(batch, max_images=self.max_images)
        finally:
            pl_module.train(was_training)
        shown = getattr(pl_module, "last_batch", None) or batch  # what the module rendered the grids from
        self._write(trainer, images, split, describe_images(shown, self.max_images))

    @rank_zero_only
    def _write(
        self, trainer: pl.Trainer, images: dict[str, torch.Tensor], split: str, captions: list[dict]
    ) -> None:
        step = trainer.global_step
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if captions:  # which prompt / label each grid cell had, in grid order (row by row)
            with atomic_path(self.out_dir / f"{split}_step{step:06d}.json") as tmp:
                tmp.write_text(json.dumps({"step": step, "images": captions}, indent=1) + "\n")
        for name, tensor in images.items():
            grid = make_grid(tensor.detach().float().cpu())
            path = self.out_dir / f"{split}_{name}_step{step:06d}.png"
            save_png(grid, path)
            for logger in trainer.loggers:
                _log_image(logger, f"{split}/{name}", grid, path, step)


def _log_image(logger: Any, key: str, grid: torch.Tensor, path: Path, step: int) -> None:
    """Send an image grid to whichever logger is active (wandb, TensorBoard; CSV keeps the PNG on disk)."""
    from pytorch_lightning.loggers import TensorBoardLogger, WandbLogger

    if isinstance(logger, WandbLogger):
        logger.log_image(key=key, images=[str(path)], step=step)
    elif isinstance(logger, TensorBoardLogger):
        logger.experiment.add_image(key, grid, global_step=step)


class ExportSafetensors(pl.Callback):
    """Store the resolved run config in every checkpoint and export `model.safetensors` at the end.

    `train.py` passes the resolved config; the module's `export_state_dict()` decides which weights ship
    (stage 1: the autoencoder alone; stage 2: EMA UNet + first stage + conditioner in the CompVis layout).
    """

    def __init__(
        self,
        path: str = "model.safetensors",
        original: bool = False,  # also write the original CompVis/Stability layout (stage 2), see below
        original_path: str | None = None,  # default: model.original.safetensors beside `path`
        original_dtype: str = "fp32",  # fp32 | fp16 | bf16 (schedule buffers stay fp32)
        original_ema_only: bool = True,  # EMA weights as the UNet (*-emaonly files); false: raw + model_ema.*
    ) -> None:
        self.path = Path(path)
        self.original = bool(original)
        beside = self.path.with_suffix(".original.safetensors")
        self.original_path = Path(original_path) if original_path else beside
        self.original_dtype = original_dtype
        self.original_ema_only = bool(original_ema_only)
        self.config: dict | None = None
        self._exported_step = -1

    def set_run_config(self, config: dict) -> None:
        """The resolved run config as plain containers (JSON metadata; weights_only-loadable checkpoints)."""
        self.config = config

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        if self.config is not None:
            checkpoint["ldm_config"] = self._config_for(pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.export(trainer, pl_module)

    def _config_for(self, pl_module: pl.LightningModule) -> dict | None:
        """The run config, plus what the module adds to rebuild itself (e.g. its autoencoder's config)."""
        extend = getattr(pl_module, "export_config", None)
        return extend(self.config) if (extend is not None and self.config is not None) else self.config

    def export(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Write the export of the current step (once: the final grids and on_train_end both ask)."""
        if self._exported_step == trainer.global_step:
            return
        if hasattr(pl_module, "export_adapter"):  # LoRA / textual inversion: the adapter files, no model
            files = pl_module.export_adapter(self.path.parent, self._config_for(pl_module))
            if trainer.is_global_zero:
                log.info("exported the adapter to %s", ", ".join(str(f) for f in files))
            self._exported_step = trainer.global_step
            return
        state = pl_module.export_state_dict()  # every rank (FSDP gathers); rank zero writes
        if trainer.is_global_zero:
            save_safetensors(state, self.path, self._config_for(pl_module))
            log.info("exported %d tensors to %s", len(state), self.path)
        if self.original:
            self._export_original(trainer, pl_module)
        self._exported_step = trainer.global_step

    def _export_original(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """`original: true`: the original layout (`ldm.interop.export`) + its yaml, for other tools.

        Models no original family describes (e.g. a MiniLM text encoder) are skipped with a warning: their
        `model.safetensors` (our layout) is the export."""
        from ldm.interop import export

        model = getattr(pl_module, "model", None)
        if model is None or not hasattr(model, "conditioner"):
            log.warning("callbacks.export.original: only stage-2 models have an original layout; skipped")
            return
        ema = getattr(pl_module, "ema", None)
        shadows = {n: getattr(ema, b) for n, b in ema._names.items()} if ema is not None else None
        try:
            state = export.original_state(
                model,
                shadows,
                ema_only=self.original_ema_only,
                ema_updates=int(ema.num_updates) if ema is not None else 0,
                ema_decay=float(ema.decay) if ema is not None else 0.9999,
                betas=export.run_betas(self.config),
            )
        except export.NoOriginalLayout as e:
            log.warning("%s %s (our layout) is the export; %s not written.", e, self.path, self.original_path)
            return
        if trainer.is_global_zero:
            yaml = export.run_yaml_text(self._config_for(pl_module), model)
            export.save_original(state, self.original_path, self.original_dtype, yaml)


class GracefulInterrupt(pl.Callback):
    """Ctrl-C or SIGTERM: finish the current step, save `last.ckpt`, export, and stop.

    Lightning already turns SIGTERM into a `SIGTERMException` at a step boundary (synced across DDP ranks);
    we route the first Ctrl-C through the same flag so the saved state is never half a step. A second
    Ctrl-C interrupts at once.
    """

    def __init__(self, ckpt_dir: str = "checkpoints") -> None:
        self.ckpt_dir = Path(ckpt_dir)
        self._previous_handler: Any = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        import threading

        if threading.current_thread() is not threading.main_thread():
            return

        def handler(signum, frame):
            connector = trainer._signal_connector  # Lightning's own SIGTERM flag, read at step boundaries
            if connector.received_sigterm:
                raise KeyboardInterrupt
            log.warning(
                "interrupt received: finishing this step, then saving a checkpoint (Ctrl-C again to abort)"
            )
            connector.received_sigterm = True

        self._previous_handler = signal.signal(signal.SIGINT, handler)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx
    ):
        # `ckpt_path=last` continues a finished run (e.g. with a larger max_steps) from its final step:
        # RunCheckpoint writes last.ckpt then; only without one (a config that dropped it) do we.
        if 0 < trainer.max_steps <= trainer.global_step and _last_checkpoint_owner(trainer) is None:
            trainer.save_checkpoint(self.ckpt_dir / "last.ckpt")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._restore()
        if not isinstance(exception, SIGTERMException):
            return
        owner = _last_checkpoint_owner(trainer)
        if owner is not None:
            path = owner.save_last_now(trainer, force=True)
        else:
            path = self.ckpt_dir / "last.ckpt"
            trainer.save_checkpoint(path)
        for cb in trainer.callbacks:
            if isinstance(cb, ExportSafetensors):
                cb.export(trainer, pl_module)
        if trainer.is_global_zero:
            log.warning("saved %s at step %d; resume with ckpt_path=%s", path, trainer.global_step, path)

    def _restore(self) -> None:
        if self._previous_handler is not None:
            signal.signal(signal.SIGINT, self._previous_handler)
            self._previous_handler = None


class RunCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint as the one writer of `last.ckpt`.

    Besides its periodic saves it writes `last.ckpt` at the final step (a finished run resumes from where
    it ended) and, through `GracefulInterrupt`, on SIGTERM/Ctrl-C. A second writer of the same name made
    Lightning version its next save (`last-v1.ckpt`) in runs shorter than the periodic interval.
    """

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if 0 < trainer.max_steps <= trainer.global_step:
            self.save_last_now(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.save_last_now(trainer)  # runs that end otherwise (max_epochs, max_time): their last state

    def save_last_now(self, trainer: pl.Trainer, force: bool = False) -> Path:
        """Write `last.ckpt` for the current step unless this callback already saved this step (`force`:
        also then, e.g. on SIGTERM, when the state is that of the whole step, after its batch-end hooks)."""
        if not self.save_last or trainer.sanity_checking or trainer.fast_dev_run:
            return self._last_path()
        if force or not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        return self._last_path()

    def _last_path(self) -> Path:
        return Path(self.last_model_path or Path(self.dirpath or ".") / f"{self.CHECKPOINT_NAME_LAST}.ckpt")


def _last_checkpoint_owner(trainer: pl.Trainer) -> RunCheckpoint | None:
    owners = [cb for cb in trainer.checkpoint_callbacks if isinstance(cb, RunCheckpoint) and cb.save_last]
    return owners[0] if owners else None


class StepProgressBar(TQDMProgressBar):
    """The tqdm bar in optimisation steps (`step 120/1000`): runs are sized in steps, not epochs, and with
    `max_epochs=-1` Lightning's epoch bar read `Epoch 173/-2`.

    When stdout is not a terminal (a redirected log, a cluster job; `LDM_PROGRESS=bar|lines` overrides),
    tqdm's carriage returns would make one endless line: the bar is off and a plain log line is written
    every `log_every` steps and at least every `log_every_s` seconds: step, losses, it/s, time left."""

    def __init__(self, log_every: int | None = None, log_every_s: float = 60.0, plain: bool | None = None):
        super().__init__()
        forced = os.environ.get("LDM_PROGRESS", "").strip().lower()  # bar | lines: override the detection
        if plain is None:
            # tqdm writes to stdout
            plain = forced == "lines" or (forced != "bar" and not sys.stdout.isatty())
        self.plain = bool(plain)
        self.log_every, self.log_every_s = log_every, float(log_every_s)
        self._last: tuple[float, int] | None = None
        if self.plain:
            self.disable()  # bars are created disabled: nothing drawn, not even the first frame

    @property
    def train_description(self) -> str:
        return "step"

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last = None  # set at the first step: start-up and step-0 validation images are not steps
        super().on_train_start(trainer, pl_module)

    def _quiet(self, bar: Any) -> Any:
        if self.plain:  # the bars exist (Lightning's hooks use them) but never draw
            bar.disable = True
        return bar

    def init_train_tqdm(self) -> Any:
        return self._quiet(super().init_train_tqdm())

    def init_validation_tqdm(self) -> Any:
        return self._quiet(super().init_validation_tqdm())

    def init_sanity_tqdm(self) -> Any:
        return self._quiet(super().init_sanity_tqdm())

    def _log_line(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step, total = trainer.global_step, trainer.max_steps if trainer.max_steps > 0 else None
        every = self.log_every or max(1, (total or 1000) // 20)
        now = time.monotonic()
        if self._last is None:
            self._last = (now, step)
            return
        then, then_step = self._last
        if step % every and now - then < self.log_every_s and step != total:
            return
        rate = (step - then_step) / max(now - then, 1e-9)
        metrics = {k: v for k, v in self.get_metrics(trainer, pl_module).items() if k != "v_num"}
        shown = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
        left = f"  ~{(total - step) / rate / 60:.1f} min left" if total and rate > 0 else ""
        log.info("step %d%s  %s  %.2f it/s%s", step, f"/{total}" if total else "", shown, rate, left)
        self._last = (now, step)

    def on_train_epoch_start(self, trainer: pl.Trainer, *_: Any) -> None:
        if self.plain:
            return
        if self._leave:
            self.train_progress_bar = self.init_train_tqdm()
        bar = self.train_progress_bar
        bar.total = trainer.max_steps if trainer.max_steps > 0 else None
        bar.n = bar.last_print_n = bar.initial = trainer.global_step  # a resumed run starts where it was
        bar.start_t = bar.last_print_t = bar._time()
        bar.set_description(self.step_description(trainer))

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx
    ) -> None:
        if self.plain:
            if trainer.is_global_zero:
                self._log_line(trainer, pl_module)
            return
        bar = self.train_progress_bar
        if bar is None or bar.disable or not self._should_update(trainer.global_step, bar.total):
            return
        bar.n = trainer.global_step
        bar.set_description(self.step_description(trainer), refresh=False)
        bar.set_postfix(self.get_metrics(trainer, pl_module))  # refreshes

    @staticmethod
    def step_description(trainer: pl.Trainer) -> str:
        limit = f"/{trainer.max_steps}" if trainer.max_steps > 0 else ""
        return f"step {trainer.global_step}{limit}"


class RunLifecycle(pl.Callback):
    """What waits until training really began, and what a failing rank leaves for rank zero.

    At `on_train_start` (data checked, model set up, checkpoint restored): the loggers are attached, so a
    start that fails leaves no W&B/TensorBoard folder; rank zero points `<runs_dir>/latest` at this run, so
    a failed start keeps `latest` (and `ckpt_path=last`) on the previous run. On an exception, a rank > 0
    writes its `UserError` to `<run_dir>/.rank<k>.error`, which rank zero prints instead of the collective
    error (gloo/NCCL) the lost peer causes there. `train.py` puts this callback first in the list.
    """

    def __init__(
        self,
        run_dir: str | Path,
        runs_dir: str | Path,
        make_loggers: Callable[[], list] | None = None,
    ) -> None:
        self.run_dir, self.runs_dir = Path(run_dir), Path(runs_dir)
        self.make_loggers = make_loggers

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.make_loggers is not None and not trainer.loggers:
            from pytorch_lightning.loggers.utilities import _log_hyperparams

            trainer.loggers = self.make_loggers()
            _log_hyperparams(trainer)  # what Trainer.fit does before setup when loggers are given up front
        if trainer.is_global_zero:
            mark_latest(self.run_dir, self.runs_dir)

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        error = find_user_error(exception)
        if error is not None and trainer.global_rank > 0:
            leave_rank_error(self.run_dir, trainer.global_rank, str(error))
