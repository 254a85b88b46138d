"""Per-sample image ops (resize, crop, flip; decoding: ldm.data.images) and the shared task transforms.

Task transforms are callables `transform(sample: dict) -> dict`, instantiated by Hydra from
`conf/data/task/*.yaml`. They run in the loader workers after the crop, on one sample whose
"image" is a float32 (3, H, W) tensor in [-1, 1] and "segmap" an int64 (H, W) tensor. They draw
random numbers from `sample_rng(sample)`, a generator the pipeline seeds from
(seed, epoch, rank, worker, sample index), so a resumed run reproduces the same masks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

RNG_KEY = "__rng__"


def sample_rng(sample: dict) -> np.random.Generator:
    """The sample's own generator (seeded by the pipeline); a fresh one outside the pipeline."""
    rng = sample.get(RNG_KEY)
    if rng is None:
        rng = sample[RNG_KEY] = np.random.default_rng()
    return rng


@dataclass(frozen=True)
class CropBox:
    """Where the crop sits in the source image (source pixels), and whether it is mirrored.

    Square (`side` x `side`) unless `height` is given: then `side` is the width (aspect-ratio buckets,
    ldm.data.buckets)."""

    left: float
    top: float
    side: float
    flip: bool
    height: float | None = None  # None = square


def choose_crop(width: int, height: int, crop: str, flip: bool, rng: np.random.Generator | None) -> CropBox:
    """A square crop of the shortest side: centred, or uniformly placed for `crop="random"`."""
    side = min(width, height)
    if crop == "random" and rng is not None:
        left, top = rng.integers(0, width - side + 1), rng.integers(0, height - side + 1)
    elif crop in ("center", "random"):
        left, top = (width - side) // 2, (height - side) // 2
    else:
        raise ValueError(f"crop={crop!r}: use 'center' or 'random'")
    mirrored = bool(flip and rng is not None and rng.random() < 0.5)
    return CropBox(float(left), float(top), float(side), mirrored)


def crop_resize(
    img: Image.Image,
    box: CropBox,
    size: int | tuple[int, int],
    resample: Image.Resampling,
    scale: float | tuple[float, float] = 1.0,
) -> Image.Image:
    """Resize the crop box (in source pixels) of `img` to size x size, or to (width, height).

    `scale`: `img`'s size over the source size, (sx, sy) per side or one number. A JPEG decoded at a draft
    scale rounds each side up on its own (a 1001 x 750 photo drafted by 1/4 is 251 x 188, not 250.25 x
    187.5), so one factor from the width could put the box past the bottom edge; the box is computed per
    side and clamped to the image, so no crop can fall outside it."""
    sx, sy = (float(scale), float(scale)) if isinstance(scale, (int, float)) else map(float, scale)
    width, height = img.size
    b = (
        min(max(box.left * sx, 0.0), width - 1.0),
        min(max(box.top * sy, 0.0), height - 1.0),
        min((box.left + box.side) * sx, float(width)),
        min((box.top + (box.side if box.height is None else box.height)) * sy, float(height)),
    )
    out = img.resize((size, size) if isinstance(size, int) else tuple(size), resample, box=b)
    return out.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if box.flip else out


def to_tensor(img: Image.Image) -> torch.Tensor:
    """uint8 RGB PIL image -> float32 (3, H, W) in [-1, 1], contiguous.

    Done in numpy, one channel at a time into one buffer: torch's elementwise ops on a permuted
    uint8 view ran ~100x slower in a busy main process (intra-op threads waiting on each other).
    """
    x = np.asarray(img)  # (H, W, 3) uint8
    out = np.empty((3, *x.shape[:2]), np.float32)
    for c in range(3):
        np.multiply(x[:, :, c], np.float32(1 / 127.5), out=out[c], casting="unsafe")
    out -= np.float32(1.0)
    return torch.from_numpy(out)


def to_pil(x: torch.Tensor) -> Image.Image:
    """float (3, H, W) in [-1, 1] -> uint8 RGB PIL image."""
    arr = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr)


class Compose:
    """Apply several task transforms in order (e.g. a semantic map plus an inpainting mask)."""

    def __init__(self, transforms: Sequence[Callable[[dict], dict]]) -> None:
        self.transforms = list(transforms)

    def __call__(self, sample: dict) -> dict:
        for t in self.transforms:
            sample = t(sample)
        return sample


class SemanticMap:
    """Check the integer map "segmap" against `num_classes`; optionally add "segmap_onehot" (K, H, W).

    "segmap" stays an int64 (H, W) map (0 = background) as the batch contract says; the one-hot copy
    is for conditioners that want a float tensor (CompVis concatenates a one-hot map, rescaled).
    """

    def __init__(self, num_classes: int, one_hot: bool = False, ignore_out_of_range: bool = False) -> None:
        self.num_classes = num_classes  # including background (class 0)
        self.one_hot = one_hot
        self.ignore_out_of_range = ignore_out_of_range  # map ids >= num_classes to 0 instead of failing

    def __call__(self, sample: dict) -> dict:
        if "segmap" not in sample:
            raise KeyError("SemanticMap needs 'segmap': add it to data.keys")
        seg = sample["segmap"].long()
        top = int(seg.max())
        if top >= self.num_classes:
            if not self.ignore_out_of_range:
                raise ValueError(f"segmap has class id {top} but num_classes={self.num_classes}")
            seg = torch.where(seg < self.num_classes, seg, torch.zeros_like(seg))
        sample["segmap"] = seg
        if self.one_hot:
            sample["segmap_onehot"] = (
                torch.nn.functional.one_hot(seg, self.num_classes).permute(2, 0, 1).float()
            )
        return sample
