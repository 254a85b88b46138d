"""What a sample.py run leaves: one PNG per image (its parameters in the PNG text), a grid, run.json."""

from __future__ import annotations

import json
import platform
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ldm.interop.load import LoadedModel
from ldm.sampling.job import Job
from ldm.sampling.runner import Result
from ldm.training.images import make_grid, save_png

PARAMETERS_KEY = "parameters"  # PNG text chunk holding the image's parameters as JSON
RECORD_NAME = "run.json"
GRID_NAME = "grid.png"


def image_name(index: int, seed: int, label: int | None = None) -> str:
    """`0003_seed3.png`; class-conditional images say their class: `0003_label7_seed3.png`."""
    return f"{index:04d}{'' if label is None else f'_label{int(label)}'}_seed{seed}.png"


def image_parameters(job: Job, index: int, seed: int, run: Mapping[str, Any]) -> dict[str, Any]:
    """Everything needed to reproduce image `index`: run settings, task parameters, its prompt/label, seed."""
    own = {("prompt" if k == "caption" else k): v for k, v in job.per_image[index].items()}
    return {
        **run,
        **job.params,
        **own,
        "seed": seed,
        "index": index,
        "height": job.size[0],
        "width": job.size[1],
    }


def make_record(
    result: Result,
    job: Job,
    loaded: LoadedModel,
    run: Mapping[str, Any],  # sampling settings: sampler, steps, cfg_scale, ... (JSON-able)
    config: Mapping[str, Any] | None = None,  # the resolved sample.py config
    timings: Mapping[str, float] | None = None,
    out_dir: str | Path | None = None,
) -> dict[str, Any]:
    """The run record (what run.json holds): settings, per-image seeds/prompts/labels, timings."""
    run = {**run, "checkpoint": str(loaded.path), "used_ema": loaded.used_ema}
    entries = []
    for i, seed in enumerate(result.seeds):
        params = image_parameters(job, i, seed, run)
        entries.append(
            {
                "file": image_name(i, seed, params.get("label")),
                **{k: params[k] for k in ("seed", "prompt", "label") if k in params},
            }
        )
    return {
        "task": job.params.get("task"),
        "out_dir": str(Path(out_dir).resolve()) if out_dir is not None else None,
        "checkpoint": loaded.describe(),
        "parameters": dict(run),
        "task_parameters": job.params,
        "size": {"height": job.size[0], "width": job.size[1]},
        "seeds": result.seeds,
        "guidance": result.guided,
        "images": entries,
        "grid": GRID_NAME,
        "timings": {**(timings or {}), **result.timings},
        "environment": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        },
        "config": dict(config or {}),
    }


def write_outputs(out_dir: str | Path, result: Result, job: Job, record: Mapping[str, Any]) -> None:
    """Write one PNG per image (its parameters in the PNG text), grid.png and run.json into `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    run = record["parameters"]
    for i, (image, seed) in enumerate(zip(result.images, result.seeds)):
        params = image_parameters(job, i, seed, run)
        name = image_name(i, seed, params.get("label"))
        save_png(image, out / name, {PARAMETERS_KEY: json.dumps(params, default=str)})
    save_png(make_grid(result.images), out / GRID_NAME, {PARAMETERS_KEY: json.dumps(run, default=str)})
    (out / RECORD_NAME).write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")
