"""The WebDataset DataModule: batch contract, rank/worker splitting, resampling, errors, bad samples."""

import importlib.util
import io
import json
import logging
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from ldm.data.datamodule import ShardDataModule
from ldm.errors import UserError

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("make_dataset", REPO / "data" / "make_dataset.py")
make_dataset = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_dataset)

ALL = ["image", "caption", "label", "segmap", "key"]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    """48 train samples in 6 shards (8 each), 16 val samples in 2 shards, 32 px."""
    out = tmp_path_factory.mktemp("shapes")
    make_dataset.main(
        ["--out", str(out), "--resolution", "32", "--train", "48", "--val", "16"]
        + ["--train-shards", "6", "--val-shards", "2", "--workers", "1"]
    )
    return out


def _dm(path: Path, **kw) -> ShardDataModule:
    kw.setdefault("keys", ALL)
    kw.setdefault("num_workers", 0)
    kw.setdefault("batch_size", 4)
    kw.setdefault("resolution", 32)
    dm = ShardDataModule(str(path / "train-*.tar"), kw.pop("val", str(path / "val-*.tar")), **kw)
    dm.setup("fit")
    return dm


def _keys(loader) -> list[str]:
    return [k for batch in loader for k in batch["key"]]


def test_batch_follows_contract(shapes):
    dm = _dm(shapes, batch_size=5, resolution=24)
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (5, 3, 24, 24) and batch["image"].dtype == torch.float32
    assert -1.0 <= batch["image"].min() < 0 < batch["image"].max() <= 1.0
    assert batch["segmap"].shape == (5, 24, 24) and batch["segmap"].dtype == torch.int64
    assert 0 <= int(batch["segmap"].min()) and int(batch["segmap"].max()) <= 5
    assert batch["label"].dtype == torch.int64 and batch["label"].shape == (5,)
    assert len(batch["caption"]) == 5 and all(isinstance(c, str) and " on " in c for c in batch["caption"])
    # the label names the largest shape, which the caption mentions
    names = make_dataset.SHAPES
    assert all(names[int(lbl)] in cap for lbl, cap in zip(batch["label"], batch["caption"]))
    assert not any(k.startswith("__") for k in batch)


def test_uint8_transfer_gives_the_same_images_after_transfer(shapes):
    ref = next(iter(_dm(shapes, shuffle_buffer=0, batch_size=6).train_dataloader()))
    dm = _dm(shapes, shuffle_buffer=0, batch_size=6, uint8_transfer=True, num_workers=1)
    raw = next(iter(dm.train_dataloader()))
    assert raw["image"].dtype == torch.uint8 and raw["image"].shape == (6, 3, 32, 32)
    out = dm.on_after_batch_transfer(raw, 0)  # Lightning calls this once the batch is on the device
    assert out["key"] == ref["key"]
    torch.testing.assert_close(out["image"], ref["image"], rtol=0, atol=1e-6)


def test_val_is_deterministic_center_crop(shapes):
    dm = _dm(shapes, num_workers=2)
    a, b = list(dm.val_dataloader()), list(dm.val_dataloader())
    assert sum(len(x["key"]) for x in a) == 16
    assert [x["key"] for x in a] == [x["key"] for x in b]
    torch.testing.assert_close(torch.cat([x["image"] for x in a]), torch.cat([x["image"] for x in b]))


def test_segmap_gets_the_same_random_crop_and_flip(tmp_path):
    """Image pixels encode their class (value = 40 * id): after crop/flip both must still agree."""
    import webdataset as wds
    from PIL import Image

    seg = np.repeat(np.arange(12, dtype=np.uint8) // 2, 4)[None].repeat(32, 0)  # 32 x 48 vertical stripes
    seg[:8] = 5 - seg[:8]  # break the left-right symmetry of a row so flips are visible
    buf, sbuf = io.BytesIO(), io.BytesIO()
    Image.fromarray(np.stack([seg * 40] * 3, -1)).save(buf, format="PNG")
    Image.fromarray(seg).save(sbuf, format="PNG")
    with wds.TarWriter(str(tmp_path / "s-000000.tar")) as w:
        for i in range(32):
            w.write({"__key__": f"k{i}", "png": buf.getvalue(), "seg.png": sbuf.getvalue()})
    dm = ShardDataModule(
        str(tmp_path / "s-*.tar"),
        None,
        keys=["image", "segmap"],
        resolution=32,
        batch_size=32,
        num_workers=0,
        crop="random",
        flip=True,
    )
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (32, 3, 32, 32) and batch["segmap"].shape == (32, 32, 32)
    torch.testing.assert_close(
        batch["image"][:, 0], batch["segmap"].float() * 40 / 127.5 - 1, atol=1e-6, rtol=0
    )
    rows = {tuple(s[20].tolist()) for s in batch["segmap"]}
    assert len(rows) > 4  # several crop offsets and flips were drawn


def test_ranks_and_workers_get_disjoint_complete_shares(shapes, monkeypatch):
    seen = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        dm = _dm(shapes, num_workers=3, batch_size=3, val=None)
        loader = dm.train_dataloader()
        for epoch in range(2):
            keys = _keys(loader)
            seen.append((rank, epoch, keys))
    for epoch in range(2):
        rank_keys = [set(k) for r, e, k in seen if e == epoch]
        lists = [k for r, e, k in seen if e == epoch]
        assert sum(len(k) for k in lists) == 48  # complete ...
        assert len(rank_keys[0] | rank_keys[1]) == 48  # ... and disjoint
    assert seen[0][2] != seen[1][2]  # epoch 1 uses another shard order / shuffle


def test_fewer_shards_than_slots_warns(shapes, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.warns(UserWarning, match=r"6 shard\(s\) for 4 rank\(s\) x 2 worker\(s\)"):
        _dm(shapes, num_workers=2, val=None, epoch_length=8)


def test_resampled_epoch_length_per_rank(shapes, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    dm = _dm(shapes, num_workers=2, batch_size=4, resampled=True, epoch_length=30, val=None)
    loader = dm.train_dataloader()
    batches = list(loader)
    assert sum(len(b["key"]) for b in batches) == 30
    assert len(batches) == len(loader) == 8  # two workers x ceil(15 / 4)
    again = list(dm.train_dataloader())  # same epoch number -> same stream
    assert [b["key"] for b in again] == [b["key"] for b in batches]


def test_epoch_length_without_resampling_cycles_shards(shapes):
    dm = _dm(shapes, num_workers=2, batch_size=8, epoch_length=70, val=None, shuffle_buffer=0)
    keys = _keys(dm.train_dataloader())
    assert len(keys) == 70
    counts = Counter(keys)
    assert len(counts) == 48 and max(counts.values()) == 2  # every sample once, then a second pass


def test_resampling_needs_an_epoch_length_and_readable_shards(shapes, tmp_path):
    with pytest.raises(UserError, match="set data.epoch_length"):
        ShardDataModule(str(shapes / "train-*.tar"), None, resampled=True)
    for i in range(3):
        with tarfile.open(tmp_path / f"e-{i}.tar", "w"):
            pass
    stream = _dm(shapes, resampled=True, epoch_length=10, val=None).train_dataloader().stream
    stream.urls = [str(tmp_path / f"e-{i}.tar") for i in range(3)]  # shards that went empty after setup
    with pytest.raises(UserError, match="100 shards in a row held no readable sample"):
        list(stream)


def test_segmap_without_image_is_cropped_too(shapes):
    batch = next(iter(_dm(shapes, keys=["segmap"], resolution=16, val=None).train_dataloader()))
    assert set(batch) == {"segmap"} and batch["segmap"].shape == (4, 16, 16)


def test_missing_shards_name_the_spec(tmp_path):
    dm = ShardDataModule(str(tmp_path / "nothing-{000000..000003}.tar"), None)
    with pytest.raises(UserError, match=r"nothing-\{000000\.\.000003\}\.tar.*matches no shard"):
        dm.setup("fit")


def test_empty_shards_are_an_error(tmp_path):
    for i in range(2):
        with tarfile.open(tmp_path / f"e-{i}.tar", "w"):
            pass
    with pytest.raises(UserError, match="no readable sample"):
        ShardDataModule(str(tmp_path / "e-*.tar"), None).setup("fit")


def test_missing_key_names_key_and_shard(shapes):
    dm = ShardDataModule(
        str(shapes / "train-*.tar"), None, keys=["image", "caption"], caption_key="json.prompt"
    )
    with pytest.raises(UserError, match=r"train-00000\d\.tar.*no field 'prompt'"):
        dm.setup("fit")
    dm = ShardDataModule(str(shapes / "train-*.tar"), None, keys=["image", "segmap"], segmap_key="mask.png")
    with pytest.raises(UserError, match=r"no 'mask.png' member.*members: cls, json, png, seg.png, txt"):
        dm.setup("fit")


def test_json_field_keys(shapes):
    dm = _dm(shapes, keys=["caption", "label"], caption_key="json.caption", label_key="json.label", val=None)
    ref = _dm(shapes, keys=["caption", "label"], val=None, shuffle_buffer=0)
    a = next(iter(dm.train_dataloader()))
    assert set(a) == {"caption", "label"}
    ref_batches = list(ref.train_dataloader())
    assert sorted(a["caption"])[0] in {c for b in ref_batches for c in b["caption"]}


def _copy_with_damage(src: Path, dst: Path, bad_keys: set[str]) -> None:
    """Copy a shard, truncating the png of the given samples to 40 bytes."""
    with tarfile.open(src) as fin, tarfile.open(dst, "w") as fout:
        for m in fin.getmembers():
            data = fin.extractfile(m).read()
            if (
                m.name.split(".")[0] in bad_keys
                and m.name.endswith(".png")
                and not m.name.endswith("seg.png")
            ):
                data = data[:40]
            m.size = len(data)
            fout.addfile(m, io.BytesIO(data))


def test_corrupt_samples_are_skipped_and_counted(shapes, tmp_path, caplog):
    for i, src in enumerate(sorted(shapes.glob("train-*.tar"))[:2]):
        bad = {"train_00000001", "train_00000005"} if i == 0 else {"train_00000012"}
        _copy_with_damage(src, tmp_path / f"train-{i:06d}.tar", bad)
    # and a shard cut in the middle of an image: the rest of that shard is lost, not the run
    with tarfile.open(shapes / "train-000002.tar") as tar:
        cut = tar.getmember("train_00000019.png")
    raw = (shapes / "train-000002.tar").read_bytes()
    (tmp_path / "train-000002.tar").write_bytes(raw[: cut.offset_data + cut.size // 2])
    dm = ShardDataModule(
        str(tmp_path / "train-*.tar"), None, keys=["image", "key"], batch_size=4, num_workers=2
    )
    dm.setup("fit")
    keys = _keys(dm.train_dataloader())
    bad = {"train_00000001", "train_00000005", "train_00000012"}
    assert sorted(keys) == sorted({f"train_{i:08d}" for i in range(19)} - bad)  # all intact samples, once
    # three damaged images, the cut one and the read errors of the cut shard (tarfile reports it twice)
    assert 4 <= dm.skipped <= 6
    dm = ShardDataModule(
        str(tmp_path / "train-*.tar"), None, keys=["image", "key"], batch_size=4, num_workers=0
    )
    dm.setup("fit")
    with caplog.at_level(logging.WARNING):
        assert len(_keys(dm.train_dataloader())) == 16
    assert "sample 'train_00000005' of shard " + str(tmp_path / "train-000000.tar") in caplog.text


def test_all_samples_bad_is_a_clear_error(shapes, tmp_path, monkeypatch):
    src = sorted(shapes.glob("train-*.tar"))[0]
    _copy_with_damage(src, tmp_path / "train-000000.tar", {f"train_{i:08d}" for i in range(8)})
    dm = ShardDataModule(str(tmp_path / "train-*.tar"), None, keys=["image"], num_workers=2)
    dm.setup("fit")  # a corrupt first sample alone is not fatal (it may be the only one)
    with pytest.raises(UserError, match=r"^data.train_shards: rank 0 read no usable sample"):
        list(dm.train_dataloader())
    import ldm.data.pipeline

    monkeypatch.setattr(ldm.data.pipeline, "MAX_CONSECUTIVE_ERRORS", 3)  # forked workers inherit it
    with pytest.raises(UserError, match=r"^3 samples in a row could not be used; the last: .*train_0000000"):
        list(dm.train_dataloader())


def test_worker_crash_raises_instead_of_hanging(shapes):
    dm = _dm(shapes, num_workers=2, val=None, task=_Crash(), timeout=20)
    with pytest.raises(RuntimeError, match="(?i)worker"):
        list(dm.train_dataloader())


class _Crash:
    def __call__(self, sample):
        import os

        os._exit(3)


def test_hydra_configs_instantiate(shapes, monkeypatch):
    """conf/data/shapes.yaml + data/task=inpaint through the root config, as train.py composes them."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    monkeypatch.setenv("LDM_ROOT", str(REPO))
    overrides = [
        f"paths.data_dir={shapes.parent}",
        f"data.train_shards={shapes}/train-*.tar",
        "data.val_shards=null",
    ]
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, "data/task=inpaint", "name=test", "data.batch_size=4"])
    assert cfg.data.seed == cfg.seed
    dm = instantiate(cfg.data)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["mask"].shape == (4, 1, 64, 64)  # the 32 px test images are upscaled to data.resolution
    torch.testing.assert_close(batch["masked_image"], batch["image"] * (1 - batch["mask"]))
    cover = batch["mask"].mean(dim=(1, 2, 3))
    assert torch.all((cover >= 0.1) & (cover <= 0.5))


def test_cached_latent_shards(tmp_path):
    """latents=true reads latent_mean/logvar .npy members and carries the conditioning along."""
    import webdataset as wds

    rng = np.random.default_rng(0)
    with wds.TarWriter(str(tmp_path / "lat-000000.tar")) as w:
        for i in range(6):
            w.write(
                {
                    "__key__": f"s{i}",
                    "latent_mean.npy": rng.standard_normal((4, 8, 8)).astype(np.float16),
                    "latent_logvar.npy": np.full((4, 8, 8), -2.0, np.float16),
                    "txt": f"caption {i}",
                    "cls": str(i),
                    "json": json.dumps({"caption": f"caption {i}"}).encode(),
                }
            )
    dm = ShardDataModule(
        str(tmp_path / "lat-*.tar"),
        None,
        keys=["caption", "label"],
        latents=True,
        batch_size=3,
        num_workers=0,
        shuffle_buffer=0,
    )
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["latent_mean"].shape == (3, 4, 8, 8) and batch["latent_mean"].dtype == torch.float32
    assert torch.all(batch["latent_logvar"] == -2.0)
    assert "image" not in batch and len(batch["caption"]) == 3
