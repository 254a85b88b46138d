"""Aspect-ratio buckets: the bucket set, whole-image crops, one shape per batch, exact coverage and resume."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from ldm_fixtures import save_tiny_autoencoder
from PIL import Image

from ldm.data.buckets import BucketOptions, BucketSet, bucket_sizes, peek_bucket
from ldm.data.cache_latents import cache_latents
from ldm.data.datamodule import ShardDataModule
from ldm.data.degradations import SuperResolution
from ldm.data.make_shards import make_shards
from ldm.data.masks import InpaintingMask
from ldm.data.pipeline import PipelineOptions, decode_sample
from ldm.data.shards import tar_samples
from ldm.errors import UserError

# At 32 px, step 8, max_ratio 3 (area <= 32^2): five buckets, tall to wide.
BUCKETS = dict(enabled=True, step=8, max_ratio=3.0)
SIZES_32 = [(16, 48), (24, 40), (32, 32), (40, 24), (48, 16)]
# Upright source sizes (w, h): panoramas, portraits, odd and tiny ones; each is written twice (two colours).
SOURCES = [
    (96, 32), (32, 96), (64, 64), (80, 48), (48, 80), (37, 101), (101, 37), (8, 8), (9, 30), (50, 50),
    (200, 50), (45, 45), (70, 60), (60, 70), (33, 33), (150, 60), (41, 99), (90, 90), (64, 40),
]  # fmt: skip
EXPECTED_32 = {  # closest bucket in log aspect ratio
    (96, 32): (48, 16), (32, 96): (16, 48), (64, 64): (32, 32), (80, 48): (40, 24), (48, 80): (24, 40),
    (37, 101): (16, 48), (101, 37): (48, 16), (8, 8): (32, 32), (9, 30): (16, 48), (50, 50): (32, 32),
    (200, 50): (48, 16), (45, 45): (32, 32), (70, 60): (32, 32), (60, 70): (32, 32), (33, 33): (32, 32),
    (150, 60): (48, 16), (41, 99): (16, 48), (90, 90): (32, 32), (64, 40): (40, 24), (40, 120): (16, 48),
}  # fmt: skip
RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def _striped(width: int, height: int, stripe: int, middle=GREEN) -> Image.Image:
    """Red columns on the left, blue on the right, `middle` between."""
    arr = np.empty((height, width, 3), np.uint8)
    arr[:] = middle
    arr[:, :stripe] = RED
    arr[:, width - stripe :] = BLUE
    return Image.fromarray(arr)


def _exif_rotated_jpeg(path: Path) -> None:
    """Stored 120x40 with EXIF orientation 6 (rotate 90 degrees): upright it is 40x120."""
    exif = Image.Exif()
    exif[0x0112] = 6
    _striped(120, 40, 10).save(path, "JPEG", quality=95, exif=exif.tobytes())


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> Path:
    """39 mixed-aspect images (PNG + one EXIF-rotated JPEG) in 8 shards of 5; one PNG damaged (skipped)."""
    src, out = tmp_path_factory.mktemp("mixed_src"), tmp_path_factory.mktemp("mixed")
    for i, (w, h) in enumerate(SOURCES * 2):
        middle = GREEN if i < len(SOURCES) else (128, 128, 128)
        _striped(w, h, max(1, w // 8), middle).save(src / f"w{w}_h{h}_{i:02d}.png")
        (src / f"w{w}_h{h}_{i:02d}.txt").write_text(f"image {i}")
    _exif_rotated_jpeg(src / "w40_h120_exif.jpg")
    make_shards(src, out, shard_size=5)
    damage = (
        out / "shards-000003.tar"
    )  # truncate the first image of one shard: it must be skipped and counted
    data = io.BytesIO()
    with tarfile.open(damage) as fin, tarfile.open(fileobj=data, mode="w") as fout:
        for n, m in enumerate(fin.getmembers()):
            blob = fin.extractfile(m).read()
            if n == 1:  # members sort as cls/json/png/txt per sample: index 1 or 2 is the image
                blob = blob[:40] if m.name.endswith(".png") else blob
            m.size = len(blob)
            fout.addfile(m, io.BytesIO(blob))
    damage.write_bytes(data.getvalue())
    return out


OPEN: list = []  # loaders of the running test, closed after it (their worker processes)


@pytest.fixture(autouse=True)
def _close_loaders():
    yield
    while OPEN:
        loader = OPEN.pop()
        if hasattr(loader, "close"):
            loader.close()


def _open(loader):
    OPEN.append(loader)
    return loader


def _all_samples(folder: Path) -> list[dict]:
    return [s for url in sorted(map(str, folder.glob("*.tar"))) for s in tar_samples([{"url": url}])]


def _dm(folder: Path, spec: str = "*.tar", **kw) -> ShardDataModule:
    base = dict(
        keys=["image", "caption", "key"],
        caption_key="json.path",
        batch_size=3,
        resolution=32,
        shuffle_buffer=8,
        num_workers=0,
        buckets=BUCKETS,
    )
    dm = ShardDataModule(str(folder / spec), str(folder / spec), **dict(base, **kw))
    dm.setup("fit")
    return dm


def _source_size(path: str) -> tuple[int, int]:
    w, h = path.split("_")[:2]
    return int(w[1:]), int(h[1:])


def _same(a: list[dict], b: list[dict]) -> None:
    assert [x["key"] for x in a] == [x["key"] for x in b]
    for x, y in zip(a, b):
        torch.testing.assert_close(x["image"], y["image"], rtol=0, atol=0)


# --- the bucket set ---------------------------------------------------------------------------------------
def test_bucket_sizes_match_kohya():
    assert bucket_sizes(256 * 256, 64) == [(192, 320), (256, 256), (320, 192)]
    sd = bucket_sizes(512 * 512, 64)
    assert sd == [(384, 640), (448, 576), (512, 512), (576, 448), (640, 384)]
    assert all(w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512 for w, h in sd)
    assert bucket_sizes(32 * 32, 8, max_ratio=3.0) == SIZES_32
    wide = bucket_sizes(256 * 256, 64, max_ratio=4.0)
    assert wide[-3:] == [(384, 128), (448, 128), (512, 128)] and wide[0] == (128, 512)
    assert bucket_sizes(256 * 256, 64, min_side=128, max_side=256, max_ratio=4.0) == [
        (128, 256), (192, 256), (256, 256), (256, 192), (256, 128),
    ]  # fmt: skip
    buckets = BucketSet(BucketOptions(enabled=True, step=64, max_ratio=4.0), 256)
    assert buckets.assign(300, 100) == (384, 128) and buckets.assign(100, 300) == (128, 384)
    assert buckets.assign(1000, 100) == (512, 128)  # beyond max_ratio: the widest bucket, cropped
    assert buckets.draft(3000, 1000) == 128  # the short side needed: 1000 px * (384 / 3000)


@pytest.mark.parametrize(
    "options, words",
    [
        (
            dict(enabled=True, step=64, min_side=100),
            ("min_side=100", "multiple of", "step=64", "min_side=64"),
        ),
        (dict(enabled=True, step=0), ("step=0", ">= 1")),
        (dict(enabled=True, max_ratio=0.5), ("max_ratio=0.5", ">= 1")),
        (dict(enabled="yes"), ("enabled='yes'", "true or false")),
        (dict(enabled=True, steps=8), ("unknown key", "steps")),
        (dict(enabled=True, step=64, min_side=512), ("no bucket fits", "max_area=4096")),
    ],
)
def test_bad_bucket_options_are_one_line(options, words):
    with pytest.raises(UserError) as info:
        PipelineOptions(resolution=64, buckets=options)
    assert "\n" not in str(info.value) and all(w in str(info.value) for w in words), str(info.value)


# --- one image ----------------------------------------------------------------------------------------------
def test_panorama_keeps_its_width():
    """A 3:1 panorama lands whole in the 384x128 bucket: both edge stripes survive; a square crop cuts both"""
    buf, seg_buf = io.BytesIO(), io.BytesIO()
    _striped(300, 100, 20).save(buf, "PNG")
    ids = np.zeros((100, 300), np.uint8)
    ids[:, :20], ids[:, -20:] = 1, 2  # the segmap follows the same crop (nearest-neighbour)
    Image.fromarray(ids, "L").save(seg_buf, "PNG")
    raw = {"__key__": "pano", "__url__": "mem", "png": buf.getvalue(), "seg.png": seg_buf.getvalue()}
    on = PipelineOptions(
        resolution=256, keys=["image", "segmap"], buckets=dict(enabled=True, step=64, max_ratio=4.0)
    )
    red, blue = torch.tensor([1.0, -1.0, -1.0]), torch.tensor([-1.0, -1.0, 1.0])
    for train in (False, True):
        sample = decode_sample(raw, on, train=train, rng=np.random.default_rng(3))
        img, seg = sample["image"], sample["segmap"]
        assert img.shape == (3, 128, 384) and seg.shape == (128, 384)  # 3:1, not 1:1
        assert {int(seg[5, 0]), int(seg[5, -1])} == {1, 2} and int(seg[5, 192]) == 0
        left, right = img[:, 64, :20].T, img[:, 64, -20:].T  # 20 px stripes -> 25.6 px at 1.28x
        edges = {tuple(left.mean(0).round().tolist()), tuple(right.mean(0).round().tolist())}
        assert edges == {tuple(red.tolist()), tuple(blue.tolist())}  # flipped or not, both edges are there
        if not train:
            torch.testing.assert_close(left, red.expand(20, 3), rtol=0, atol=0)
            torch.testing.assert_close(right, blue.expand(20, 3), rtol=0, atol=0)
    square = decode_sample(raw, PipelineOptions(resolution=256, keys=["image"]), train=False, rng=None)[
        "image"
    ]
    assert square.shape == (3, 256, 256)
    assert square[:, 128, 0].tolist() == square[:, 128, -1].tolist() == [-1.0, 1.0, -1.0]  # green: both lost


@pytest.mark.parametrize("task", [InpaintingMask(), SuperResolution(scale=4)], ids=["inpaint", "superres"])
def test_task_transforms_follow_the_bucket(mixed, task):
    shapes = set()
    for batch in _open(_dm(mixed, task=task).train_dataloader()):
        _, _, h, w = batch["image"].shape
        if "mask" in batch:
            assert batch["mask"].shape[-2:] == batch["masked_image"].shape[-2:] == (h, w)
        else:
            assert batch["lowres"].shape[-2:] == (h // 4, w // 4)
        shapes.add((w, h))
    assert shapes == set(SIZES_32)


def test_odd_rotated_and_tiny_images_get_a_bucket(mixed):
    """Every readable sample (odd sizes, 8x8, EXIF-rotated JPEG) has the bucket of its upright shape; the
    header peek (used to replay another rank's position) agrees with decoding."""
    opts = PipelineOptions(resolution=32, keys=["image", "caption"], caption_key="json.path", buckets=BUCKETS)
    seen, failed = {}, []
    for raw in _all_samples(mixed):
        meta = json.loads(raw["json"])
        try:
            sample = decode_sample(raw, opts, train=False, rng=None)
        except Exception as e:  # noqa: BLE001 - only the damaged PNG
            failed.append((meta["path"], type(e).__name__))
            continue
        upright = _source_size(meta["path"])
        assert meta["image_size"] == meta["original_size"] == list(upright)  # recorded by make_shards
        w, h = EXPECTED_32[upright]
        assert sample["image"].shape == (3, h, w) and sample["__bucket__"] == (w, h)
        assert peek_bucket(raw, opts) == (w, h)
        raw.pop("json")  # older shards without the record: the header says the same
        assert peek_bucket(raw, opts) == (w, h)
        seen[meta["path"]] = (w, h)
    assert len(seen) == 2 * len(SOURCES) and len(failed) == 1  # 38 PNGs + the JPEG - the damaged one
    assert failed[0][1] == "SampleError" and failed[0][0].endswith(".png")
    assert seen["w40_h120_exif.jpg"] == (16, 48)  # stored 120x40: tall only after its EXIF rotation
    assert seen["w8_h8_07.png"] == (32, 32) and seen["w9_h30_08.png"] == (16, 48)


# --- whole epochs -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("workers", [0, 2])
def test_every_batch_one_shape_and_each_sample_once(mixed, workers, monkeypatch):
    """2 ranks x `workers` workers: each batch is one bucket, each sample its own bucket, each seen once."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    keys: list[str] = []
    shapes: set[tuple[int, int]] = set()
    small = skipped = 0
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        dm = _dm(mixed, num_workers=workers)
        for batch in _open(dm.train_dataloader()):
            b, c, h, w = batch["image"].shape
            assert c == 3 and (w, h) in SIZES_32
            assert all(EXPECTED_32[_source_size(p)] == (w, h) for p in batch["caption"])
            keys += batch["key"]
            shapes.add((w, h))
            small += b < 3
        skipped += dm.skipped
    assert len(keys) == len(set(keys)) == 2 * len(SOURCES) and skipped == 1  # all but the damaged one, once
    assert shapes == set(SIZES_32)
    assert small <= len(SIZES_32) * 2 * max(workers, 1)  # leftovers: at most one per bucket and worker


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_is_exact(mixed, workers):
    dm = _dm(mixed, num_workers=workers)
    loader = _open(dm.train_dataloader())
    full = list(loader)
    assert sum(len(b["key"]) for b in full) == 2 * len(SOURCES)
    for stop in (1, 4, len(full) - 2):
        state = loader.state_at(stop)
        held = [p[2]["held"] for p in state["workers"].values()]
        assert any(held)  # samples waiting in the bucket buffers: they must come back, decoded the same
        resumed = _dm(mixed, num_workers=workers)
        resumed.load_state_dict({"loader": state})
        rest = list(_open(resumed.train_dataloader()))
        _same(rest, full[stop:])


def test_resume_in_a_later_epoch(mixed):
    """Epoch 1's position waits through epoch 0, then reaches the (persistent) workers with its buffers."""
    loader = _open(_dm(mixed, num_workers=2).train_dataloader())
    epoch0, epoch1 = list(loader), list(loader)
    assert [b["key"] for b in epoch0] != [b["key"] for b in epoch1]  # reshuffled
    state = loader.state_at(5)
    assert state["epoch"] == 1 and any(p[2]["held"] for p in state["workers"].values())
    resumed = _dm(mixed, num_workers=2)
    resumed.load_state_dict({"loader": state})
    again = _open(resumed.train_dataloader())
    _same(list(again), epoch0)
    _same(list(again), epoch1[5:])


def test_resume_from_another_ranks_checkpoint(mixed, monkeypatch):
    """DDP checkpoints hold rank 0's position: rank 1 replays its stream by bucket sizes to the same step
    (assuming, as without buckets, that no sample was unreadable: the damaged shard is left out)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    runs, clean = {}, "shards-00000[0124567].tar"
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        dm = _dm(mixed, clean, num_workers=2, epoch_length=14)
        loader = _open(dm.train_dataloader())
        runs[rank] = (loader, list(loader))
        assert (
            len(runs[rank][1]) == len(loader) == 6
        )  # 7 samples per worker: 3 + 3 + 1, exactly as unbucketed
        assert [len(b["key"]) for b in runs[rank][1]] == [3, 3, 3, 3, 1, 1]
    state = runs[0][0].state_at(3)
    assert state["rank"] == 0
    resumed = _dm(mixed, clean, num_workers=2, epoch_length=14)
    resumed.load_state_dict({"loader": state})
    _same(list(_open(resumed.train_dataloader())), runs[1][1][3:])


def test_val_is_bucketed_and_deterministic(mixed):
    dm = _dm(mixed, num_workers=2)
    first, second = list(_open(dm.val_dataloader())), list(_open(dm.val_dataloader()))
    _same(first, second)
    assert {tuple(b["image"].shape[-2:]) for b in first} == {(h, w) for w, h in SIZES_32}
    opts = PipelineOptions(resolution=32, keys=["image"], buckets=BUCKETS)
    raws = {r["__key__"]: r for r in _all_samples(mixed)}
    for batch in first:  # centre crops, never flipped: what decoding without an rng gives
        for key, img in zip(batch["key"], batch["image"]):
            torch.testing.assert_close(
                img, decode_sample(raws[key], opts, False, None)["image"], rtol=0, atol=0
            )


# --- latent cache -------------------------------------------------------------------------------------------
def test_latent_cache_keeps_each_bucket(mixed, tmp_path):
    ae_path = save_tiny_autoencoder(tmp_path / "ae")  # f = 2
    out = tmp_path / "latents"
    manifest = cache_latents(
        str(ae_path), str(mixed / "*.tar"), out, dtype="float32", resolution=32, batch_size=4,
        num_workers=0, buckets=BUCKETS,
    )  # fmt: skip
    assert sum(manifest["latent_shapes"].values()) == 2 * len(SOURCES)
    assert sorted(manifest["latent_shapes"]) == sorted(f"4x{h // 2}x{w // 2}" for w, h in SIZES_32)
    assert manifest["buckets"]["step"] == 8
    dm = ShardDataModule(
        str(out / "train-*.tar"), None, keys=["caption", "key"], caption_key="json.path", batch_size=3,
        num_workers=0, latents=True, crop="center", flip=False, shuffle_buffer=8, buckets=BUCKETS,
    )  # fmt: skip
    keys = []
    for batch in _open(dm.train_dataloader()):
        _, c, h, w = batch["latent_mean"].shape
        assert c == 4 and all(EXPECTED_32[_source_size(p)] == (2 * w, 2 * h) for p in batch["caption"])
        keys += batch["key"]
    assert len(keys) == len(set(keys)) == 2 * len(SOURCES)
