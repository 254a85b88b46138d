"""The embedded shapes generator: deterministic, consistent captions/labels/segmaps, a valid manifest."""

import hashlib
import importlib.util
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("make_dataset", REPO / "data" / "make_dataset.py")
make_dataset = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_dataset)


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.tar"))}


def test_generator_is_deterministic_and_writes_manifest(tmp_path):
    args = ["--resolution", "32", "--train", "30", "--val", "7", "--train-shards", "4", "--val-shards", "2"]
    assert make_dataset.main(["--out", str(tmp_path / "a"), "--workers", "1", *args]) == 0
    cli = [
        sys.executable,
        str(REPO / "data" / "make_dataset.py"),
        "--out",
        str(tmp_path / "b"),
        "--workers",
        "2",
    ]
    subprocess.run([*cli, *args], check=True, capture_output=True)  # the CLI the Makefile runs
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")  # byte-identical, any worker count
    make_dataset.main(["--out", str(tmp_path / "c"), "--workers", "1", "--seed", "1", *args])
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")
    m = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert m["splits"] == {"train": 30, "val": 7} and m["total"] == 37
    assert sorted(s["count"] for s in m["shards"] if s["split"] == "train") == [7, 7, 8, 8]
    assert m["class_names"] == make_dataset.SHAPES and m["segmap_classes"][0] == "background"
    with tarfile.open(tmp_path / "a" / "train-000000.tar") as tar:
        names = tar.getnames()
    assert names[:5] == [f"train_00000000.{ext}" for ext in ("cls", "json", "png", "seg.png", "txt")]


def test_sample_fields_agree():
    for i in range(40):
        s = make_dataset.make_sample(0, "train", i, 64)
        objs = s["meta"]["objects"]
        assert 1 <= len(objs) <= 3 and s["image"].size == (64, 64) and s["image"].mode == "RGB"
        seg = np.asarray(s["segmap"])
        present = {make_dataset.SHAPES[k - 1] for k in np.unique(seg) if k}
        assert present <= {
            o["shape"] for o in objs
        }  # ids in the map are the drawn shapes (some may be hidden)
        assert objs[-1]["shape"] in present  # the last one drawn is on top, always visible
        largest = max(objs, key=lambda o: o["radius"])
        assert s["label"] == make_dataset.SHAPES.index(largest["shape"])
        for o in objs:
            assert f"{o['size']} {o['color']} {o['shape']}" in s["caption"]
        assert s["caption"].endswith("background") and s["meta"]["caption"] == s["caption"]
        # background pixels (seg 0) are far from every shape's colour, shape pixels match theirs
        img = np.asarray(s["image"]).astype(int)
        top = objs[-1]
        inside = seg == make_dataset.SHAPES.index(top["shape"]) + 1
        cx, cy = (int(c * 64) for c in top["center"])
        if inside[cy, cx] and top["radius"] > 0.1:
            assert np.abs(img[cy, cx] - np.array(make_dataset.COLORS[top["color"]])).max() <= 2


def test_png_members_decode(tmp_path):
    make_dataset.main(
        ["--out", str(tmp_path), "--resolution", "48", "--train", "4", "--val", "0", "--workers", "1"]
    )
    with tarfile.open(tmp_path / "train-000000.tar") as tar:
        seg = Image.open(io.BytesIO(tar.extractfile("train_00000000.seg.png").read()))
        img = Image.open(io.BytesIO(tar.extractfile("train_00000000.png").read()))
        meta = json.loads(tar.extractfile("train_00000000.json").read())
    assert seg.mode == "L" and seg.size == img.size == (48, 48)
    assert meta["label_name"] == make_dataset.SHAPES[meta["label"]]


def test_examples_are_inputs_for_every_sample_task(tmp_path):
    # `make data` writes one validation sample as the inputs `make demo-sample` feeds to sample.py.
    assert (
        make_dataset.main(
            ["--out", str(tmp_path), "--workers", "1", "--resolution", "32", "--train", "4", "--val", "2"]
        )
        == 0
    )
    ex = tmp_path / "examples"
    x = make_dataset.make_sample(0, "val", 0, 32)
    image = Image.open(ex / "image.png")
    assert image.size == (32, 32) and np.array_equal(np.asarray(image), np.asarray(x["image"]))
    assert Image.open(ex / "lowres.png").size == (8, 8)  # superres x4 input
    seg = np.asarray(Image.open(ex / "segmap.png"))
    assert np.array_equal(seg, np.asarray(x["segmap"])) and seg.max() <= len(make_dataset.SHAPES)
    mask = np.asarray(Image.open(ex / "mask.png"))
    assert set(np.unique(mask)) == {0, 255} and (mask == 255).sum() == 16 * 16  # the centre quarter
    assert (ex / "caption.txt").read_text().strip() == x["caption"]
