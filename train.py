"""Train a stage-1 autoencoder or a stage-2 latent diffusion model.

python train.py experiment=autoencoder_kl trainer.max_steps=300
python train.py experiment=txt2img first_stage_ckpt=outputs/autoencoder_kl/latest/model.safetensors
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("LDM_ROOT", str(Path(__file__).resolve().parent))
os.environ.setdefault("WANDB_MODE", "offline")  # never phone home unless the user sets WANDB_MODE=online

import warnings

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ldm.errors import UserError
from ldm.training.runtime import mark_latest, resolve_ckpt_path, resolved_config, user_errors_exit

# Frozen parts (first stage, text encoder, LPIPS) stay in eval mode on purpose; Lightning warns about it.
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")


def train(cfg: DictConfig) -> dict[str, float]:
    """Compose -> instantiate -> fit; returns the final logged metrics (tests call this directly)."""
    # Imported here, not at the top: config mistakes then fail in a second, before Lightning loads.
    import pytorch_lightning as pl
    from pytorch_lightning.utilities import rank_zero_only

    pl.seed_everything(cfg.seed, workers=True)
    run_dir, runs_dir = Path(cfg.paths.output_dir), Path(cfg.paths.runs_dir)
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), runs_dir)  # before `latest` moves to this run
    is_rank_zero = rank_zero_only.rank == 0  # ranks > 0 must not write a run folder of their own
    if is_rank_zero:
        run_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)

    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model)
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    for callback in callbacks:  # e.g. the export callback stores the config in checkpoints and exports
        if hasattr(callback, "set_run_config"):
            callback.set_run_config(resolved_config(cfg))
    logger = instantiate(cfg.logger) if cfg.get("logger") else False
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=logger)
    if is_rank_zero:  # only once everything was built: a run that fails at start-up keeps `latest` as it was
        mark_latest(run_dir, runs_dir)
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


if __name__ == "__main__":
    main()
