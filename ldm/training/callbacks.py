"""Lightning callbacks: image grids, safetensors export, graceful interrupt."""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_only
from pytorch_lightning.utilities.exceptions import SIGTERMException

from ldm.interop.checkpoint import save_safetensors
from ldm.training.images import make_grid, save_png

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
        if batch is not None and trainer.global_step != self._last_step:
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
        self._write(trainer, images, split)

    @rank_zero_only
    def _write(self, trainer: pl.Trainer, images: dict[str, torch.Tensor], split: str) -> None:
        step = trainer.global_step
        self.out_dir.mkdir(parents=True, exist_ok=True)
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

    def __init__(self, path: str = "model.safetensors") -> None:
        self.path = Path(path)
        self.config: dict | None = None

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
        state = pl_module.export_state_dict()  # every rank (FSDP gathers); rank zero writes
        if trainer.is_global_zero:
            save_safetensors(state, self.path, self._config_for(pl_module))
            log.info("exported %d tensors to %s", len(state), self.path)


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
        # ModelCheckpoint rewrites last.ckpt only at its periodic saves; write it at the final step as well,
        # so `ckpt_path=last` continues a finished run (e.g. with a larger max_steps) from where it ended.
        if 0 < trainer.max_steps <= trainer.global_step:
            trainer.save_checkpoint(self.ckpt_dir / "last.ckpt")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._restore()
        if not isinstance(exception, SIGTERMException):
            return
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
