"""The frozen stage-1 autoencoder seen from stage 2: loading, and the one place the latent scale lives."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from hydra.utils import instantiate
from torch import Tensor, nn

from ldm.errors import UserError
from ldm.interop.checkpoint import load_state_dict, strip_prefix
from ldm.kinds import stage2_as_first_stage
from ldm.models.autoencoder import SpaceToDepth
from ldm.models.tiling import TileSettings, tiled_decode, tiled_encode

log = logging.getLogger(__name__)
# the newest experiment=autoencoder_kl run
DEMO_AUTOENCODER = "outputs/autoencoder_kl/latest/model.safetensors"


def _autoencoder_config(config: dict | None, path: Path) -> dict:
    """Find the autoencoder's `_target_` config inside a run config (stage 1 or stage 2)."""
    if isinstance((config or {}).get("first_stage_autoencoder"), dict):
        raise UserError(f"{path} {stage2_as_first_stage(config)}")
    model = (config or {}).get("model") or {}
    for candidate in (model.get("autoencoder"), model.get("first_stage"), model):
        if isinstance(candidate, dict) and "ddconfig" in candidate and "_target_" in candidate:
            return candidate
    raise UserError(
        f"{path} carries no autoencoder config (expected model.autoencoder with _target_ and ddconfig in its "
        "metadata or in config.yaml beside it). Export it with train.py, or pass a run folder's "
        "model.safetensors."
    )


def load_autoencoder(path: str | os.PathLike) -> tuple[nn.Module, dict]:
    """Build a frozen autoencoder from `model.safetensors` (+ config) or a stage-1 Lightning `.ckpt`."""
    path = Path(path)
    state, config = load_state_dict(path, what="autoencoder checkpoint (first_stage_ckpt)")
    ae_config = _autoencoder_config(config, path)
    autoencoder = instantiate(ae_config)
    for prefix in ("autoencoder.", "first_stage_model.", ""):
        sub = strip_prefix(state, prefix) if prefix else state
        if sub:
            missing, unexpected = autoencoder.load_state_dict(sub, strict=False)
            if not missing:
                break
    else:  # pragma: no cover - loop always breaks or falls through with `missing`
        missing = []
    if missing:
        raise UserError(
            f"{path} does not match its autoencoder config: {len(missing)} weights missing "
            f"(e.g. {missing[0]}). Was the file written by a different model?"
        )
    autoencoder.eval().requires_grad_(False)
    return autoencoder, ae_config


def weights_identity(module: nn.Module) -> str:
    """A short sha256 of a module's weights: names latent caches by the autoencoder that made them."""
    return state_identity(module.state_dict())


def state_identity(state: Mapping[str, Tensor]) -> str:
    """A short sha256 (16 hex digits) of named tensors (names and float32 values, in name order)."""
    h = hashlib.sha256()
    for name, tensor in sorted(state.items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().float().numpy().tobytes())
    return h.hexdigest()[:16]


class LatentCodec(nn.Module):
    """Pixels <-> scaled latents z = scale_factor * E(x) (LDM §4.3.2; edm2 `Encoder` keeps it in one place).

    `scale_factor=None` means "compute once from data": 1/std of the first batch's latents, then stored as a
    buffer in every checkpoint and export (SD v1's 0.18215 was found this way).

    `tiling` (`ldm.models.tiling.TileSettings`, not saved): large images are encoded/decoded in blended
    tiles; by default only above 4 tiles of 512 pixels (1024 x 1024), so training resolutions never tile.
    """

    def __init__(
        self,
        autoencoder: nn.Module,
        scale_factor: float | None = None,
        autoencoder_config: dict | None = None,
    ) -> None:
        super().__init__()
        self.autoencoder = autoencoder.eval().requires_grad_(False)
        self.autoencoder_config = autoencoder_config  # its `_target_` config: lets exports rebuild it
        value = float("nan") if scale_factor is None else float(scale_factor)
        self.register_buffer("scale_factor", torch.tensor(value, dtype=torch.float32))
        self.tiling = TileSettings()

    def train(self, mode: bool = True) -> LatentCodec:
        """Stay in eval mode: the autoencoder is frozen (no dropout, fixed norms)."""
        return super().train(False)

    @property
    def scale_known(self) -> bool:
        return bool(torch.isfinite(self.scale_factor))

    @property
    def latent_channels(self) -> int:
        return int(self.autoencoder.latent_channels)

    @property
    def downsample_factor(self) -> int:
        return int(self.autoencoder.downsample_factor)

    @property
    def exact(self) -> bool:
        """Is decode(encode(x)) == x (a pixel-space first stage such as SpaceToDepth)?"""
        return bool(getattr(self.autoencoder, "exact", False))

    def _tiles(self, height: int, width: int) -> bool:
        """Tile this image size? Never for an exact (pixel-space) first stage: there is nothing to save."""
        return not self.exact and self.tiling.applies(height, width)

    def _require_scale(self) -> torch.Tensor:
        if not self.scale_known:
            raise RuntimeError("latent scale_factor is not set yet: call fit_scale() on a first batch")
        return self.scale_factor

    @torch.no_grad()
    def fit_scale(self, unscaled: torch.Tensor) -> float:
        """Set scale_factor = 1/std(latents) from a batch of unscaled latents (LDM's scale_by_std)."""
        value = 1.0 / unscaled.float().flatten().std().clamp_min(1e-8)
        self.scale_factor.copy_(value)
        return float(value)

    @torch.no_grad()
    def encode_unscaled(self, pixels: torch.Tensor, sample: bool = True, generator=None) -> torch.Tensor:
        """E(x) before scaling: a posterior sample (KL) or the pre-quantisation latent (VQ)."""
        if self._tiles(*pixels.shape[-2:]):
            return tiled_encode(self.autoencoder, pixels, self.tiling, sample=sample, generator=generator)
        return self.autoencoder.encode_latent(pixels, sample=sample, generator=generator)

    @torch.no_grad()
    def encode_pixels(self, pixels: torch.Tensor, sample: bool = True, generator=None) -> torch.Tensor:
        """(B,3,H,W) in [-1,1] -> scaled latents (B,C,H/f,W/f)."""
        z = self.encode_unscaled(pixels, sample=sample, generator=generator)
        return z * self._require_scale().to(z.dtype)

    def scale(self, unscaled: torch.Tensor) -> torch.Tensor:
        """Scale latents that come from a latent cache (unscaled posterior samples)."""
        return unscaled * self._require_scale().to(unscaled.dtype)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> pixels in [-1,1] (not clamped); tiled when `self.tiling` says so."""
        z = latents / self._require_scale().to(latents.dtype)
        f = self.downsample_factor
        if self._tiles(z.shape[-2] * f, z.shape[-1] * f):
            return tiled_decode(self.autoencoder, z, self.tiling).to(z.dtype)
        return self.autoencoder.decode_latent(z)


def codec_from_checkpoint(path: str | None, scale_factor: float | None = None) -> LatentCodec:
    """Hydra entry: the frozen autoencoder of `first_stage_ckpt` wrapped with its latent scale."""
    if not path:
        default = Path(os.environ.get("LDM_ROOT", ".")) / DEMO_AUTOENCODER
        if not default.is_file():
            raise UserError(
                f"first_stage_ckpt is not set and there is no demo autoencoder at {default}: pass "
                "first_stage_ckpt=<stage-1 model.safetensors or .ckpt>, or train one first with "
                "`python train.py experiment=autoencoder_kl` (what `make demo` does)."
            )
        log.warning("first_stage_ckpt not set: using the demo autoencoder %s", default.resolve())
        path = str(default)
    autoencoder, ae_config = load_autoencoder(path)
    log.info(
        "first stage: %s (f=%d, %d latent channels)",
        path,
        autoencoder.downsample_factor,
        autoencoder.latent_channels,
    )
    return LatentCodec(autoencoder, scale_factor, ae_config)


def codec_from_config(autoencoder: dict | nn.Module, scale_factor: float | None = None) -> LatentCodec:
    """Hydra entry for sampling: an un-initialised autoencoder whose weights come with the stage-2 file.

    Pass the config with `_recursive_: false` to keep it for exports; a module Hydra already built works too.
    """
    if isinstance(autoencoder, nn.Module):
        return LatentCodec(autoencoder, scale_factor)
    from omegaconf import OmegaConf

    config = OmegaConf.to_container(autoencoder) if not isinstance(autoencoder, dict) else dict(autoencoder)
    return LatentCodec(instantiate(config), scale_factor, config)


def space_to_depth_codec(
    factor: int = 4, scale_factor: float | None = None, path: str | None = None
) -> LatentCodec:
    """Hydra entry: the lossless pixel-space first stage (`ldm.models.autoencoder.SpaceToDepth`), no file.

    `path` is the config's `first_stage_ckpt`: a pixel-space model reads none, so one given is refused."""
    if path:
        raise UserError(
            f"first_stage_ckpt={path} was given, but this experiment's first stage is pixel space "
            "(SpaceToDepth: no autoencoder, nothing to load). Drop first_stage_ckpt, or pick an experiment "
            "whose first stage is an autoencoder."
        )
    config = {"_target_": "ldm.models.autoencoder.SpaceToDepth", "factor": int(factor)}
    return LatentCodec(SpaceToDepth(int(factor)), scale_factor, config)
