"""Train a stage-1 autoencoder or a stage-2 latent diffusion model.

python train.py experiment=autoencoder_kl trainer.max_steps=300
python train.py experiment=txt2img first_stage_ckpt=outputs/autoencoder_kl/latest/model.safetensors
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

os.environ.setdefault("LDM_ROOT", str(Path(__file__).resolve().parent))
os.environ.setdefault("WANDB_MODE", "offline")  # never phone home unless the user sets WANDB_MODE=online

import sys
import warnings

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ldm.cli import run as run_cli
from ldm.config_checks import check_train_config
from ldm.errors import UserError
from ldm.training.runtime import (
    clear_rank_errors,
    resolve_ckpt_path,
    resolved_config,
    run_folder_lock,
    set_current_run_dir,
    user_errors_exit,
)

INTERRUPTED_EXIT = 143  # 128 + SIGTERM: a run stopped by a signal (checkpoint saved) is not a success

# Frozen parts (first stage, text encoder, LPIPS) stay in eval mode on purpose; Lightning warns about it.
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
# A run without validation shards returns no val loader; that is a choice, not a mistake.
warnings.filterwarnings("ignore", message=r".*Total length of `list` across ranks is zero.*")


class _NoAdverts(logging.Filter):
    """Lightning's "💡 Tip: ... try installing litlogger" line is an advert, not information about the run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "💡" not in str(record.msg)


logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(_NoAdverts())


def train(cfg: DictConfig) -> dict[str, float]:
    """Compose -> instantiate -> fit; returns the final logged metrics (tests call this directly)."""
    check_train_config(cfg)  # sizes, types, impossible combinations, paths: one line before any work
    # Imported here, not at the top: config mistakes then fail in a second, before Lightning loads.
    import pytorch_lightning as pl
    from pytorch_lightning.utilities import rank_zero_only

    pl.seed_everything(cfg.seed, workers=True)
    run_dir, runs_dir = Path(cfg.paths.output_dir), Path(cfg.paths.runs_dir)
    set_current_run_dir(run_dir)  # where a failing DDP rank leaves its error for rank zero
    is_rank_zero = rank_zero_only.rank == 0  # ranks > 0 must not write a run folder of their own
    # Rank zero owns the folder for the whole run: a second run with the same hydra.run.dir stops here.
    with run_folder_lock(run_dir) if is_rank_zero else contextlib.nullcontext():
        return _fit(cfg, run_dir, runs_dir, is_rank_zero)


def _fit(cfg: DictConfig, run_dir: Path, runs_dir: Path, is_rank_zero: bool) -> dict[str, float]:
    """The run itself, inside the run folder's lock."""
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ProgressBar

    from ldm.interop.checkpoint import atomic_path
    from ldm.training.callbacks import RunLifecycle, StepProgressBar
    from ldm.training.checkpoint_io import require_safe_checkpoint_io

    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), runs_dir)  # before `latest` moves to this run
    if is_rank_zero:
        clear_rank_errors(run_dir)
        with atomic_path(run_dir / "config.yaml") as tmp:
            OmegaConf.save(cfg, tmp, resolve=True)

    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model)
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    for callback in callbacks:  # e.g. the export callback stores the config in checkpoints and exports
        if hasattr(callback, "set_run_config"):
            callback.set_run_config(resolved_config(cfg))
    has_bar = any(isinstance(c, ProgressBar) for c in callbacks)
    if cfg.trainer.get("enable_progress_bar", True) and not has_bar:
        callbacks.append(StepProgressBar())  # `step N/max_steps` instead of Lightning's epoch bar
    # Loggers attach and `latest` moves only once training began (RunLifecycle.on_train_start, first in
    # the list): a start that fails (bad shards, a cache of another autoencoder) leaves neither behind.
    make_loggers = (lambda: [instantiate(cfg.logger)]) if cfg.get("logger") else None
    callbacks.insert(0, RunLifecycle(run_dir, runs_dir, make_loggers))
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=False)
    require_safe_checkpoint_io(trainer)  # atomic writes, weights-only reads, whatever trainer.plugins says
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    except pl.utilities.exceptions.SIGTERMException:
        return {"interrupted_at_step": float(trainer.global_step)}
    return {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
@user_errors_exit
def main(cfg: DictConfig) -> None:
    if cfg.get("experiment_required") and not cfg.get("name"):
        raise UserError("no experiment chosen: run e.g. `python train.py experiment=autoencoder_kl`.")
    # Lightning's DDP launcher starts ranks > 0 later with hydra.run.dir pinned to rank 0's folder; taking
    # the folder from Hydra keeps their `${now:...}` in paths.output_dir from naming a second one.
    cfg.paths.output_dir = HydraConfig.get().runtime.output_dir
    metrics = train(cfg)
    print("final metrics: " + ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())))
    if "interrupted_at_step" in metrics:  # SIGTERM / Ctrl-C: saved, but not done; schedulers must see it
        print(
            f"interrupted at step {int(metrics['interrupted_at_step'])}: last.ckpt and the export are saved; "
            f"continue with `python train.py experiment={cfg.get('name')} ckpt_path=last`",
            file=sys.stderr,
        )
        sys.exit(INTERRUPTED_EXIT)


if __name__ == "__main__":
    experiments = sorted(
        p.stem for p in (Path(__file__).resolve().parent / "conf" / "experiment").glob("*.yaml")
    )
    run_cli(  # overrides Hydra cannot parse, or no experiment: one line with the fix, not a traceback
        main,
        required={
            "experiment": "no experiment chosen: run e.g. `python train.py experiment=autoencoder_kl`; "
            f"experiments: {', '.join(experiments)}."
        },
    )
