"""User inputs of sample.py read from disk: images, masks, segmentation maps, prompt files.

Images become float (1, 3, H, W) in [-1, 1]; masks (1, 1, H, W) in {0, 1} with 1 = pixels to generate
(the batch "mask" contract, white in the PNG); segmentation maps int64 (1, H, W) of class ids.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from ldm.errors import UserError

log = logging.getLogger(__name__)


def _open(path: str | os.PathLike | None, option: str, task: str) -> Image.Image:
    """The decoded PIL image at `path`, or a UserError naming the option and the problem."""
    if path in (None, ""):
        raise UserError(f"task={task} needs {option}=<path to a PNG or JPEG>.")
    p = Path(str(path)).expanduser()
    if not p.is_file():
        raise UserError(f"{option}={path}: no such file (relative paths are from {Path.cwd()}).")
    try:
        with Image.open(p) as img:
            img.load()  # decode now: truncated files fail here, not halfway through sampling
            return img.copy()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise UserError(f"{option}={path} is not a readable image ({type(e).__name__}: {e}).") from None


def load_image(path: str | os.PathLike | None, option: str = "image", task: str = "img2img") -> Tensor:
    """RGB image -> (1, 3, H, W) float in [-1, 1] (alpha dropped, grayscale expanded)."""
    img = _open(path, option, task).convert("RGB")
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float()
    return (x / 127.5 - 1.0)[None]


def load_mask(path: str | os.PathLike | None, size: Sequence[int], task: str = "inpaint") -> Tensor:
    """Grayscale mask -> (1, 1, H, W) in {0, 1}, white (>= 128) = generate; resized to `size` (warns)."""
    img = _open(path, "mask", task)
    gray = img.getchannel("A") if img.mode in ("LA", "RGBA") and _alpha_only(img) else img.convert("L")
    mask = torch.from_numpy(np.asarray(gray, dtype=np.uint8).copy()).float()[None, None] / 255.0
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
    return (mask >= 0.5).float()


def _alpha_only(img: Image.Image) -> bool:
    """A mask drawn as transparency on a flat colour: use the alpha channel (transparent = keep)."""
    rgb = np.asarray(img.convert("RGB"))
    return bool((rgb == rgb.reshape(-1, 3)[0]).all())


def load_segmap(path: str | os.PathLike | None, task: str = "semantic") -> Tensor:
    """Segmentation map PNG of class ids (grayscale or palette) -> int64 (1, H, W)."""
    img = _open(path, "segmap", task)
    if img.mode in ("L", "P", "I", "I;16"):
        ids = np.asarray(img).astype(np.int64)
    else:
        rgb = np.asarray(img.convert("RGB")).astype(np.int64)
        if not ((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()):
            raise UserError(
                f"segmap={path} is a colour image ({img.mode}); save the class ids as a grayscale (L) or "
                "palette (P) PNG where each pixel value is its class id."
            )
        ids = rgb[..., 0]
    return torch.from_numpy(ids.copy())[None]


def read_prompts(prompt: Any, prompt_file: str | os.PathLike | None, task: str, required: bool) -> list[str]:
    """`prompt` (a string or a list) or `prompt_file` (one prompt per non-empty line) as a list."""
    if prompt_file not in (None, ""):
        if prompt is not None:
            raise UserError("pass either prompt=... or prompt_file=..., not both.")
        p = Path(str(prompt_file)).expanduser()
        if not p.is_file():
            raise UserError(f"prompt_file={prompt_file}: no such file (one prompt per line).")
        prompts = [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
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
