"""Write your own images (+ captions, labels) as WebDataset shards.

    python -m ldm.data.make_shards SRC OUT [--shard-size 1000] [--resize 288] [--format jpg] [--quality 95]
                                           [--min-size 64] [--val-fraction 0.01] [--workers 8]

SRC is a folder of images with optional sidecars (`cat.jpg` + `cat.txt` caption, `cat.cls` integer
label), searched recursively, or a CSV/JSONL listing with `path,caption[,label]` (paths relative to
the listing). Writes `OUT/shards-%06d.tar` (or `train-`/`val-` with --val-fraction) and
`OUT/manifest.json`. Unreadable or too-small images (below --min-size, and always below
`ldm.data.images.MIN_IMAGE_SIDE` = 8 px) are skipped and reported, never fatal.

Images are read by `ldm.data.images` like training reads them: upright (EXIF orientation applied
before --resize, so written shards are upright and carry no orientation tag), transparency composited
onto white when re-encoded. Bytes kept as they are (no --resize/--format) keep their EXIF tag and
alpha, which the training decoder applies the same way. Captions, labels and listings are read by
`ldm.data.text` (UTF-8, else cp1252 with a warning) and written as UTF-8.

Each sample's `json` member records `image_size` (the written image, upright) and `original_size` (the
source file, upright, before --resize) as [width, height]: aspect-ratio buckets (`data.buckets`) read the
first to decode a JPEG at just the size its bucket needs. Shards without it still work (sizes then come
from the image itself).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import random
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing import Pool
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from ldm.data.images import MIN_IMAGE_SIDE, ImageDecodeError, open_image, to_rgb
from ldm.data.text import read_text_file
from ldm.errors import UserError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
KEEP_AS_IS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}  # formats stored without re-encoding
SAVE_FORMAT = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}


@dataclass
class Item:
    """One listed image: where it is, its caption and label (either may be missing)."""

    path: str
    caption: str | None = None
    label: str | int | None = None


def list_folder(root: Path) -> list[Item]:
    """Images under root (recursive, sorted) with `.txt`/`.cls` sidecars when present."""
    items = []
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
        txt, cls = path.with_suffix(".txt"), path.with_suffix(".cls")
        caption = read_text_file(txt).strip() if txt.is_file() else None
        label = read_text_file(cls).strip() if cls.is_file() else None
        items.append(Item(str(path), caption, label))
    return items


def list_table(listing: Path) -> list[Item]:
    """Rows of a CSV (header with `path`, optional `caption`, `label`) or JSONL file."""
    base = listing.parent
    rows: list[dict] = []
    text = read_text_file(listing)
    if listing.suffix.lower() in (".jsonl", ".json"):
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    else:
        with io.StringIO(text, newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or "path" not in reader.fieldnames:
                raise UserError(
                    f"{listing}: the first line must be a header with a 'path' column (path,caption[,label])"
                )
            rows = list(reader)
    items = []
    for i, row in enumerate(rows):
        if "path" not in row:
            raise UserError(f"{listing}: row {i + 1} has no 'path'")
        path = Path(row["path"])
        items.append(
            Item(str(path if path.is_absolute() else base / path), row.get("caption"), row.get("label"))
        )
    return items


@dataclass
class EncodeOptions:
    resize: int | None = None  # shortest side in pixels (never upscales); None = keep
    format: str | None = None  # jpg | png | webp; None = keep JPEG/PNG/WebP bytes as they are
    quality: int = 95
    min_size: int = 0  # shortest side below this (and always below MIN_IMAGE_SIDE): skipped


def encode(item: Item, opts: EncodeOptions) -> tuple[str, bytes, dict] | str:
    """(extension, image bytes, sizes) for a usable image, else the reason it is skipped.

    sizes: {"image_size": [w, h] of the written image, "original_size": [w, h] of the source file}, both
    upright (after the EXIF orientation), in pixels; aspect-ratio buckets (ldm.data.buckets) read them."""
    try:
        with open(item.path, "rb") as f:
            data = f.read()
        opened = open_image(data, item.path, min_side=1)  # upright; a truncated file fails here
    except OSError as e:
        return f"unreadable ({type(e).__name__}: {e})"
    except ImageDecodeError as e:  # any unreadable file is skipped, whatever the cause
        return f"unreadable ({e.reason})"
    min_size = max(opts.min_size, MIN_IMAGE_SIDE)
    if min(opened.size) < min_size:
        return f"too small ({opened.size[0]}x{opened.size[1]} < {min_size})"
    shrink = opts.resize is not None and min(opened.size) > opts.resize
    original = list(opened.size)
    if not shrink and opts.format is None and opened.format in KEEP_AS_IS:
        return KEEP_AS_IS[opened.format], data, {"image_size": original, "original_size": original}
    ext = opts.format or KEEP_AS_IS.get(opened.format or "", "png")
    img = to_rgb(opened.image)  # as training reads it: upright, transparency on white
    if shrink:
        scale = opts.resize / min(img.size)
        img = img.resize(
            (max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.Resampling.LANCZOS
        )
    buf = io.BytesIO()
    kwargs = {"quality": opts.quality} if ext in ("jpg", "webp") else {}
    if ext == "webp" and opts.quality >= 100:
        kwargs = {"lossless": True}
    img.save(buf, format=SAVE_FORMAT[ext], **kwargs)
    return ext, buf.getvalue(), {"image_size": list(img.size), "original_size": original}


def _encode_star(args: tuple[Item, EncodeOptions]) -> tuple[str, bytes, dict] | str:
    return encode(*args)


def label_index(items: list[Item]) -> tuple[dict[str, int] | None, list[str] | None]:
    """Integer labels as given; string labels numbered in sorted order (names go to the manifest)."""
    labels = [i.label for i in items if i.label not in (None, "")]
    if not labels:
        return None, None
    try:
        return {str(x): int(x) for x in labels}, None
    except ValueError:
        names = sorted({str(x) for x in labels})
        return {n: k for k, n in enumerate(names)}, names


class SplitWriter:
    """A webdataset.ShardWriter that also counts the samples of each shard for the manifest."""

    def __init__(self, pattern: str, shard_size: int) -> None:
        import webdataset as wds

        self.writer = wds.ShardWriter(pattern, maxcount=shard_size, verbose=0, mtime=0)
        self.counts: dict[str, int] = {}

    def write(self, sample: dict) -> None:
        self.writer.write(sample)
        self.counts[self.writer.fname] = self.writer.count

    def close(self) -> list[dict]:
        fname = self.writer.fname
        self.writer.close()
        if fname not in self.counts and fname and os.path.exists(fname):
            os.remove(fname)  # opened eagerly by ShardWriter but never written to
        return [{"name": os.path.basename(f), "count": c} for f, c in self.counts.items()]


def make_shards(
    src: Path,
    out: Path,
    shard_size: int = 1000,
    opts: EncodeOptions | None = None,
    val_fraction: float = 0.0,
    workers: int = 1,
    seed: int | None = 0,
    overwrite: bool = False,
) -> dict:
    """List, check, (re-)encode and write the images; returns the manifest (also OUT/manifest.json)."""
    opts = opts or EncodeOptions()
    if not src.exists():
        raise UserError(f"{src} does not exist: give an image folder or a .csv/.jsonl listing")
    items = list_folder(src) if src.is_dir() else list_table(src)
    if not items:
        raise UserError(f"{src}: no images found (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    if seed is not None:  # shuffled once here, so each shard is a fair sample of the whole set
        random.Random(seed).shuffle(items)
    labels, class_names = label_index(items)
    n_val = int(round(len(items) * val_fraction))
    out.mkdir(parents=True, exist_ok=True)
    old = [p for pat in ("shards-*.tar", "train-*.tar", "val-*.tar") for p in out.glob(pat)]
    if old and not overwrite:
        raise UserError(
            f"{out} already holds {len(old)} shard(s) ({old[0].name}, ...): use a new folder or --overwrite"
        )
    for path in old:
        path.unlink()
    splits = {"val": SplitWriter(str(out / "val-%06d.tar"), shard_size)} if n_val else {}
    splits["train" if n_val else "shards"] = SplitWriter(
        str(out / ("train-%06d.tar" if n_val else "shards-%06d.tar")), shard_size
    )
    skipped: list[tuple[str, str]] = []
    keys: set[str] = set()
    written = 0
    jobs = ((item, opts) for item in items)
    with Pool(workers) if workers > 1 else _Serial() as pool:
        results = pool.imap(_encode_star, jobs, chunksize=16)
        for item, result in tqdm(zip(items, results), total=len(items), desc="make_shards", unit="img"):
            if isinstance(result, str):
                skipped.append((item.path, result))
                continue
            ext, data, sizes = result
            sample = {"__key__": f"{written:09d}", ext: data}
            meta: dict = {"path": os.path.relpath(item.path, src if src.is_dir() else src.parent), **sizes}
            if item.caption not in (None, ""):
                sample["txt"] = meta["caption"] = str(item.caption)
            if labels is not None and item.label not in (None, ""):
                sample["cls"] = str(labels[str(item.label)])
                meta["label"] = labels[str(item.label)]
            sample["json"] = json.dumps(meta).encode()
            keys.update(k2 for k2 in sample if not k2.startswith("__"))
            split = "val" if written < n_val else ("train" if n_val else "shards")
            splits[split].write(sample)
            written += 1
    shards = []
    for split, writer in splits.items():
        shards += [dict(s, split=split) for s in writer.close()]
    manifest = dict(
        source=str(src),
        shards=shards,
        splits={s: sum(x["count"] for x in shards if x["split"] == s) for s in splits},
        total=written,
        keys=sorted(keys),
        skipped=len(skipped),
        skipped_examples=[f"{p}: {why}" for p, why in skipped[:10]],
    )
    if class_names:
        manifest["class_names"] = class_names
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


class _Serial:
    """Pool stand-in for --workers 1."""

    def __enter__(self) -> _Serial:
        return self

    def __exit__(self, *exc) -> None:
        return None

    def imap(self, fn, it, chunksize: int = 1) -> Iterator:
        return map(fn, it)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ldm.data.make_shards", description=__doc__.split("\n")[0])
    p.add_argument("src", type=Path, help="image folder (with .txt/.cls sidecars) or a .csv/.jsonl listing")
    p.add_argument("out", type=Path, help="output folder for the .tar shards and manifest.json")
    p.add_argument(
        "--shard-size", type=int, default=1000, help="samples per shard (want >= ranks x workers shards)"
    )
    p.add_argument(
        "--resize", type=int, default=None, metavar="SHORT_SIDE", help="shrink the shortest side to this"
    )
    p.add_argument(
        "--format", choices=["jpg", "png", "webp"], default=None, help="re-encode (default: keep bytes)"
    )
    p.add_argument(
        "--quality", type=int, default=95, help="JPEG/WebP quality when re-encoding (webp 100 = lossless)"
    )
    p.add_argument(
        "--min-size", type=int, default=0, metavar="PX", help="skip images whose shortest side is smaller"
    )
    p.add_argument("--val-fraction", type=float, default=0.0, help="also write val-*.tar with this share")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="encoding processes")
    p.add_argument("--seed", type=int, default=0, help="shuffle seed; -1 keeps the listing order")
    p.add_argument("--overwrite", action="store_true", help="replace shards already in OUT")
    args = p.parse_args(argv)
    opts = EncodeOptions(args.resize, args.format, args.quality, args.min_size)
    try:
        seed = None if args.seed < 0 else args.seed
        m = make_shards(
            args.src, args.out, args.shard_size, opts, args.val_fraction, args.workers, seed, args.overwrite
        )
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {m['total']} samples in {len(m['shards'])} shards to {args.out} ({m['splits']})")
    if m["skipped"]:
        print(f"skipped {m['skipped']} file(s), e.g.:", *m["skipped_examples"][:5], sep="\n  ")
    return 0


if __name__ == "__main__":
    sys.exit(main())
