"""Tiled VAE encode and decode: images larger than memory allows, in overlapping tiles blended linearly.

The autoencoder runs on one tile at a time, so its activations (hundreds of channels at full resolution:
the memory that runs out) are bounded by the tile size; only the 3-channel image and the latent are
whole. Neighbouring tiles overlap by `overlap` pixels; each tile's output is weighted by a linear ramp
from its inner edges (1/(o+1), ..., o/(o+1) across an overlap of o samples, 1 elsewhere and on the
image border) and the weighted sum is divided by the summed weights, so there are no seams.

GroupNorm would normalise each tile by its own statistics, which differ from the whole image's (a tile
of sky vs. one of a face): the colour shifts that make seams. So, as the "fast" mode of the multidiffusion
Tiled VAE extension of AUTOMATIC1111 does, one pass over the image downscaled to a single tile records
every GroupNorm's per-group mean and variance, and the tiles are then normalised with those (diffusers'
`enable_vae_tiling` skips this and blends only). What remains different from the untiled result: those
statistics are estimates, convolutions see zero padding at inner tile borders (inside the blended
overlap), and a VAE attention block attends within its tile. The tolerance measured on the test models
is stated in tests/test_tiling.py.

Encoding blends the posterior's moments (mean, log-variance) and samples once afterwards, so the noise
of a sampled latent is not averaged down in the overlaps. No Lightning here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm.errors import UserError
from ldm.modules.distributions import DiagonalGaussianDistribution

MODES = ("auto", "on", "off")


@dataclass
class TileSettings:
    """When and how LatentCodec tiles. Sizes are in pixels (decode tiles are size/f latent cells).

    mode: "auto" tiles images with more than `auto_factor` tiles' worth of pixels (H*W > auto_factor *
    size^2: with 512-pixel tiles, above 1024 x 1024), "on" tiles whatever is larger than one tile,
    "off" never tiles."""

    mode: str = "auto"
    size: int = 512
    overlap: int = 128
    norm: str = "tile"  # GroupNorm statistics: of each "tile", or of the "image" downscaled to a tile
    auto_factor: float = 4.0

    def __post_init__(self) -> None:
        if isinstance(self.mode, bool):  # YAML 1.1 reads a bare on/off as a boolean
            self.mode = "on" if self.mode else "off"
        if self.mode not in MODES:
            raise UserError(f"vae_tiling={self.mode!r}: use auto, on or off.")
        if not isinstance(self.size, int) or isinstance(self.size, bool) or self.size < 16:
            raise UserError(f"vae_tile_size={self.size}: a whole number of pixels >= 16, e.g. 512.")
        if not isinstance(self.overlap, int) or not 0 <= self.overlap <= self.size // 2:
            raise UserError(
                f"vae_tile_overlap={self.overlap}: a whole number of pixels from 0 to half of "
                f"vae_tile_size={self.size}, e.g. {self.size // 4}."
            )
        if self.norm not in ("image", "tile"):
            raise UserError(f"vae_tile_norm={self.norm!r}: use image or tile.")

    def applies(self, height: int, width: int) -> bool:
        """Whether an image of height x width pixels is tiled under these settings."""
        if self.mode == "off" or (height <= self.size and width <= self.size):
            return False
        return self.mode == "on" or height * width > self.auto_factor * self.size**2


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of `tile` covering [0, length), `overlap` apart at least; the last one
    ends at `length` (it may overlap its neighbour more). One tile when it covers everything."""
    if length <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, length - tile, stride))
    return starts + [length - tile]


HALO = 0.25  # share of an overlap, at each tile's inner edge, that gets weight 0 (see `ramp`)


def edge_weights(overlap: int, halo: float = HALO) -> Tensor:
    """(overlap,) weights from a tile's inner edge inwards: 0 over the first d = floor(halo * overlap)
    samples (the tile's own border, where its convolutions saw zero padding instead of the neighbour),
    then (1..n)/(n+1) over the n = overlap - 2d middle samples, then 1. The neighbour's mirror image
    adds up to exactly 1 everywhere in the overlap."""
    d = int(halo * overlap)
    n = overlap - 2 * d
    p = torch.arange(overlap, dtype=torch.float32)
    return ((p - d + 1) / (n + 1)).clamp(0, 1)


def ramp(length: int, overlap_before: int, overlap_after: int, halo: float = HALO) -> Tensor:
    """(length,) weights of one tile along one axis: `edge_weights` over the first `overlap_before` and
    (mirrored) the last `overlap_after` samples, 1 elsewhere (no overlap: all ones)."""
    w = torch.ones(length)
    if overlap_before > 0:
        n = min(overlap_before, length)
        w[:n] = edge_weights(overlap_before, halo)[:n]
    if overlap_after > 0:
        n = min(overlap_after, length)
        w[length - n :] = torch.minimum(w[length - n :], edge_weights(overlap_after, halo)[:n].flip(0))
    return w


def tiled_apply(fn: Callable[[Tensor], Tensor], x: Tensor, tile: int, overlap: int, scale: float) -> Tensor:
    """fn over overlapping tiles of x (B, C, H, W), blended: fn maps (B, C, t, t) to (B, C', t*s, t*s).

    `tile`, `overlap` in units of x; `scale` = output side / input side (8 for an f=8 decoder, 1/8 for
    its encoder); tile * scale and overlap * scale must be whole. Returns (B, C', H*s, W*s) float32."""
    h, w = x.shape[-2:]
    ys, xs = tile_starts(h, tile, overlap), tile_starts(w, tile, overlap)
    out = weight = None
    for i, y0 in enumerate(ys):
        for j, x0 in enumerate(xs):
            th, tw = min(tile, h), min(tile, w)
            part = fn(x[..., y0 : y0 + th, x0 : x0 + tw]).float()
            if out is None:
                out = part.new_zeros(*part.shape[:2], round(h * scale), round(w * scale))
                weight = part.new_zeros(1, 1, *out.shape[-2:])
            oy, ox = round(y0 * scale), round(x0 * scale)
            ph, pw = part.shape[-2:]
            # overlap with the previous / next tile along each axis, in output units
            before_y = round((ys[i - 1] + th - y0) * scale) if i > 0 else 0
            after_y = round((y0 + th - ys[i + 1]) * scale) if i + 1 < len(ys) else 0
            before_x = round((xs[j - 1] + tw - x0) * scale) if j > 0 else 0
            after_x = round((x0 + tw - xs[j + 1]) * scale) if j + 1 < len(xs) else 0
            wy = ramp(ph, before_y, after_y).to(part.device)
            wx = ramp(pw, before_x, after_x).to(part.device)
            m = (wy[:, None] * wx[None, :])[None, None]
            out[..., oy : oy + ph, ox : ox + pw] += part * m
            weight[..., oy : oy + ph, ox : ox + pw] += m
    return out / weight


def _aligned(pixels: int, factor: int) -> int:
    return max(factor, pixels // factor * factor)


def tiled_decode(autoencoder: nn.Module, z: Tensor, settings: TileSettings) -> Tensor:
    """Unscaled latents (B, C, h, w) -> pixels (B, 3, h*f, w*f) via `decode_latent` on latent tiles of
    settings.size/f cells overlapping by settings.overlap/f (VQ: quantising is per cell, so per tile too)."""
    f = int(autoencoder.downsample_factor)
    tile = _aligned(settings.size, f) // f
    overlap = min(settings.overlap // f, tile - 1)
    if settings.norm == "tile":
        return tiled_apply(autoencoder.decode_latent, z, tile, overlap, float(f))
    with GlobalGroupNorm(autoencoder) as norms:
        autoencoder.decode_latent(shrink(z, tile))  # GroupNorm statistics of the whole (downscaled) image
        norms.mode = "use"
        return tiled_apply(autoencoder.decode_latent, z, tile, overlap, float(f))


def tiled_encode(
    autoencoder: nn.Module,
    pixels: Tensor,
    settings: TileSettings,
    sample: bool = False,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Pixels (B, 3, H, W) -> unscaled latents (B, C, H/f, W/f) from tiles of settings.size pixels.

    A KL autoencoder's moments are blended, then the posterior is sampled (or its mode taken) once;
    a VQ model's pre-quantisation latents are blended (`encode_latent`)."""
    f = int(autoencoder.downsample_factor)
    tile = _aligned(settings.size, f)
    overlap = min(settings.overlap // f * f, tile - f)
    vq = sample_is_prequant(autoencoder)

    def run() -> Tensor:
        if vq:  # the deterministic pre-quantisation latent
            return tiled_apply(lambda x: autoencoder.encode_latent(x), pixels, tile, overlap, 1.0 / f)
        # KL: blend the moments (mean, logvar); sampled once below
        return tiled_apply(lambda x: autoencoder.encode(x).parameters, pixels, tile, overlap, 1.0 / f)

    if settings.norm == "tile":
        out = run()
    else:
        with GlobalGroupNorm(autoencoder) as norms:
            small = shrink(pixels, tile)
            autoencoder.encode_latent(small[..., : small.shape[-2] // f * f, : small.shape[-1] // f * f])
            norms.mode = "use"
            out = run()
    if vq:
        return out.to(pixels.dtype)
    posterior = DiagonalGaussianDistribution(out.to(pixels.dtype))
    return posterior.sample(generator) if sample else posterior.mode()


def shrink(x: Tensor, side: int) -> Tensor:
    """x (B, C, H, W) area-downscaled so that its longer side is at most `side` (as it is if it fits)."""
    h, w = x.shape[-2:]
    if max(h, w) <= side:
        return x
    scale = side / max(h, w)
    return F.interpolate(x, size=(max(1, round(h * scale)), max(1, round(w * scale))), mode="area")


def sample_is_prequant(autoencoder: nn.Module) -> bool:
    """Whether `encode_latent` returns a deterministic pre-quantisation latent (VQ models)."""
    return hasattr(autoencoder, "encode_to_prequant")


def largest_activation(module: nn.Module, fn: Callable[[], object]) -> int:
    """Run fn() and return the most elements any submodule of `module` output in one tensor (the
    activation peak that tiling bounds; used to test that it follows the tile, not the image)."""
    peak = [0]

    def hook(_m: nn.Module, _i: object, out: object) -> None:
        if isinstance(out, Tensor):
            peak[0] = max(peak[0], out.numel())

    handles = [m.register_forward_hook(hook) for m in module.modules()]
    try:
        fn()
    finally:
        for h in handles:
            h.remove()
    return peak[0]


class GlobalGroupNorm:
    """Context: every GroupNorm of `module` records its per-(sample, group) mean and variance on one
    call (mode "record"), then normalises with those instead of its input's own statistics ("use").
    Tiled encode/decode record them on the image downscaled to one tile."""

    def __init__(self, module: nn.Module) -> None:
        self.norms = [m for m in module.modules() if isinstance(m, nn.GroupNorm)]
        self.stats: dict[int, tuple[Tensor, Tensor]] = {}
        self.mode = "record"

    def __enter__(self) -> GlobalGroupNorm:
        for m in self.norms:
            m.forward = self._forward(m)  # instance attribute: shadows the class's forward
        return self

    def __exit__(self, *exc: object) -> None:
        for m in self.norms:
            del m.forward

    def _forward(self, m: nn.GroupNorm) -> Callable[[Tensor], Tensor]:
        def forward(x: Tensor) -> Tensor:
            b, c = x.shape[:2]
            xg = x.float().reshape(b, m.num_groups, -1)
            if self.mode == "record":
                self.stats[id(m)] = (xg.mean(-1, keepdim=True), xg.var(-1, unbiased=False, keepdim=True))
            mean, var = self.stats[id(m)]
            y = ((xg - mean) * torch.rsqrt(var + m.eps)).reshape(x.shape)
            if m.affine:
                y = y * m.weight.float().view(1, c, 1, 1) + m.bias.float().view(1, c, 1, 1)
            return y.to(x.dtype)

        return forward
