"""sample.py's config rules (`SAMPLE_CHECKS`), run by `ldm.config_checks.check_sample_config`."""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ldm.config_checks import (
    _ABSENT,
    CONF_DIR,
    DEVICE,
    DIFFUSERS_FOLDER,
    SAMPLE_PRECISIONS,
    Check,
    _get,
    _is_number,
    _is_whole,
    _select,
    _show,
    boolean,
    existing_file,
    number,
    one_of,
    whole,
    writable_dir,
)

# --- combination rules: sample.py -------------------------------------------------------------------------


def strength_steps(key: str, value: Any, cfg: DictConfig) -> str | None:
    """img2img-style tasks re-run int(strength * steps) steps: at least one (ldm.samplers.sigmas)."""
    if _select(cfg, "task.strength") is _ABSENT:  # a task that starts from noise
        return None
    strength = _get(cfg, "task.default_strength") if value is None else value
    steps = _get(cfg, "steps")
    if not _is_number(strength) or not _is_whole(steps) or steps < 1 or int(strength * steps + 1e-6) >= 1:
        return None  # the value rules name a bad strength or steps
    run = f"int({strength:g} x {steps}) = 0 denoising steps"
    fix = f"strength >= {1 / steps:.3g} or steps >= {math.ceil(1 / strength - 1e-9)}"
    if value is None:
        return f"the task's default strength {strength:g} with steps={steps} re-runs {run}; pass {fix}."
    return f"with steps={steps} this re-runs {run}; use {fix}."


def strength(key: str, value: Any, cfg: DictConfig) -> str | None:
    if value is None or (_is_number(value) and 0 < value <= 1):
        return None
    return "must be in (0, 1] (the share of the schedule re-run from the image; null = the task's default)."


def read_by_task(key: str, value: Any, cfg: DictConfig) -> str | None:
    """An input the chosen task never reads (its conf/task/<name>.yaml has no such key) is a mistake."""
    if value in (None, "") or _select(cfg, "task") is _ABSENT or _select(cfg, f"task.{key}") is not _ABSENT:
        return None
    readers = [name for name, keys in _task_inputs().items() if key in keys]
    which = f" (task={', '.join(readers)} {'does' if len(readers) == 1 else 'do'})" if readers else ""
    return f"task={_get(cfg, 'task.name', '?')} does not read {key}{which}; drop it or pick that task."


@functools.cache
def _task_inputs() -> dict[str, set[str]]:
    """{task name: the keys its conf/task/<name>.yaml reads}."""
    inputs = {}
    for path in sorted((CONF_DIR / "task").glob("*.yaml")):
        try:
            task = OmegaConf.load(path)
        except (OSError, OmegaConfBaseException):
            continue
        inputs[str(task.get("name", path.stem))] = set(task.keys())
    return inputs


def labels(key: str, value: Any, cfg: DictConfig) -> str | None:
    ids = value if isinstance(value, list) else [value]
    if value is None or all(_is_whole(v) and v >= 0 for v in ids):
        return None
    return f"class ids are whole numbers >= 0; e.g. {key}=3 or '{key}=[0,2]'."


def adapter_files(what: str, with_scale: bool) -> Any:
    """A list of existing files (LoRA: each `path[:scale]`, the scale a number)."""

    def rule(key: str, value: Any, cfg: DictConfig) -> str | None:
        from ldm.pipeline import parse_lora_spec

        if value in (None, ""):
            return None
        items = list(value) if not isinstance(value, str) else [value]
        for item in items:
            if with_scale:
                path = parse_lora_spec(str(item))[0]
            else:
                from ldm.adapters.embeddings import split_spec

                path = split_spec(str(item))[0]
            if not Path(path).expanduser().is_file():
                example = (
                    "'lora=[style.safetensors:0.8]'" if with_scale else "'embeddings=[my-cat.safetensors]'"
                )
                return f"{path}: no such {what} file; pass existing files, e.g. {example}."
        return None

    return rule


def device(key: str, value: Any, cfg: DictConfig) -> str | None:
    return None if DEVICE.match(str(value)) else "use auto, cpu, mps, cuda or cuda:N."


SAMPLE_CHECKS: list[Check] = [
    Check(
        "ckpt",
        existing_file(
            "checkpoint",
            required="pass ckpt=<model.safetensors or .ckpt from train.py, or an original checkpoint "
            "+ config=<yaml>>.",
            folder_with=DIFFUSERS_FOLDER,
        ),
    ),
    Check("config", existing_file("CompVis yaml")),
    Check("lora", adapter_files("LoRA", with_scale=True)),
    Check("embeddings", adapter_files("textual-inversion embedding", with_scale=False)),
    Check("out_dir", writable_dir),
    Check("n", whole(1, "images per prompt or label", 4)),
    Check("steps", whole(1, "sampler steps", 50)),
    Check("batch_size", whole(1, "images per forward pass", 4)),
    Check("seed", whole(None, "image i uses seed + i", 0)),
    Check("cfg_scale", number(0, what="classifier-free guidance; 1 = off", example=5.0)),
    Check("precision", one_of(SAMPLE_PRECISIONS, "autocast of the UNet")),
    Check("device", device),
    Check("height", whole(1, "pixels; null = the training resolution", 512, nullable=True)),
    Check("width", whole(1, "pixels; null = the training resolution", 512, nullable=True)),
    Check("use_ema", boolean),
    Check("label", labels),
    Check("image", read_by_task),
    Check("mask", read_by_task),
    Check("pad", read_by_task),
    Check("segmap", read_by_task),
    Check("label", read_by_task),
    Check("strength", read_by_task),
    Check("strength", strength, show=lambda v: str(float(v)) if _is_number(v) else _show(v)),
    Check("strength", strength_steps),
]
