"""Image grids and PNG writing shared by training callbacks and sample.py."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, PngImagePlugin


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N,C,H,W) or (C,H,W) in [-1,1] -> (N,H,W,C) or (H,W,C) uint8."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    return x.permute(0, 2, 3, 1).numpy() if x.ndim == 4 else x.permute(1, 2, 0).numpy()


def make_grid(images: torch.Tensor, nrow: int | None = None, padding: int = 2) -> torch.Tensor:
    """Tile (N,C,H,W) images in [-1,1] into one (C,H',W') grid in [-1,1] (padding is white)."""
    if images.ndim == 3:
        images = images[None]
    n, c, h, w = images.shape
    if c == 1:
        images = images.expand(-1, 3, -1, -1)
        c = 3
    nrow = nrow or min(n, int(math.ceil(math.sqrt(n))) if n > 8 else n)
    ncol = int(math.ceil(n / nrow))
    grid = images.new_ones(c, ncol * (h + padding) + padding, nrow * (w + padding) + padding)
    for i in range(n):
        r, col = divmod(i, nrow)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[:, top : top + h, left : left + w] = images[i]
    return grid


def save_png(image: torch.Tensor, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write a (C,H,W) tensor in [-1,1] as PNG with optional text metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = PngImagePlugin.PngInfo()
    for key, value in (metadata or {}).items():
        info.add_text(key, str(value))
    Image.fromarray(to_uint8(image)).save(path, pnginfo=info)
    return path


def describe_images(batch: Mapping[str, Any] | None, max_images: int) -> list[dict[str, Any]]:
    """Per image of a preview grid (grid order), the batch's readable conditions: prompt, label, key.

    Strings (captions, sample keys) and integer labels are kept; images, maps and embeddings are not.
    """
    if not batch:
        return []
    fields: dict[str, list] = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            if value.ndim == 1 and not value.is_floating_point():
                fields[key] = value[:max_images].tolist()
        elif isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
            fields[key] = list(value[:max_images])
    n = min((len(v) for v in fields.values()), default=0)
    return [{key: values[i] for key, values in fields.items()} for i in range(n)]
