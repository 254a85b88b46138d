"""train.py with aspect-ratio buckets: stage 2 trains on batches of several shapes, every batch one shape."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
from PIL import Image
from train_helpers import compose_train, tiny_ae, tiny_overrides  # noqa: F401 (fixture)

import train
from ldm.config_checks import check_train_config
from ldm.data.make_shards import make_shards
from ldm.errors import UserError
from ldm.pipeline import Pipeline

BUCKETS = ["data.buckets.enabled=true", "data.buckets.step=8", "data.buckets.max_ratio=3.0"]
SIZES = [(96, 32), (32, 96), (64, 64), (80, 48), (48, 80), (40, 40), (120, 40), (36, 60)]


class ShapeProbe(pl.Callback):
    """Test-only callback (`+callbacks.shapes._target_=test_buckets_train.ShapeProbe`): the (height, width)
    and sample keys of every training batch, in `ShapeProbe.shapes` / `ShapeProbe.keys`."""

    shapes: list[tuple[int, int]] = []
    keys: list[list[str]] = []

    def __init__(self) -> None:
        ShapeProbe.shapes, ShapeProbe.keys = [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        ShapeProbe.shapes.append(tuple(batch["image"].shape[-2:]))
        ShapeProbe.keys.append(list(batch["key"]))


@pytest.fixture(scope="module")
def mixed_split(tmp_path_factory) -> Path:
    """24 mixed-aspect shapes images with captions, as train-*.tar / val-*.tar."""
    src, out = tmp_path_factory.mktemp("mixed_train_src"), tmp_path_factory.mktemp("mixed_train")
    rng = np.random.default_rng(0)
    for i in range(24):
        w, h = SIZES[i % len(SIZES)]
        arr = np.full((h, w, 3), rng.integers(0, 256, 3), np.uint8)
        arr[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = rng.integers(0, 256, 3)
        Image.fromarray(arr).save(src / f"{i:02d}.png")
        (src / f"{i:02d}.txt").write_text(f"a {'wide' if w > h else 'tall' if h > w else 'square'} box")
    make_shards(src, out, shard_size=4, val_fraction=0.25)
    return out


def _run(data: Path, run_dir: Path, ae: Path, steps: int, *extra: str) -> dict:
    overrides = tiny_overrides("txt2img", data, run_dir, ae, max_steps=steps, every=2)
    probe = "+callbacks.shapes._target_=test_buckets_train.ShapeProbe"
    cfg = compose_train(
        [*overrides, *BUCKETS, "data.batch_size=2", "data.keys=[image,caption,key]", probe, *extra]
    )
    check_train_config(cfg)
    return train.train(cfg)


def test_txt2img_trains_and_resumes_on_buckets(mixed_split, tiny_ae, tmp_path):  # noqa: F811
    """5 steps with validation and image grids at steps 2 and 4; then stopped at step 2 and resumed with
    ckpt_path=last: steps 3-5 see the same batches (keys and shapes) as the uninterrupted run."""
    metrics = _run(mixed_split, tmp_path / "full", tiny_ae, 5)
    assert math.isfinite(metrics["train/loss"]) and math.isfinite(metrics["val/loss"])
    shapes, keys = ShapeProbe.shapes, ShapeProbe.keys
    assert len(shapes) == 5 and set(shapes) <= {(16, 48), (24, 40), (32, 32), (40, 24), (48, 16)}
    assert len(set(shapes)) >= 2, shapes  # several buckets (h, w) within five steps
    assert len({k for batch in keys for k in batch}) == 10  # of the 18 train samples, none twice
    pipe = Pipeline.from_file(tmp_path / "full" / "model.safetensors", device="cpu")
    wide = pipe.txt2img("a wide box", n=1, steps=2, height=24, width=40, seed=0)
    assert wide.images[0].size == (40, 24) and wide.latents.shape == (1, 4, 12, 20)  # f = 2
    _run(mixed_split, tmp_path / "part", tiny_ae, 2)
    assert ShapeProbe.keys == keys[:2]
    _run(mixed_split, tmp_path / "part", tiny_ae, 5, "ckpt_path=last")
    assert ShapeProbe.keys == keys[2:] and ShapeProbe.shapes == shapes[2:]


@pytest.mark.parametrize(
    "override, words",
    [
        ("data.buckets.step=6", ("data.buckets.step=6", "multiple of 4", "f=2", "2x downsampling", "step=4")),
        ("data.buckets.max_ratio=0.5", ("data.buckets.max_ratio=0.5", ">= 1")),
        ("data.buckets.enabled=yes", ("data.buckets.enabled=yes", "true or false")),
        ("data.buckets.min_side=0", ("data.buckets.min_side=0", ">= 1", "or null")),
        ("data.buckets.max_area=big", ("data.buckets.max_area=big", "whole number")),
    ],
)
def test_bad_bucket_settings_are_one_line(override, words, mixed_split, tiny_ae, tmp_path):  # noqa: F811
    overrides = tiny_overrides("txt2img", mixed_split, tmp_path / "run", tiny_ae)
    cfg = compose_train([*overrides, "data.buckets.enabled=true", override])
    with pytest.raises(UserError) as info:
        check_train_config(cfg)
    message = str(info.value)
    assert "\n" not in message and all(w in message for w in words), message
