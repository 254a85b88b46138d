"""make_shards: folder/CSV/JSONL -> shards -> loader round trip; bad images skipped and reported."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.data.datamodule import ShardDataModule
from ldm.data.make_shards import EncodeOptions, main, make_shards
from ldm.errors import UserError


def _image(seed: int, size=(24, 24)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)


@pytest.fixture()
def folder(tmp_path) -> Path:
    """10 PNGs in nested folders with captions and labels, plus a broken file and a tiny image."""
    src = tmp_path / "src"
    for i in range(10):
        d = src / f"part{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_image(i)).save(d / f"img{i}.png")
        (d / f"img{i}.txt").write_text(f"picture number {i}\n")
        (d / f"img{i}.cls").write_text(str(i % 3))
    (src / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    Image.fromarray(_image(99, (6, 6))).save(src / "tiny.png")
    return src


def _load(out: Path, spec: str, **kw) -> list[dict]:
    opts = dict(batch_size=4, num_workers=0, resolution=24, crop="center", flip=False, shuffle_buffer=0)
    dm = ShardDataModule(str(out / spec), None, **{**opts, **kw})
    dm.setup("fit")
    return list(dm.train_dataloader())


def test_folder_round_trip_is_lossless(folder, tmp_path):
    out = tmp_path / "out"
    m = make_shards(folder, out, shard_size=3, opts=EncodeOptions(min_size=8))
    assert m["total"] == 10 and m["skipped"] == 2
    assert [s["count"] for s in m["shards"]] == [3, 3, 3, 1]
    assert sorted(p.name for p in out.glob("*.tar")) == [f"shards-{i:06d}.tar" for i in range(4)]
    assert any("broken.jpg: unreadable" in e for e in m["skipped_examples"])
    assert any("tiny.png: too small (6x6 < 8)" in e for e in m["skipped_examples"])
    assert m["keys"] == ["cls", "json", "png", "txt"]
    batches = _load(out, "shards-*.tar", keys=["image", "caption", "label"])
    got = {c: (img, int(lbl)) for b in batches for c, img, lbl in zip(b["caption"], b["image"], b["label"])}
    assert len(got) == 10
    for i in range(10):
        img, label = got[f"picture number {i}"]
        expected = torch.from_numpy(_image(i)).permute(2, 0, 1).float() / 127.5 - 1
        torch.testing.assert_close(img, expected, rtol=0, atol=1e-6)  # png: bit-exact pixels
        assert label == i % 3
    # json metadata keeps the source path relative to SRC
    meta_dm = _load(out, "shards-*.tar", keys=["caption"], caption_key="json.path")
    assert sorted(c for b in meta_dm for c in b["caption"])[0] == "part0/img0.png"


def test_csv_listing_with_string_labels_resize_and_val_split(tmp_path):
    src = tmp_path / "imgs"
    src.mkdir()
    rows = ["path,caption,label"]
    for i in range(8):
        Image.fromarray(_image(i, (40, 30))).save(src / f"{i}.png")
        rows.append(f'imgs/{i}.png,"caption, with comma {i}",{"cat" if i % 2 else "dog"}')
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    m = make_shards(
        tmp_path / "list.csv",
        out,
        shard_size=4,
        opts=EncodeOptions(resize=15, format="jpg"),
        val_fraction=0.25,
    )
    assert m["splits"] == {"val": 2, "train": 6} and m["class_names"] == ["cat", "dog"]
    assert {p.name for p in out.glob("*.tar")} == {"val-000000.tar", "train-000000.tar", "train-000001.tar"}
    batches = _load(out, "*.tar", keys=["image", "caption", "label"], resolution=15)
    caps = [c for b in batches for c in b["caption"]]
    labels = [int(x) for b in batches for x in b["label"]]
    assert sorted(caps) == sorted(f"caption, with comma {i}" for i in range(8))
    assert sorted(labels) == [0] * 4 + [1] * 4  # cat = 0, dog = 1
    with (out / "train-000000.tar").open("rb") as f:
        import tarfile

        with tarfile.open(fileobj=f) as tar:
            name = next(n for n in tar.getnames() if n.endswith(".jpg"))
            img = Image.open(tar.extractfile(name))
            assert img.format == "JPEG" and img.size == (20, 15)  # shortest side 30 -> 15


def test_jsonl_listing_and_cli(tmp_path, capsys):
    lines = []
    for i in range(3):
        Image.fromarray(_image(i)).save(tmp_path / f"{i}.png")
        lines.append(json.dumps({"path": f"{i}.png", "caption": f"c{i}"}))
    lines.append(json.dumps({"path": "missing.png", "caption": "gone"}))
    (tmp_path / "list.jsonl").write_text("\n".join(lines))
    assert (
        main(
            [
                str(tmp_path / "list.jsonl"),
                str(tmp_path / "out"),
                "--workers",
                "2",
                "--format",
                "webp",
                "--quality",
                "100",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "wrote 3 samples" in printed and "skipped 1 file(s)" in printed and "missing.png" in printed
    batches = _load(tmp_path / "out", "shards-*.tar", keys=["image", "caption"])
    imgs = {c: im for b in batches for c, im in zip(b["caption"], b["image"])}
    expected = torch.from_numpy(_image(1)).permute(2, 0, 1).float() / 127.5 - 1
    torch.testing.assert_close(imgs["c1"], expected, rtol=0, atol=1e-6)  # lossless webp
    assert main([str(tmp_path / "list.jsonl"), str(tmp_path / "out")]) == 2  # refuses to mix with old shards
    assert "--overwrite" in capsys.readouterr().err


def test_errors_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        make_shards(tmp_path / "nope", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no images found"):
        make_shards(tmp_path / "empty", tmp_path / "out")
    (tmp_path / "bad.csv").write_text("file,caption\nx.png,y\n")
    with pytest.raises(UserError, match="'path' column"):
        make_shards(tmp_path / "bad.csv", tmp_path / "out")
