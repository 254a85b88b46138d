"""User inputs of sample.py read from disk: images, masks, segmentation maps, prompt files.

Images become float (1, 3, H, W) in [-1, 1]; masks (1, 1, H, W) in {0, 1} with 1 = pixels to generate
(the batch "mask" contract, white in the PNG); segmentation maps int64 (1, H, W) of class ids. All are
decoded by `ldm.data.images` exactly as training decodes shards (EXIF orientation applied, transparency
on white, at least 8 px per side) and prompt files by `ldm.data.text` (UTF-8, else cp1252, warned).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ldm.data.images import ImageDecodeError, decode_image, decode_mask, decode_segmap
from ldm.data.text import read_text_file
from ldm.errors import UserError

log = logging.getLogger(__name__)


def _decode(decoder: Callable[..., Any], path: str | os.PathLike | None, option: str, task: str) -> Any:
    """`decoder(path)` from ldm.data.images, or a UserError naming the option and the problem."""
    if path in (None, ""):
        raise UserError(f"task={task} needs {option}=<path to a PNG or JPEG>.")
    p = Path(str(path)).expanduser()
    if not p.is_file():
        raise UserError(f"{option}={path}: no such file (relative paths are from {Path.cwd()}).")
    try:
        return decoder(p, f"{option}={path}")
    except ImageDecodeError as e:
        raise UserError(f"{e}.") from None


def load_image(path: str | os.PathLike | None, option: str = "image", task: str = "img2img") -> Tensor:
    """RGB image -> (1, 3, H, W) float in [-1, 1] (upright, transparency on white, grey expanded)."""
    img = _decode(decode_image, path, option, task)
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float()
    return (x / 127.5 - 1.0)[None]


def load_mask(path: str | os.PathLike | None, size: Sequence[int], task: str = "inpaint") -> Tensor:
    """Mask -> (1, 1, H, W) in {0, 1}, white = generate; resized (nearest) to `size` with a warning.

    Alpha is the mask only when it varies (opaque = generate); otherwise luminance, so an opaque black
    RGBA mask keeps everything. Grey pixels are thresholded at 128 with one warning
    (`ldm.data.images.decode_mask`).
    """
    mask = torch.from_numpy(_decode(decode_mask, path, "mask", task))[None, None]
    h, w = int(size[0]), int(size[1])
    if tuple(mask.shape[-2:]) != (h, w):
        log.warning(
            "mask=%s is %dx%d but the image is %dx%d: resizing the mask (nearest) to the image size",
            path,
            mask.shape[-1],
            mask.shape[-2],
            w,
            h,
        )
        mask = F.interpolate(mask, size=(h, w), mode="nearest")
    return mask


def load_segmap(path: str | os.PathLike | None, task: str = "semantic") -> Tensor:
    """Segmentation map PNG of class ids (grayscale or palette indices) -> int64 (1, H, W)."""
    return torch.from_numpy(_decode(decode_segmap, path, "segmap", task))[None]


def read_prompts(prompt: Any, prompt_file: str | os.PathLike | None, task: str, required: bool) -> list[str]:
    """`prompt` (a string or a list) or `prompt_file` (one prompt per non-empty line) as a list."""
    if prompt_file not in (None, ""):
        if prompt is not None:
            raise UserError("pass either prompt=... or prompt_file=..., not both.")
        p = Path(str(prompt_file)).expanduser()
        if not p.is_file():
            raise UserError(f"prompt_file={prompt_file}: no such file (one prompt per line).")
        prompts = [line.strip() for line in read_text_file(p).splitlines() if line.strip()]
        if not prompts:
            raise UserError(f"prompt_file={prompt_file} holds no prompts (one prompt per non-empty line).")
        return prompts
    if prompt is None:
        if required:
            raise UserError(f'task={task} needs a prompt: pass prompt="..." or prompt_file=<text file>.')
        return [""]
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, Sequence) and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    return [str(prompt)]  # e.g. prompt=42 parsed as a number by Hydra


def snap_size(h: int, w: int, multiple: int, what: str) -> tuple[int, int]:
    """(h, w) rounded down to multiples of `multiple` (the autoencoder's f), with a note when it changes."""
    sh, sw = max(multiple, h - h % multiple), max(multiple, w - w % multiple)
    if (sh, sw) != (h, w):
        log.warning(
            "%s is %dx%d: resized to %dx%d, a multiple of the autoencoder's factor %d",
            what,
            w,
            h,
            sw,
            sh,
            multiple,
        )
    return sh, sw


def resize_image(x: Tensor, size: Sequence[int]) -> Tensor:
    """(B, C, H, W) pixels resized (bicubic, antialiased) to `size`; identity when already that size."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(int(s) for s in size), mode="bicubic", antialias=True).clamp(-1, 1)


def check_size(height: int, width: int, multiple: int) -> tuple[int, int]:
    """height/width options: positive multiples of the autoencoder's factor."""
    for name, value in (("height", height), ("width", width)):
        if int(value) <= 0 or int(value) % multiple:
            raise UserError(
                f"{name}={value}: must be a positive multiple of {multiple} (the autoencoder's downsampling "
                f"factor); e.g. {name}={max(multiple, int(value) - int(value) % multiple)}."
            )
    return int(height), int(width)
