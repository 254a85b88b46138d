"""Sample from a trained model: every conditioning task, from any supported checkpoint.

A command line over `ldm.pipeline.Pipeline` (the Python API): compose the config, load, run one task, write
PNGs + grid.png + run.json.

python sample.py task=txt2img ckpt=outputs/txt2img/latest/model.safetensors prompt="a red circle" n=4
python sample.py task=inpaint ckpt=... image=photo.png mask=mask.png prompt="a blue square"
python sample.py ckpt=sd-v1-4.ckpt config=v1-inference.yaml text_encoder=clip-vit-large-patch14 prompt=...
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

os.environ.setdefault("LDM_ROOT", str(Path(__file__).resolve().parent))

import hydra
import torch
from omegaconf import DictConfig

from ldm.cli import run as run_cli
from ldm.config_checks import check_sample_config
from ldm.errors import UserError
from ldm.interop.load import instantiate_or_user_error
from ldm.models.tiling import TileSettings
from ldm.pipeline import Pipeline
from ldm.samplers.sigmas import StepSchedule
from ldm.sampling.runner import PRECISIONS
from ldm.training.runtime import resolved_config, user_errors_exit


def remove_if_only_hydra_files(folder: Path) -> None:
    """Delete `folder` when it holds nothing but what Hydra wrote at start (.hydra/, sample.log)."""
    import shutil

    if not folder.is_dir() or any(p.name not in (".hydra", "sample.log") for p in folder.iterdir()):
        return
    shutil.rmtree(folder, ignore_errors=True)


def sample(cfg: DictConfig) -> dict[str, Any]:
    """Compose -> load -> build the task's job -> sample -> write files; returns the run record."""
    check_sample_config(cfg)  # sizes, types, impossible combinations, paths: one line before any work
    if not cfg.get("ckpt"):
        raise UserError(
            "pass ckpt=<model.safetensors or .ckpt from train.py, or an original checkpoint + config=<yaml>>."
        )
    sampler = instantiate_or_user_error(cfg.sampler, _convert_="all")
    # bad values fail here, before the (possibly minutes-long) model load
    if str(cfg.spacing) != "auto":
        StepSchedule(steps=int(cfg.steps), spacing=str(cfg.spacing))
    if str(cfg.precision) not in PRECISIONS:
        raise UserError(f"precision={cfg.precision}: use one of {', '.join(PRECISIONS)}.")
    task = instantiate_or_user_error(cfg.task, _convert_="all")
    task.preflight()
    tiling = TileSettings(  # bad values fail here, before the model loads
        mode=cfg.get("vae_tiling", "auto"),
        size=int(cfg.get("vae_tile_size", 512)),
        overlap=int(cfg.get("vae_tile_overlap", 128)),
        norm=str(cfg.get("vae_tile_norm", "tile")),
    )
    pipe = Pipeline.from_file(
        cfg.ckpt,
        config=cfg.get("config"),
        text_encoder=cfg.get("text_encoder"),
        device=str(cfg.device),
        dtype=PRECISIONS[str(cfg.precision)] or torch.float32,
        use_ema=bool(cfg.use_ema),
        compile=bool(cfg.get("compile")),
        lora=list(cfg.get("lora") or ()),
        embeddings=list(cfg.get("embeddings") or ()),
    )
    pipe.model.first_stage.tiling = tiling
    out = pipe.run(
        task,
        n=int(cfg.n),
        seed=int(cfg.seed),
        steps=int(cfg.steps),
        sampler=sampler,
        cfg_scale=float(cfg.cfg_scale),
        spacing=str(cfg.spacing),
        batch_size=int(cfg.batch_size),
        height=cfg.get("height"),
        width=cfg.get("width"),
        out_dir=cfg.out_dir,
        progress=bool(cfg.progress),
        config=resolved_config(cfg),
    )
    return out.record


@hydra.main(version_base="1.3", config_path="conf", config_name="sample")
@user_errors_exit
def main(cfg: DictConfig) -> None:
    try:
        record = sample(cfg)
    except BaseException:
        remove_if_only_hydra_files(Path(str(cfg.out_dir)))  # a failed run leaves no empty output folder
        raise
    t = record["timings"]
    print(
        f"wrote {len(record['images'])} image(s), {record['grid']} and run.json to {record['out_dir']} "
        f"({t['sample_s']:.1f}s sampling, {t['total_s']:.1f}s in all); this model's tasks: "
        f"{', '.join(record['checkpoint']['tasks'])}"
    )


if __name__ == "__main__":
    run_cli(main)  # overrides Hydra cannot parse: one line with the quoting that fixes them
