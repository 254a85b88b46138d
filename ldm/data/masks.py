"""Inpainting and outpainting masks: task transforms adding "mask" (1, H, W) and "masked_image".

Convention (the batch contract): mask = 1 where pixels are to be generated, and
masked_image = image * (1 - mask), so the hidden region reads as 0 (mid-grey in [-1, 1]).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from ldm.data.transforms import sample_rng
from ldm.errors import UserError

WORK_SIDE = 128  # masks are drawn at about this resolution and upscaled (nearest)


def apply_mask(sample: dict, mask: np.ndarray) -> dict:
    """Attach mask (1, H, W) float32 and masked_image = image * (1 - mask) to the sample."""
    if "image" not in sample:
        raise UserError("mask transforms need 'image' in data.keys (and image shards, not cached latents)")
    m = torch.from_numpy(mask.astype(np.float32, copy=False))[None]
    sample["mask"] = m
    sample["masked_image"] = sample["image"] * (1.0 - m)
    return sample


def _coverage(img: Image.Image) -> float:
    return np.count_nonzero(np.asarray(img)) / (img.width * img.height)


def box_mask(h: int, w: int, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """One axis-aligned box covering ~fraction of the image (aspect ratio between 1:2 and 2:1)."""
    area = fraction * h * w
    aspect = math.exp(rng.uniform(math.log(0.5), math.log(2.0)))
    bh = int(np.clip(round(math.sqrt(area * aspect)), 1, h))
    bw = int(np.clip(round(area / bh), 1, w))
    top, left = rng.integers(0, h - bh + 1), rng.integers(0, w - bw + 1)
    mask = np.zeros((h, w), np.float32)
    mask[top : top + bh, left : left + bw] = 1.0
    return mask


class InpaintingMask:
    """Random boxes or free-form brush strokes with coverage in [min_coverage, max_coverage].

    The LDM inpainting model (Rombach et al. 2022, Sec. 4.5) trains on the LaMa mask generator
    (Suvorov et al. 2022): thick irregular strokes and boxes. We grow strokes/boxes one at a time
    towards a uniformly drawn target coverage and never accept one that overshoots max_coverage.
    """

    def __init__(
        self,
        min_coverage: float = 0.1,
        max_coverage: float = 0.5,
        box_prob: float = 0.3,  # share of box masks; the rest are brush strokes
        stroke_width: Sequence[float] = (0.05, 0.15),  # brush width as a fraction of the image side
        max_vertices: int = 6,  # segments per stroke: a short random walk
    ) -> None:
        if not 0.0 <= min_coverage <= max_coverage <= 1.0:
            raise UserError(
                "InpaintingMask: need 0 <= min_coverage <= max_coverage <= 1, "
                f"got {min_coverage}, {max_coverage}"
            )
        self.min_coverage, self.max_coverage = float(min_coverage), float(max_coverage)
        self.box_prob, self.stroke_width, self.max_vertices = (
            float(box_prob),
            tuple(stroke_width),
            int(max_vertices),
        )

    def _stroke(self, draw: ImageDraw.ImageDraw, h: int, w: int, rng: np.random.Generator) -> None:
        side = min(h, w)
        width = max(1, round(rng.uniform(*self.stroke_width) * side))
        x, y = rng.uniform(0, w), rng.uniform(0, h)
        angle = rng.uniform(0, 2 * math.pi)
        points = [(x, y)]
        for _ in range(int(rng.integers(1, self.max_vertices + 1))):
            angle += rng.uniform(-math.pi / 2, math.pi / 2)  # bends, but no sharp reversals
            length = rng.uniform(0.1, 0.35) * side
            x = float(np.clip(x + length * math.cos(angle), 0, w - 1))
            y = float(np.clip(y + length * math.sin(angle), 0, h - 1))
            points.append((x, y))
        draw.line(points, fill=255, width=width, joint="curve")
        r = width / 2
        for px, py in (points[0], points[-1]):  # round caps
            draw.ellipse([px - r, py - r, px + r, py + r], fill=255)

    def _box(
        self, draw: ImageDraw.ImageDraw, h: int, w: int, rng: np.random.Generator, budget: float
    ) -> None:
        m = box_mask(h, w, max(budget, 1.0 / (h * w)), rng)
        ys, xs = np.nonzero(m)
        draw.rectangle([xs.min(), ys.min(), xs.max(), ys.max()], fill=255)

    def make_mask(self, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
        """A float32 (h, w) mask of 0/1 with coverage in [min_coverage, max_coverage]."""
        target = rng.uniform(self.min_coverage, self.max_coverage)
        k = max(
            1, min(h, w) // WORK_SIDE
        )  # draw at <= ~2x WORK_SIDE px, then upscale: cost independent of size
        mask = self._grow(h // k, w // k, target, rng) if k > 1 else None
        if mask is not None:
            mask = np.asarray(Image.fromarray(mask).resize((w, h), Image.Resampling.NEAREST))
        else:
            mask = self._grow(h, w, target, rng)
        cov = np.count_nonzero(mask) / mask.size
        if not self.min_coverage <= cov <= self.max_coverage:  # rare: fall back to one box of the target size
            return box_mask(h, w, target, rng)
        return (mask > 0).astype(np.float32)

    def _grow(self, h: int, w: int, target: float, rng: np.random.Generator) -> np.ndarray:
        """Add strokes/boxes towards `target` coverage; a uint8 (h, w) map of 0/255."""
        boxes = rng.random() < self.box_prob
        img = Image.new("L", (w, h), 0)
        cov = 0.0
        for _ in range(64):  # each try adds one stroke/box, kept only if it does not overshoot
            if cov >= target:
                break
            cand = img.copy()
            draw = ImageDraw.Draw(cand)
            if boxes:
                self._box(draw, h, w, rng, rng.uniform(0.3, 1.0) * (target - cov))
            else:
                self._stroke(draw, h, w, rng)
            new = _coverage(cand)
            if new <= self.max_coverage:
                img, cov = cand, new
        return np.asarray(img)

    def __call__(self, sample: dict) -> dict:
        _, h, w = sample["image"].shape
        return apply_mask(sample, self.make_mask(h, w, sample_rng(sample)))


class OutpaintingMask:
    """Keep a centre box or a band at one side and generate the rest (mask = 1 outside the kept part)."""

    def __init__(
        self,
        min_keep: float = 0.25,  # kept area fraction, drawn uniformly in [min_keep, max_keep]
        max_keep: float = 0.75,
        modes: Sequence[str] = ("center", "left", "right", "top", "bottom"),
    ) -> None:
        if not 0.0 < min_keep <= max_keep <= 1.0:
            raise UserError(
                f"OutpaintingMask: need 0 < min_keep <= max_keep <= 1, got {min_keep}, {max_keep}"
            )
        bad = set(modes) - {"center", "left", "right", "top", "bottom"}
        if bad or not modes:
            raise UserError(f"OutpaintingMask: modes {sorted(bad)} unknown; use center/left/right/top/bottom")
        self.min_keep, self.max_keep, self.modes = float(min_keep), float(max_keep), tuple(modes)

    def make_mask(self, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
        keep = rng.uniform(self.min_keep, self.max_keep)
        mode = self.modes[int(rng.integers(len(self.modes)))]
        mask = np.ones((h, w), np.float32)
        if mode == "center":
            kh, kw = max(1, round(h * math.sqrt(keep))), max(1, round(w * math.sqrt(keep)))
            top, left = (h - kh) // 2, (w - kw) // 2
            mask[top : top + kh, left : left + kw] = 0.0
        elif mode in ("left", "right"):
            kw = max(1, round(w * keep))
            if mode == "left":
                mask[:, :kw] = 0.0
            else:
                mask[:, w - kw :] = 0.0
        else:
            kh = max(1, round(h * keep))
            if mode == "top":
                mask[:kh] = 0.0
            else:
                mask[h - kh :] = 0.0
        return mask

    def __call__(self, sample: dict) -> dict:
        _, h, w = sample["image"].shape
        return apply_mask(sample, self.make_mask(h, w, sample_rng(sample)))
