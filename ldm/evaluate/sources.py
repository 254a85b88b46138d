"""Image sets to evaluate: a folder (a sample.py output with its run.json, or any images), WebDataset
shards, or samples drawn from a checkpoint; and the reference-feature cache.

Every image is decoded by `ldm.data.images.decode_image` (EXIF orientation, transparency on white) and,
when its size differs from the set's `size`, centre-cropped to a square and resized (bicubic), so both
sides of a comparison have one size. Images are uint8 tensors (N, 3, H, W).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ldm.data.images import ImageDecodeError, decode_image
from ldm.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
SHARD_IMAGE_KEYS = ("png", "jpg", "jpeg", "webp")  # the image member of a shard sample (not seg.png)
RUN_RECORD = "run.json"  # what sample.py writes beside its PNGs (ldm.sampling.records)


@dataclass
class ImageSet:
    """uint8 images (N, 3, H, W) with what is known about each one and where they came from."""

    images: Tensor
    prompts: list[str | None] = field(default_factory=list)  # per image; None where unknown
    labels: list[int | None] = field(default_factory=list)
    source: str = ""
    identity: str = ""  # names this exact set (paths, sizes, mtimes) for the reference cache

    def __len__(self) -> int:
        return len(self.images)

    @property
    def size(self) -> int:
        return int(self.images.shape[-1])


def fit(image: Image.Image, size: int | None) -> Tensor:
    """An RGB PIL image -> uint8 (3, size, size): centre square crop + bicubic resize when needed."""
    if size is not None and image.size != (size, size):
        w, h = image.size
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        image = image.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


def _stack(images: list[Tensor], source: str) -> Tensor:
    if not images:
        raise UserError(f"{source}: no images found (PNG/JPEG/WebP files, or shards with png/jpg members).")
    sizes = {tuple(t.shape) for t in images}
    if len(sizes) > 1:
        raise UserError(f"{source}: images of different sizes {sorted(sizes)[:3]}; pass --size to resize.")
    return torch.stack(images)


def _identity(parts: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _stat_line(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"


def _folder_entries(folder: Path, limit: int | None) -> tuple[list[Path], list, list]:
    """(files, prompts, labels) of a folder: a sample.py run.json's entries, else its images by name."""
    if (folder / RUN_RECORD).is_file():
        entries = json.loads((folder / RUN_RECORD).read_text(encoding="utf-8")).get("images", [])
        files = [folder / e["file"] for e in entries]
        prompts, labels = [e.get("prompt") for e in entries], [e.get("label") for e in entries]
    else:
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        prompts, labels = [None] * len(files), [None] * len(files)
    return files[:limit], prompts[:limit], labels[:limit]


def set_identity(spec: str | os.PathLike, size: int, limit: int | None = None) -> str:
    """A 16-hex name of the image set `read_images(spec, size, limit)` reads, from file paths, sizes and
    mtimes only (no decoding): the reference cache's key, so a cached set is not even read."""
    from ldm.data.shards import expand_shards, is_local

    path = Path(str(spec)).expanduser()
    if path.is_dir() and not any(path.glob("*.tar")):
        files = _folder_entries(path, limit)[0]
        stats = [_stat_line(f) for f in files if f.is_file()]
    else:
        stats = [_stat_line(Path(u)) if is_local(u) else u for u in expand_shards(str(spec), "reference")]
    return _identity([f"size={size}", f"limit={limit}", *stats])


def read_folder(path: str | os.PathLike, size: int | None = None, limit: int | None = None) -> ImageSet:
    """Images of a folder, in name order; a sample.py folder (run.json) gives its files and prompts/labels
    (grid.png excluded). `size`: resize to size x size (None: the first image's size, square required)."""
    folder = Path(path).expanduser()
    files, prompts, labels = _folder_entries(folder, limit)
    images = []
    for file in files:
        try:
            image = decode_image(file)
        except (ImageDecodeError, FileNotFoundError) as e:
            raise UserError(f"{file}: {e}") from None
        if size is None:
            size = image.size[0]
        images.append(fit(image, size))
    return ImageSet(
        images=_stack(images, str(folder)),
        prompts=prompts,
        labels=labels,
        source=str(folder),
        identity=set_identity(folder, size, limit),
    )


def read_shards(spec: str | Sequence[str], size: int | None = None, limit: int | None = None) -> ImageSet:
    """Images (and captions `txt`, labels `cls`) of WebDataset shards, in shard order (`spec`: a path,
    glob, brace range or folder of .tar, as `data.train_shards`)."""
    from ldm.data.shards import expand_shards, tar_samples

    urls = expand_shards(spec, name="reference shards")
    images, prompts, labels = [], [], []
    for sample in tar_samples(iter([{"url": u} for u in urls])):
        key = next((k for k in SHARD_IMAGE_KEYS if k in sample), None)
        if key is None:
            continue
        name = f"{sample['__url__']}:{sample['__key__']}"
        try:
            image = decode_image(sample[key], name)
        except ImageDecodeError as e:
            raise UserError(str(e)) from None
        if size is None:
            size = image.size[0]
        images.append(fit(image, size))
        prompts.append(sample["txt"].decode("utf-8").strip() if "txt" in sample else None)
        labels.append(int(sample["cls"].decode().strip()) if "cls" in sample else None)
        if limit is not None and len(images) >= limit:
            break
    return ImageSet(
        images=_stack(images, str(spec)),
        prompts=prompts,
        labels=labels,
        source=str(spec),
        identity=set_identity(spec, size, limit),
    )


def read_images(spec: str | os.PathLike, size: int | None = None, limit: int | None = None) -> ImageSet:
    """A folder of images (or a sample.py output) or WebDataset shards (.tar files, globs, a folder
    holding only .tar files)."""
    text = str(spec)
    path = Path(text).expanduser()
    if path.is_dir() and not any(path.glob("*.tar")):
        return read_folder(path, size, limit)
    if path.is_dir() or text.endswith(".tar") or any(c in text for c in "*?[{") or "::" in text:
        return read_shards(text, size, limit)
    raise UserError(f"{spec}: not a folder of images nor WebDataset shards (.tar); check the path.")


# --- drawing samples from a checkpoint ------------------------------------------------------------------
def draw_samples(
    checkpoint: str | os.PathLike,
    prompts: Sequence[str] | None = None,
    labels: Sequence[int] | None = None,
    n: int = 1,
    seed: int = 0,
    size: int | None = None,
    config: str | None = None,
    text_encoder: str | None = None,
    **run_options,
) -> ImageSet:
    """Sample `n` images per prompt (text models) or label (class models), or `n` unconditional ones,
    with `ldm.pipeline.Pipeline` (image i uses seed + i); `run_options` go to `Pipeline.run` (steps,
    sampler, cfg_scale, batch_size, height, width)."""
    from ldm.pipeline import Pipeline

    pipe = Pipeline.from_file(checkpoint, config=config, text_encoder=text_encoder, device="auto")
    if labels:
        out = pipe.class_cond(list(labels), n=n, seed=seed, **run_options)
    elif prompts:
        out = pipe.txt2img(list(prompts), n=n, seed=seed, **run_options)
    else:
        out = pipe.uncond(n=n, seed=seed, **run_options)
    images = torch.stack([fit(image, size) for image in out.images])
    entries = out.record.get("images", [])
    return ImageSet(
        images=images,
        prompts=[e.get("prompt") for e in entries] or [None] * len(images),
        labels=[e.get("label") for e in entries] or [None] * len(images),
        source=f"samples of {checkpoint}",
    )


# --- the reference-feature cache ------------------------------------------------------------------------
def cache_file(cache_dir: str | os.PathLike, reference_identity: str, extractor_identity: str) -> Path:
    """`<cache_dir>/ref-<sha16>.safetensors`, keyed by (reference set incl. its image size and count, as
    `set_identity` names it; feature extractor identity)."""
    key = _identity([reference_identity, extractor_identity])
    return Path(cache_dir).expanduser() / f"ref-{key}.safetensors"


def load_cached(path: Path) -> Tensor | None:
    """Cached reference features (N, D) float64, or None when there is no (readable) cache file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        return None
    try:
        return load_file(str(path))["features"]
    except (SafetensorError, OSError, KeyError):
        return None  # a damaged cache is recomputed (and rewritten)


def save_cached(path: Path, features: Tensor, reference: ImageSet, extractor_identity: str) -> None:
    """Write reference features atomically, with what they are of in the metadata."""
    from safetensors.torch import save_file

    from ldm.interop.checkpoint import atomic_path

    meta = {"reference": reference.source, "features": extractor_identity, "size": str(reference.size)}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file({"features": features.contiguous()}, str(tmp), metadata=meta)
