"""Sample from a trained model: every conditioning task, from any supported checkpoint.

python sample.py task=txt2img ckpt=outputs/txt2img/latest/model.safetensors prompt="a red circle" n=4
python sample.py task=inpaint ckpt=... image=photo.png mask=mask.png prompt="a blue square"
python sample.py ckpt=sd-v1-4.ckpt config=v1-inference.yaml text_encoder=clip-vit-large-patch14 prompt=...
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("LDM_ROOT", str(Path(__file__).resolve().parent))

import hydra
from omegaconf import DictConfig, OmegaConf

from ldm.errors import UserError
from ldm.interop.load import instantiate_or_user_error, load_model
from ldm.samplers.sigmas import StepSchedule
from ldm.sampling import Settings, prepare, resolve_device, run_job, write_outputs
from ldm.training.runtime import resolved_config, user_errors_exit

RUN_KEYS = ("n", "seed", "steps", "spacing", "cfg_scale", "batch_size", "precision", "use_ema")


def sample(cfg: DictConfig) -> dict[str, Any]:
    """Compose -> load -> build the task's job -> sample -> write files; returns the run record."""
    start = time.perf_counter()
    if not cfg.get("ckpt"):
        raise UserError(
            "pass ckpt=<model.safetensors or .ckpt from train.py, or a CompVis checkpoint + config=>."
        )
    spacing = str(cfg.spacing)
    settings = Settings(
        sampler=instantiate_or_user_error(cfg.sampler, _convert_="all"),
        # a bad value fails here, before the model loads; "auto" is settled once the model is known
        steps=StepSchedule(steps=int(cfg.steps), spacing="leading" if spacing == "auto" else spacing),
        cfg_scale=float(cfg.cfg_scale),
        batch_size=int(cfg.batch_size),
        seed=int(cfg.seed),
        device=resolve_device(str(cfg.device)),
        precision=str(cfg.precision),
        progress=bool(cfg.progress),
    )
    task = instantiate_or_user_error(cfg.task, _convert_="all")
    task.preflight()
    loaded = load_model(
        cfg.ckpt, config=cfg.get("config"), use_ema=bool(cfg.use_ema), text_encoder=cfg.get("text_encoder")
    )
    load_s = time.perf_counter() - start
    if spacing == "auto":  # Lin et al. 2024: a zero-terminal-SNR model starts from its pure-noise step
        spacing = (
            "trailing" if getattr(loaded.module.loss.schedule, "zero_terminal_snr", False) else "leading"
        )
    settings = dataclasses.replace(settings, steps=StepSchedule(steps=int(cfg.steps), spacing=spacing))
    job = task.build(loaded, n=int(cfg.n), height=cfg.get("height"), width=cfg.get("width"))
    prepare(loaded, settings.device, compile_unet=bool(cfg.get("compile")))
    result = run_job(loaded, job, settings)
    sampler = OmegaConf.to_container(cfg.sampler, resolve=True)
    run = {
        **{k: cfg[k] for k in RUN_KEYS},
        "spacing": spacing,
        "device": str(settings.device),
        "sampler": sampler,
        "sampler_name": str(sampler.get("_target_", "")).rsplit(".", 1)[-1],
    }
    timings = {"load_s": load_s, "total_s": time.perf_counter() - start}
    return write_outputs(cfg.out_dir, result, job, loaded, run, resolved_config(cfg), timings)


@hydra.main(version_base="1.3", config_path="conf", config_name="sample")
@user_errors_exit
def main(cfg: DictConfig) -> None:
    record = sample(cfg)
    t = record["timings"]
    print(
        f"wrote {len(record['images'])} image(s), {record['grid']} and run.json to {record['out_dir']} "
        f"({t['sample_s']:.1f}s sampling, {t['total_s']:.1f}s in all)"
    )


if __name__ == "__main__":
    main()
