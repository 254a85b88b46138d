"""Generate the embedded "shapes" dataset: coloured shapes with captions, labels and segmentation maps.

    python data/make_dataset.py --out data/shards/shapes --resolution 64 --train 2000 --val 200 --seed 0

Writes WebDataset shards `train-%06d.tar` / `val-%06d.tar` and a `manifest.json`. Every sample has
`png` (RGB image), `txt` (caption), `cls` (class of the largest shape, 0-based), `seg.png` (uint8 map:
0 = background, 1..K = shape type + 1) and `json` (caption, label, objects, background). Each sample
is drawn from its own generator seeded by (seed, split, index), so the content does not depend on
how many shards it is split into.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import sys
import tarfile
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ["circle", "square", "triangle", "star", "hexagon"]
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "orange": (245, 140, 30),
    "purple": (140, 60, 190),
    "pink": (240, 130, 180),
    "cyan": (40, 200, 210),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
    "brown": (130, 80, 40),
}
SIZES = {"small": (0.16, 0.24), "medium": (0.26, 0.36), "large": (0.38, 0.5)}  # diameter / image side
SUPERSAMPLE = 4  # draw the image 4x larger and downsample: antialiased edges at no extra dependency
SPLIT_IDS = {"train": 0, "val": 1}


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of a shape inscribed in the circle of radius r around (cx, cy), rotated by angle."""
    if shape == "star":  # 5 outer points alternating with 5 inner ones
        radii, start, n = [r if k % 2 == 0 else 0.45 * r for k in range(10)], -math.pi / 2, 10
    else:
        n, start = {"square": (4, math.pi / 4), "triangle": (3, -math.pi / 2), "hexagon": (6, 0.0)}[shape]
        radii = [r] * n
    return [
        (
            cx + radii[k] * math.cos(angle + start + 2 * math.pi * k / n),
            cy + radii[k] * math.sin(angle + start + 2 * math.pi * k / n),
        )
        for k in range(n)
    ]


def _draw(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, angle: float, fill) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon(_polygon(shape, cx, cy, r, angle), fill=fill)


def _a(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _background(rng: np.random.Generator, size: int) -> tuple[Image.Image, str, str]:
    """A solid or two-colour gradient background; returns (image, caption phrase, colour name)."""
    names = list(COLORS)
    first = names[rng.integers(len(names))]
    if rng.random() < 0.6:
        return Image.new("RGB", (size, size), COLORS[first]), f"on {_a(first)} {first} background", first
    second = names[rng.integers(len(names))]
    while second == first:
        second = names[rng.integers(len(names))]
    ramp = Image.linear_gradient("L").resize((size, size))  # 0 at the top, 255 at the bottom
    if rng.random() < 0.5:
        ramp = ramp.transpose(Image.Transpose.ROTATE_90)  # left-right instead of top-bottom
    img = Image.composite(
        Image.new("RGB", (size, size), COLORS[second]), Image.new("RGB", (size, size), COLORS[first]), ramp
    )
    return img, f"on {_a(first)} {first} to {second} gradient background", first


def _relation(a: dict, b: dict) -> str:
    """Spatial relation of object a to object b from their centres (image y grows downwards)."""
    dx, dy = a["center"][0] - b["center"][0], a["center"][1] - b["center"][1]
    if abs(dy) >= abs(dx):
        return "above" if dy < 0 else "below"
    return "to the left of" if dx < 0 else "to the right of"


def _phrase(obj: dict) -> str:
    return f"a {obj['size']} {obj['color']} {obj['shape']}"


def make_sample(seed: int, split: str, index: int, resolution: int) -> dict:
    """Draw one sample; deterministic in (seed, split, index, resolution)."""
    rng = np.random.default_rng([seed, SPLIT_IDS[split], index])
    big = resolution * SUPERSAMPLE
    image, bg_phrase, bg_color = _background(rng, big)
    segmap = Image.new("L", (resolution, resolution), 0)
    draw, seg_draw = ImageDraw.Draw(image), ImageDraw.Draw(segmap)
    names = [c for c in COLORS if c != bg_color]  # a shape never has the background's colour
    objects = []
    for _ in range(int(rng.integers(1, 4))):
        shape = SHAPES[rng.integers(len(SHAPES))]
        size = list(SIZES)[rng.integers(len(SIZES))]
        diameter = rng.uniform(*SIZES[size])
        r = diameter / 2
        cx, cy = rng.uniform(r, 1 - r), rng.uniform(r, 1 - r)
        angle = float(rng.uniform(-0.3, 0.3))
        color = names[rng.integers(len(names))]
        _draw(draw, shape, cx * big, cy * big, r * big, angle, COLORS[color])
        _draw(
            seg_draw, shape, cx * resolution, cy * resolution, r * resolution, angle, SHAPES.index(shape) + 1
        )
        bbox = [
            round((cx - r) * resolution),
            round((cy - r) * resolution),
            round((cx + r) * resolution),
            round((cy + r) * resolution),
        ]
        objects.append(
            dict(
                shape=shape,
                color=color,
                size=size,
                center=[round(cx, 4), round(cy, 4)],
                radius=round(r, 4),
                bbox=bbox,
            )
        )
    image = image.resize((resolution, resolution), Image.Resampling.BOX)
    main = max(objects, key=lambda o: o["radius"])  # the largest shape names the class
    label = SHAPES.index(main["shape"])
    caption = _phrase(objects[0])
    if len(objects) >= 2:
        caption += f" {_relation(objects[0], objects[1])} {_phrase(objects[1])}"
    if len(objects) == 3:
        caption += f" and {_phrase(objects[2])}"
    caption += f" {bg_phrase}"
    return dict(
        image=image,
        segmap=segmap,
        caption=caption,
        label=label,
        meta=dict(
            caption=caption,
            label=label,
            label_name=SHAPES[label],
            objects=objects,
            background=bg_phrase.split(" ", 2)[2].removesuffix(" background"),
        ),
    )


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)  # fast; the demo set is small either way
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o444  # mtime=0: byte-identical reruns
    tar.addfile(info, io.BytesIO(data))


def _write_shard(path: Path, split: str, start: int, stop: int, resolution: int, seed: int) -> int:
    # Plain tarfile rather than webdataset.TarWriter: the format is the same (members <key>.<ext>,
    # grouped by key) and not importing torch keeps `make data` to a couple of seconds.
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for i in range(start, stop):
            x = make_sample(seed, split, i, resolution)
            key = f"{split}_{i:08d}"
            _add(tar, f"{key}.cls", str(x["label"]).encode())
            _add(tar, f"{key}.json", json.dumps(x["meta"]).encode())
            _add(tar, f"{key}.png", _png(x["image"]))
            _add(tar, f"{key}.seg.png", _png(x["segmap"]))
            _add(tar, f"{key}.txt", x["caption"].encode())
    return stop - start


def write_split(
    out: Path, split: str, count: int, num_shards: int, resolution: int, seed: int, pool: Pool | None = None
) -> list[dict]:
    """Write `count` samples of one split into `num_shards` WebDataset tars; returns per-shard records."""
    num_shards = max(1, min(num_shards, count))
    bounds = np.linspace(0, count, num_shards + 1).round().astype(int).tolist()
    jobs = [
        (out / f"{split}-{s:06d}.tar", split, bounds[s], bounds[s + 1], resolution, seed)
        for s in range(num_shards)
    ]
    counts = pool.starmap(_write_shard, jobs) if pool is not None else [_write_shard(*job) for job in jobs]
    return [dict(name=job[0].name, split=split, count=n) for job, n in zip(jobs, counts)]


def write_examples(out: Path, resolution: int, seed: int) -> list[str]:
    """Inputs for every sample.py task from one validation sample (`make demo-sample` uses them)."""
    out.mkdir(parents=True, exist_ok=True)
    x = make_sample(seed, "val", 0, resolution)
    image = x["image"]
    image.save(out / "image.png")  # img2img, inpaint, outpaint
    x["segmap"].save(out / "segmap.png")  # semantic: class ids, 0 = background
    image.resize((resolution // 4,) * 2, Image.Resampling.BICUBIC).save(out / "lowres.png")  # superres x4
    mask = Image.new("L", (resolution, resolution), 0)  # inpaint: white = generate (the centre quarter)
    lo, hi = resolution // 4, 3 * resolution // 4 - 1
    ImageDraw.Draw(mask).rectangle([lo, lo, hi, hi], fill=255)
    mask.save(out / "mask.png")
    (out / "caption.txt").write_text(x["caption"] + "\n")
    return ["image.png", "segmap.png", "lowres.png", "mask.png", "caption.txt"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "shards" / "shapes")
    p.add_argument("--resolution", type=int, default=64, help="image side in pixels (64 to 256)")
    p.add_argument("--train", type=int, default=2000, help="number of training samples")
    p.add_argument("--val", type=int, default=200, help="number of validation samples")
    p.add_argument("--train-shards", type=int, default=8, help=">= ranks x workers so every worker gets data")
    p.add_argument("--val-shards", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--workers", type=int, default=min(4, os.cpu_count() or 1), help="processes (output is identical)"
    )
    args = p.parse_args(argv)
    if not 16 <= args.resolution <= 1024:
        print(
            f"--resolution {args.resolution}: use a side between 16 and 1024 (64 to 256 is typical)",
            file=sys.stderr,
        )
        return 2
    t0 = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    for stale in list(args.out.glob("train-*.tar")) + list(args.out.glob("val-*.tar")):
        stale.unlink()  # a smaller rerun must not leave old shards for a glob to pick up
    with Pool(args.workers) if args.workers > 1 else contextlib.nullcontext() as pool:
        shards = write_split(
            args.out, "train", args.train, args.train_shards, args.resolution, args.seed, pool
        )
        if args.val > 0:
            shards += write_split(
                args.out, "val", args.val, args.val_shards, args.resolution, args.seed, pool
            )
    manifest = dict(
        dataset="shapes",
        resolution=args.resolution,
        seed=args.seed,
        shards=shards,
        splits={s: sum(x["count"] for x in shards if x["split"] == s) for s in ("train", "val")},
        total=sum(x["count"] for x in shards),
        keys=["png", "txt", "cls", "seg.png", "json"],
        class_names=SHAPES,
        segmap_classes=["background", *SHAPES],
    )
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    write_examples(args.out / "examples", args.resolution, args.seed)
    took = time.perf_counter() - t0
    print(f"wrote {manifest['total']} samples in {len(shards)} shards to {args.out} ({took:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
