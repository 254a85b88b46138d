"""Whole evaluations, each returning one JSON-able record: generated images vs a reference set (FID, KID,
CLIP score), an autoencoder's reconstructions (PSNR, SSIM, LPIPS, rFID), a super-resolution model against
the bicubic baseline."""

from __future__ import annotations

import os
import platform
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm.evaluate import scores
from ldm.evaluate.features import extract, identity_of
from ldm.evaluate.sources import (
    ImageSet,
    cache_file,
    load_cached,
    read_images,
    save_cached,
    set_identity,
)

DEFAULT_CACHE = os.environ.get("LDM_EVAL_CACHE", os.path.join("~", ".cache", "ldm", "evaluate"))


def environment() -> dict[str, Any]:
    """Machine facts recorded with every result (numbers depend on them)."""
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def reference_features(
    reference: str | os.PathLike | ImageSet,
    extractor: nn.Module,
    size: int,
    limit: int | None = None,
    cache_dir: str | os.PathLike | None = DEFAULT_CACHE,
    batch_size: int = 64,
    device: str = "cpu",
) -> tuple[Tensor, dict[str, Any]]:
    """Features (N, D) of the reference set at `size` px, from the cache when it holds them.

    The cache file is named by (the set's files with their sizes and mtimes, `size`, `limit`, the
    extractor's identity); a hit reads no image.
    Returns (features, {"cached": bool, "cache_file": str | None, "n": N})."""
    ident = identity_of(extractor)
    if isinstance(reference, ImageSet):
        path = cache_file(cache_dir, reference.identity, ident) if cache_dir and reference.identity else None
    else:
        path = cache_file(cache_dir, set_identity(reference, size, limit), ident) if cache_dir else None
    cached = load_cached(path) if path is not None else None
    if cached is not None:
        return cached, {"cached": True, "cache_file": str(path), "n": len(cached)}
    images = reference if isinstance(reference, ImageSet) else read_images(reference, size, limit)
    feats = extract(extractor, images.images, batch_size, device)
    if path is not None:
        save_cached(path, feats, images, ident)
    return feats, {"cached": False, "cache_file": str(path) if path else None, "n": len(feats)}


def evaluate_generated(
    generated: ImageSet,
    reference: str | os.PathLike | ImageSet | None = None,
    extractor: nn.Module | None = None,
    clip_model: str | os.PathLike | tuple | None = None,
    reference_limit: int | None = None,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    cache_dir: str | os.PathLike | None = DEFAULT_CACHE,
    batch_size: int = 64,
    device: str = "cpu",
) -> dict[str, Any]:
    """FID and KID of `generated` against `reference` (with `extractor`), CLIP score with `clip_model`.

    Each metric runs only when its inputs are given. Returns the record: {"metrics": {...}, "generated":
    {...}, "reference": {...}, "features": identity, "seconds": ...}."""
    start = time.perf_counter()
    record: dict[str, Any] = {
        "kind": "generation",
        "generated": {"source": generated.source, "n": len(generated), "size": generated.size},
        "metrics": {},
    }
    if reference is not None and extractor is not None:
        real, info = reference_features(
            reference, extractor, generated.size, reference_limit, cache_dir, batch_size, device
        )
        fake = extract(extractor, generated.images, batch_size, device)
        source = reference.source if isinstance(reference, ImageSet) else str(reference)
        record["reference"] = {"source": source, "size": generated.size, **info}
        record["features"] = identity_of(extractor)
        record["metrics"]["fid"] = scores.fid(real, fake)
        mean, std = scores.kid(real, fake, kid_subsets, kid_subset_size)
        record["metrics"]["kid"], record["metrics"]["kid_std"] = mean, std
    if clip_model is not None:
        clip = scores.clip_score(generated.images, generated.prompts, clip_model)
        record["metrics"]["clip_score"] = clip["clip_score"]
        record["clip_model"] = str(clip_model) if not isinstance(clip_model, tuple) else "given"
    record["seconds"] = round(time.perf_counter() - start, 3)
    return record


# --- autoencoders -------------------------------------------------------------------------------------
def to_float(images: Tensor) -> Tensor:
    """uint8 (N, 3, H, W) -> float32 in [-1, 1]."""
    return images.float() / 127.5 - 1.0


def to_uint8(images: Tensor) -> Tensor:
    """float in [-1, 1] -> uint8, rounded as the PNGs the project writes (ldm.training.images.to_uint8)."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


@torch.no_grad()
def reconstruct(autoencoder: nn.Module, images: Tensor, batch_size: int = 16, device: str = "cpu") -> Tensor:
    """Posterior-mode (KL) or quantised (VQ) reconstructions, uint8 like `images` (N, 3, H, W)."""
    from ldm.models.autoencoder import AutoencoderKL

    autoencoder = autoencoder.to(device).eval()
    out = []
    for batch in images.split(batch_size):
        x = to_float(batch).to(device)
        if isinstance(autoencoder, AutoencoderKL):
            dec = autoencoder(x, sample_posterior=False)[0]
        else:
            dec = autoencoder(x)[0]
        out.append(to_uint8(dec))
    return torch.cat(out)


def compare(
    originals: Tensor,
    outputs: Tensor,
    lpips: nn.Module | None = None,
    extractor: nn.Module | None = None,
    batch_size: int = 64,
    device: str = "cpu",
) -> dict[str, float]:
    """PSNR, SSIM (, LPIPS) of `outputs` against `originals`, and rFID (FID of the two sets) when an
    extractor is given: the LDM paper's stage-1 table (rFID, PSNR, SSIM; Rombach et al. 2022, Tab. 8)."""
    metrics = scores.reconstruction_scores(originals, outputs, lpips)
    if extractor is not None:
        real = extract(extractor, originals, batch_size, device)
        metrics["rfid"] = scores.fid(real, extract(extractor, outputs, batch_size, device))
    return metrics


def evaluate_autoencoder(
    checkpoint: str | os.PathLike,
    reference: ImageSet,
    lpips: nn.Module | None = None,
    extractor: nn.Module | None = None,
    batch_size: int = 16,
    device: str = "cpu",
) -> dict[str, Any]:
    """Reconstruct `reference` with the stage-1 `checkpoint` (model.safetensors or .ckpt) and compare."""
    from ldm.models.first_stage import load_autoencoder

    start = time.perf_counter()
    autoencoder, _ = load_autoencoder(checkpoint)
    recon = reconstruct(autoencoder, reference.images, batch_size, device)
    return {
        "kind": "autoencoder",
        "checkpoint": str(checkpoint),
        "reference": {"source": reference.source, "n": len(reference), "size": reference.size},
        "features": identity_of(extractor) if extractor is not None else None,
        "metrics": compare(reference.images, recon, lpips, extractor, device=device),
        "seconds": round(time.perf_counter() - start, 3),
    }


# --- super-resolution ---------------------------------------------------------------------------------
def downsample(images: Tensor, factor: int) -> Tensor:
    """uint8 (N, 3, H, W) -> uint8 (N, 3, H/f, W/f), bicubic with antialiasing (the SR task's input)."""
    x = F.interpolate(to_float(images), scale_factor=1 / factor, mode="bicubic", antialias=True)
    return to_uint8(x)


def bicubic_upscale(lowres: Tensor, size: int) -> Tensor:
    """The baseline every SR model is compared with: bicubic upscaling of uint8 images to size x size."""
    return to_uint8(F.interpolate(to_float(lowres), size=(size, size), mode="bicubic", align_corners=False))


def evaluate_superres(
    checkpoint: str | os.PathLike,
    reference: ImageSet,
    factor: int = 4,
    lpips: nn.Module | None = None,
    extractor: nn.Module | None = None,
    seed: int = 0,
    device: str = "auto",
    **run_options: Any,
) -> dict[str, Any]:
    """SR vs bicubic: each reference image is downsampled by `factor`, upscaled by the SR `checkpoint`
    (`Pipeline.superres`, seed + i) and by bicubic interpolation; both are compared with the original."""
    from PIL import Image

    from ldm.evaluate.sources import fit
    from ldm.pipeline import Pipeline

    start = time.perf_counter()
    pipe = Pipeline.from_file(checkpoint, device=device)
    lowres = downsample(reference.images, factor)
    outputs = []
    for i, low in enumerate(lowres):
        image = Image.fromarray(low.permute(1, 2, 0).numpy())
        out = pipe.superres(image, n=1, seed=seed + i, **run_options)
        outputs.append(fit(out.images[0], reference.size))
    sr = torch.stack(outputs)
    bicubic = bicubic_upscale(lowres, reference.size)
    return {
        "kind": "superres",
        "checkpoint": str(checkpoint),
        "factor": factor,
        "reference": {"source": reference.source, "n": len(reference), "size": reference.size},
        "features": identity_of(extractor) if extractor is not None else None,
        "metrics": compare(reference.images, sr, lpips, extractor),
        "bicubic": compare(reference.images, bicubic, lpips, extractor),
        "seconds": round(time.perf_counter() - start, 3),
    }
