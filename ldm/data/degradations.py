"""Super-resolution inputs: a task transform adding "lowres" (3, H/s, W/s) in [-1, 1]."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ldm.data.images import decode_image
from ldm.data.transforms import sample_rng, to_pil, to_tensor
from ldm.errors import UserError


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of a (C, H, W) tensor with reflect padding (kernel radius 3 sigma)."""
    radius = max(1, int(np.ceil(3 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[0]
    y = F.pad(x[None], (radius, radius, radius, radius), mode="reflect")
    y = F.conv2d(y, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    y = F.conv2d(y, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return y[0]


def _range(value: float | Sequence[float] | None) -> tuple[float, float]:
    if value is None:
        return 0.0, 0.0
    if isinstance(value, (int, float)):
        return float(value), float(value)
    lo, hi = value
    return float(lo), float(hi)


class SuperResolution:
    """Degrade "image" into "lowres": blur -> bicubic down by `scale` -> Gaussian noise -> JPEG.

    The LDM super-resolution model (Rombach et al. 2022, Sec. 4.4) is trained on bicubic x4
    downsampling; the blur/noise/JPEG options give a lighter version of the BSR degradations
    (Zhang et al. 2021) for models meant to face real low-quality inputs. Each range is sampled
    uniformly per sample; 0 or null switches that step off.
    """

    def __init__(
        self,
        scale: int = 4,  # x4 or x8 in the paper
        blur_sigma: float | Sequence[float] | None = None,  # in low-res pixels, e.g. [0.2, 1.5]
        noise_std: float | Sequence[float] | None = None,  # in [-1, 1] image units, e.g. [0, 0.05]
        jpeg_quality: Sequence[int] | None = None,  # e.g. [30, 95]; null = no JPEG round trip
    ) -> None:
        if int(scale) < 1:
            raise UserError(f"SuperResolution: scale={scale} must be >= 1")
        self.scale = int(scale)
        self.blur_sigma, self.noise_std = _range(blur_sigma), _range(noise_std)
        self.jpeg_quality = None if jpeg_quality is None else (int(jpeg_quality[0]), int(jpeg_quality[-1]))

    def degrade(self, image: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """(3, H, W) in [-1, 1] -> (3, H/scale, W/scale) in [-1, 1]."""
        _, h, w = image.shape
        if h % self.scale or w % self.scale:
            raise UserError(
                f"SuperResolution: image {h}x{w} is not divisible by scale={self.scale}; "
                "change data.resolution"
            )
        x = image.float()
        sigma = rng.uniform(*self.blur_sigma) * self.scale  # sigma given in low-res pixels
        if sigma > 0:
            x = gaussian_blur(x, sigma)
        x = F.interpolate(x[None], size=(h // self.scale, w // self.scale), mode="bicubic", antialias=True)[0]
        std = rng.uniform(*self.noise_std)
        if std > 0:
            x = x + std * torch.from_numpy(rng.standard_normal(x.shape, dtype=np.float32))
        x = x.clamp(-1.0, 1.0)
        if self.jpeg_quality is not None:
            buf = io.BytesIO()
            to_pil(x).save(
                buf, format="JPEG", quality=int(rng.integers(self.jpeg_quality[0], self.jpeg_quality[1] + 1))
            )
            x = to_tensor(decode_image(buf.getvalue(), "the JPEG degradation", min_side=1))
        return x

    def __call__(self, sample: dict) -> dict:
        if "image" not in sample:
            raise UserError(
                "SuperResolution needs 'image' in data.keys (and image shards, not cached latents)"
            )
        sample["lowres"] = self.degrade(sample["image"], sample_rng(sample))
        return sample
