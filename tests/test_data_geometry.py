"""Photos of odd sizes and orientations: no crop box ever leaves the image, so none is skipped; and a run
whose data is largely unusable stops with one message instead of warning sample after sample."""

from __future__ import annotations

import io
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.data.pipeline import MIN_SAMPLES_FOR_SKIP_CHECK, PipelineOptions, ShardStream, decode_sample
from ldm.data.transforms import CropBox, crop_resize
from ldm.errors import UserError

# odd sides, both orientations, a panorama and a tall strip; JPEG drafts round each side up on its own
SIZES = [(1001, 750), (750, 1001), (333, 517), (517, 333), (999, 257), (257, 999), (1003, 1001), (641, 479)]
RESOLUTIONS = [32, 64, 128, 256]


def jpeg(width: int, height: int, orientation: int | None = None, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))
    buf = io.BytesIO()
    if orientation is None:
        img.save(buf, "JPEG", quality=80)
    else:
        exif = Image.Exif()
        exif[0x0112] = orientation
        img.save(buf, "JPEG", quality=80, exif=exif.tobytes())
    return buf.getvalue()


@pytest.mark.parametrize("resolution", RESOLUTIONS)
def test_odd_sizes_and_exif_rotations_decode_at_every_resolution(resolution):
    opts = PipelineOptions(resolution=resolution, crop="random", flip=True, keys=("image",))
    done = 0
    for i, (w, h) in enumerate(SIZES):
        if min(w, h) < resolution:
            continue
        for orientation in (None, 6, 8, 3):
            raw = {"__key__": f"{w}x{h}", "__url__": "mem", "jpg": jpeg(w, h, orientation, i)}
            for seed in range(3):  # crops at different places
                out = decode_sample(raw, opts, True, np.random.default_rng(seed))
                assert tuple(out["image"].shape) == (3, resolution, resolution)
                assert torch.isfinite(out["image"]).all()
                done += 1
    assert done >= 3 * 4 * 5


def test_crop_box_is_computed_per_side_and_clamped():
    # a 1001x750 photo drafted by 1/4 decodes at 251x188: one factor from the width (251/1001) would put the
    # bottom of a full-height box at 750*0.2507 = 188.07 > 188 ("box can't exceed original image size")
    img = Image.new("RGB", (251, 188), (10, 20, 30))
    box = CropBox(left=0.0, top=0.0, side=750.0, flip=False)
    out = crop_resize(img, box, 64, Image.Resampling.BICUBIC, (251 / 1001, 188 / 750))
    assert out.size == (64, 64) and out.getpixel((63, 63)) == (10, 20, 30)
    with_width_only = crop_resize(img, box, 64, Image.Resampling.BICUBIC, 251 / 1001)  # clamped, no error
    assert with_width_only.size == (64, 64)


def _shard(path: Path, good: int, bad: int) -> Path:
    """`good` readable JPEGs and `bad` garbage images, the bad ones spread evenly."""
    every = (good + bad) // bad if bad else 0
    with tarfile.open(path, "w") as tar:
        for i in range(good + bad):
            broken = bad and i % every == 0 and i // every < bad
            data = b"not an image" if broken else jpeg(40, 40, seed=i)
            for name, payload in ((f"{i:05d}.jpg", data), (f"{i:05d}.txt", b"a caption")):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return path


def _stream(path: Path) -> ShardStream:
    opts = PipelineOptions(resolution=32, keys=("image", "caption"), shuffle_buffer=0)
    return ShardStream([str(path)], opts, batch_size=4, train=True)


def test_a_mostly_broken_shard_stops_with_the_cause_and_examples(tmp_path, caplog):
    path = _shard(tmp_path / "bad.tar", good=40, bad=10)  # 20 % unreadable
    with caplog.at_level(logging.WARNING), pytest.raises(UserError) as info:
        for _ in _stream(path):
            pass
    text = str(info.value)
    assert "could not be used" in text and "not a readable image" in text and "sample '" in text
    shown = [r for r in caplog.records if "skipping bad sample" in r.getMessage()]
    assert len(shown) == 3  # each cause shown three times, then counted


def test_a_few_broken_samples_are_skipped_and_counted(tmp_path):
    path = _shard(tmp_path / "ok.tar", good=MIN_SAMPLES_FOR_SKIP_CHECK + 38, bad=2)  # 2.5 %
    n = sum(len(batch["caption"]) for batch in _stream(path))
    assert n == MIN_SAMPLES_FOR_SKIP_CHECK + 38
