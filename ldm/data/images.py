"""The one image decoder: training shards, the shard writer, the latent cache and sample.py inputs.

Every image the project reads goes through `open_image` (bytes or a path -> an upright PIL image in
its own mode), then one of:

- `decode_image` / `to_rgb`: an RGB image (uint8) for the autoencoder.
- `decode_mask`: an inpainting mask, float32 (H, W) in {0, 1}, 1 = regenerate.
- `decode_segmap`: a segmentation map of class ids, int64 (H, W), never colour-converted.

The rules, the same everywhere:

- **Orientation**: the EXIF orientation tag is applied (`PIL.ImageOps.exif_transpose`), so a portrait
  photo taken sideways is read upright; sizes (and `--resize`, crops) are those of the upright image.
- **Transparency** (RGBA, LA, PA, palette or grey/RGB PNGs with a transparent colour): composited onto
  opaque **white** (`ALPHA_BACKGROUND`), the usual choice for product shots and logos; the colour hidden
  under transparent pixels is never used.
- **Other modes**: 16-bit grey (`I;16`, `I`) is scaled from 0..65535 to 0..255 (not clipped); CMYK,
  1-bit, grey and palette images become RGB with Pillow's conversion.
- **Size**: an image whose (upright) shorter side is below `MIN_IMAGE_SIDE` (8 px) is refused: a
  1x1 or 4x4 picture holds nothing to learn or to encode (the autoencoder downsamples by 4 to 16).
  The data pipeline skips and counts such a sample; sample.py stops with a UserError.

Errors are `ImageDecodeError`s whose message starts with the `name` the caller gave (a file, or a
sample of a shard); callers turn them into a skipped sample or a UserError.
"""

from __future__ import annotations

import io
import logging
import os
from typing import NamedTuple

import numpy as np
from PIL import ExifTags, Image, ImageOps

log = logging.getLogger(__name__)

MIN_IMAGE_SIDE = 8  # px: a smaller (upright) side is refused everywhere
ALPHA_BACKGROUND = (255, 255, 255)  # transparent pixels are composited onto white
MASK_THRESHOLD = 128  # mask pixels >= this (0..255) are regenerated; softer masks are thresholded (warned)
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # 0..65535 grey values
ID_MODES = ("L", "P", "1", *SIXTEEN_BIT_MODES)  # single-channel maps whose values are class ids


class ImageDecodeError(ValueError):
    """An image that cannot be used (unreadable, too small, wrong kind); the message names it."""

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason or message  # the cause alone, without the image's name


class OpenedImage(NamedTuple):
    """An upright image in its own mode, its upright size before any JPEG draft, and its file format."""

    image: Image.Image
    size: tuple[int, int]  # (width, height) at full resolution, after the EXIF orientation
    format: str | None  # "JPEG", "PNG", ... as Pillow detected it


def _label(source: bytes | str | os.PathLike, name: str | None) -> str:
    if name:
        return name
    return "image bytes" if isinstance(source, (bytes, bytearray, memoryview)) else str(source)


def open_image(
    source: bytes | str | os.PathLike,
    name: str | None = None,
    *,
    draft: int | None = None,
    min_side: int = MIN_IMAGE_SIDE,
) -> OpenedImage:
    """Decode `source` fully and turn it upright (EXIF orientation); refuse it below `min_side` px.

    `draft`: a JPEG is decoded at the smallest 1/2..1/8 DCT scale whose sides are still >= draft px
    (far cheaper for big photos); `OpenedImage.size` stays the full-resolution size.
    """
    label = _label(source, name)
    try:
        fp = io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else source
        img = Image.open(fp)
        fmt, (width, height) = img.format, img.size
        if min(width, height) >= min_side:  # (a refused image is not decoded at all)
            if draft is not None and fmt == "JPEG":
                img.draft(img.mode, (draft, draft))
            img.load()  # decode now: a truncated file fails here, not later
            orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
            if orientation in (5, 6, 7, 8):  # transposed or rotated by 90 degrees: sides swap
                width, height = height, width
            if orientation in range(2, 9):
                img = ImageOps.exif_transpose(img)
    except Exception as e:  # noqa: BLE001 - whatever Pillow raises, the file is unreadable
        reason = f"{type(e).__name__}: {e}"
        raise ImageDecodeError(f"{label} is not a readable image ({reason})", reason) from None
    if min(width, height) < min_side:
        img.close()
        raise ImageDecodeError(
            f"{label} is {width}x{height} px; images need at least {min_side} px per side "
            "(use a larger image or drop this one)"
        )
    return OpenedImage(img, (width, height), fmt)


def _sixteen_bit_to_l(img: Image.Image) -> Image.Image:
    """16-bit grey (0..65535) -> 8-bit L, scaled (Pillow's own conversion clips everything above 255)."""
    values = np.asarray(img).astype(np.float64)
    return Image.fromarray(np.clip(np.rint(values * (255 / 65535)), 0, 255).astype(np.uint8), "L")


def _has_alpha(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        img.mode in ("P", "L", "RGB") and "transparency" in img.info
    )


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB: transparency composited onto `ALPHA_BACKGROUND`, 16-bit grey scaled."""
    if img.mode in SIXTEEN_BIT_MODES:
        img = _sixteen_bit_to_l(img)
    if _has_alpha(img):
        rgba = img.convert("RGBA")
        if rgba.getchannel("A").getextrema()[0] < 255:  # something is see-through
            background = Image.new("RGBA", rgba.size, (*ALPHA_BACKGROUND, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return rgba.convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def decode_image(
    source: bytes | str | os.PathLike, name: str | None = None, *, min_side: int = MIN_IMAGE_SIDE
) -> Image.Image:
    """Bytes or a path -> upright RGB PIL image (uint8), per the rules of this module."""
    return to_rgb(open_image(source, name, min_side=min_side).image)


def _alpha(img: Image.Image) -> np.ndarray | None:
    """The alpha channel as uint8 (H, W), or None when the image has none."""
    if not _has_alpha(img):
        return None
    rgba = img if img.mode == "RGBA" else img.convert("RGBA")
    return np.asarray(rgba.getchannel("A"))


def _gray(img: Image.Image) -> np.ndarray:
    """Luminance as uint8 (H, W), ignoring alpha (16-bit grey scaled to 8 bits)."""
    if img.mode in SIXTEEN_BIT_MODES:
        return np.asarray(_sixteen_bit_to_l(img))
    if img.mode in ("RGBA", "LA", "PA"):
        img = img.convert("RGB" if img.mode == "RGBA" else "L" if img.mode == "LA" else "RGB")
    return np.asarray(img.convert("L"))


def decode_mask(
    source: bytes | str | os.PathLike, name: str | None = None, *, min_side: int = MIN_IMAGE_SIDE
) -> np.ndarray:
    """An inpainting mask -> float32 (H, W) in {0, 1}, 1 = regenerate (white), 0 = keep (black).

    Read from the alpha channel only when alpha varies (a mask painted on a transparent layer: opaque =
    regenerate, transparent = keep); otherwise from the luminance, so an opaque black RGBA/LA mask keeps
    everything. Masks are binary: grey pixels (a soft brush, JPEG edges) are thresholded at
    `MASK_THRESHOLD` (>= 128 regenerates), with one warning giving the share of grey pixels.
    """
    label = _label(source, name)
    img = open_image(source, name, min_side=min_side).image
    alpha = _alpha(img)
    from_alpha = alpha is not None and int(alpha.min()) != int(alpha.max())
    values = alpha if from_alpha else _gray(img)
    grey = float(np.count_nonzero((values > 0) & (values < 255))) / values.size
    if grey > 0:
        log.warning(
            "%s: %.1f %% of the mask's pixels (%s) are grey, neither black nor white; masks are binary, "
            "so pixels >= %d (of 255) are regenerated and the rest kept",
            label,
            100 * grey,
            "alpha" if from_alpha else "luminance",
            MASK_THRESHOLD,
        )
    return (values >= MASK_THRESHOLD).astype(np.float32)


def decode_segmap(
    source: bytes | str | os.PathLike, name: str | None = None, *, min_side: int = MIN_IMAGE_SIDE
) -> np.ndarray:
    """A segmentation map -> int64 (H, W) of class ids: palette indices or grey values, as stored.

    P images give their palette indices (not colours), L/1 their values, 16-bit grey (I;16, I) its
    values unscaled; LA/PA drop alpha. An RGB(A) map is accepted only when it is grey (R = G = B).
    """
    label = _label(source, name)
    img = open_image(source, name, min_side=min_side).image
    if img.mode in ID_MODES:
        return np.asarray(img).astype(np.int64)
    if img.mode in ("LA", "PA"):
        return np.asarray(img.getchannel(0)).astype(np.int64)
    if img.mode in ("RGB", "RGBA"):
        rgb = np.asarray(img)[..., :3]
        if (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all():
            return rgb[..., 0].astype(np.int64)
    raise ImageDecodeError(
        f"{label} is a colour ({img.mode}) image; save the class ids as a grayscale (L) or palette (P) "
        "PNG where each pixel value is its class id"
    )
