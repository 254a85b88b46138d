"""First-stage autoencoders, CompVis layout: AutoencoderKL (Rombach et al. 2022), VQModel (Esser et al. 2021).

Both share one interface used by stage 2 and latent caching:
`encode_latent(x, sample=False, generator=None)`, `decode_latent(z)`, `latent_channels`, `downsample_factor`,
and `get_last_layer()` for the adaptive GAN weight. Losses live in `ldm.models.losses`, not in the model, so
the state dict holds only the autoencoder (`encoder.*`, `decoder.*`, `quant_conv.*`, `post_quant_conv.*`,
`quantize.*`), exactly the CompVis `first_stage_model.*` names.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ldm.errors import UserError
from ldm.modules.autoencoder_blocks import Decoder, Encoder
from ldm.modules.distributions import DiagonalGaussianDistribution
from ldm.modules.quantize import VectorQuantizer

DDCONFIG_REQUIRED = (
    "double_z",
    "z_channels",
    "resolution",
    "in_channels",
    "out_ch",
    "ch",
    "ch_mult",
    "num_res_blocks",
    "attn_resolutions",
)
DDCONFIG_OPTIONAL = ("dropout", "resamp_with_conv", "attn_type", "norm_groups")  # norm_groups: ours


def _check_ddconfig(ddconfig: Mapping[str, Any], model: str) -> dict[str, Any]:
    """A plain dict of the CompVis ddconfig, with a clear error for missing or misspelled keys."""
    cfg = dict(ddconfig)
    missing = [k for k in DDCONFIG_REQUIRED if k not in cfg]
    unknown = [k for k in cfg if k not in DDCONFIG_REQUIRED + DDCONFIG_OPTIONAL]
    if missing or unknown:
        raise UserError(
            f"{model} ddconfig: missing keys {missing}, unknown keys {unknown}. Expected the CompVis keys "
            f"{list(DDCONFIG_REQUIRED)} (optional: {list(DDCONFIG_OPTIONAL)})."
        )
    cfg["ch_mult"] = tuple(int(m) for m in cfg["ch_mult"])
    cfg["attn_resolutions"] = [int(r) for r in cfg["attn_resolutions"]]
    if len(cfg["ch_mult"]) == 0:
        raise UserError(
            f"{model} ddconfig.ch_mult is empty; give one multiplier per level, e.g. [1, 2, 4, 4]."
        )
    return cfg


class _FirstStage(nn.Module):
    """Encoder/decoder pair shared by both regularisers."""

    def __init__(self, ddconfig: Mapping[str, Any], model: str) -> None:
        super().__init__()
        self.ddconfig = _check_ddconfig(ddconfig, model)
        self.encoder = Encoder(**self.ddconfig)
        self.decoder = Decoder(**self.ddconfig)

    @property
    def downsample_factor(self) -> int:
        """f: image side / latent side."""
        return 2 ** (len(self.ddconfig["ch_mult"]) - 1)

    def get_last_layer(self) -> Tensor:
        """The decoder's output conv weight, where VQGAN eq. 7 balances GAN and reconstruction gradients."""
        return self.decoder.conv_out.weight


class AutoencoderKL(_FirstStage):
    """KL-regularised autoencoder: x -> q(z|x) = N(mean, var); z has `embed_dim` channels, 1/f resolution."""

    def __init__(self, ddconfig: Mapping[str, Any], embed_dim: int) -> None:
        super().__init__(ddconfig, "AutoencoderKL")
        if not self.ddconfig["double_z"]:
            raise UserError(
                "AutoencoderKL needs ddconfig.double_z=true (the encoder outputs mean and log-variance)."
            )
        z_channels = self.ddconfig["z_channels"]
        self.embed_dim = embed_dim
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * embed_dim, kernel_size=1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, kernel_size=1)

    @property
    def latent_channels(self) -> int:
        return self.embed_dim

    def encode(self, x: Tensor) -> DiagonalGaussianDistribution:
        moments = self.quant_conv(self.encoder(x))  # (B, 2*embed_dim, H/f, W/f)
        return DiagonalGaussianDistribution(moments)

    def decode(self, z: Tensor) -> Tensor:
        return self.decoder(self.post_quant_conv(z))

    def forward(
        self, x: Tensor, sample_posterior: bool = True, generator: torch.Generator | None = None
    ) -> tuple[Tensor, DiagonalGaussianDistribution]:
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    def encode_latent(
        self, x: Tensor, sample: bool = False, generator: torch.Generator | None = None
    ) -> Tensor:
        """Image in [-1, 1] -> unscaled latent: a posterior sample, or its mode (the mean)."""
        posterior = self.encode(x)
        return posterior.sample(generator) if sample else posterior.mode()

    def decode_latent(self, z: Tensor) -> Tensor:
        """Unscaled latent -> image in (about) [-1, 1]."""
        return self.decode(z)


class VQModel(_FirstStage):
    """Vector-quantised autoencoder (VQGAN): x -> h -> nearest of `n_embed` codes -> decoder."""

    def __init__(
        self,
        ddconfig: Mapping[str, Any],
        n_embed: int,  # codebook size
        embed_dim: int,  # code dimension = latent channels
        beta: float = 0.25,  # commitment weight (VQ-VAE eq. 3)
        ema_decay: float | None = None,  # e.g. 0.99: EMA codebook updates instead of the codebook loss
        restart_dead_codes: bool = False,  # move unused codes onto encoder outputs (Jukebox)
        dead_code_threshold: float = 1e-3,  # EMA assignments per step under which a code counts as dead
    ) -> None:
        super().__init__(ddconfig, "VQModel")
        if self.ddconfig["double_z"]:
            raise UserError(
                "VQModel needs ddconfig.double_z=false (the encoder outputs one latent, no variance)."
            )
        z_channels = self.ddconfig["z_channels"]
        self.embed_dim = embed_dim
        self.n_embed = n_embed
        self.quantize = VectorQuantizer(
            n_embed,
            embed_dim,
            beta=beta,
            ema_decay=ema_decay,
            restart_dead_codes=restart_dead_codes,
            dead_code_threshold=dead_code_threshold,
        )
        self.quant_conv = nn.Conv2d(z_channels, embed_dim, kernel_size=1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, kernel_size=1)

    @property
    def latent_channels(self) -> int:
        return self.embed_dim

    def encode_to_prequant(self, x: Tensor) -> Tensor:
        """Image -> continuous latent h after quant_conv, before quantisation (B, embed_dim, H/f, W/f)."""
        return self.quant_conv(self.encoder(x))

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """Image -> (quantised latent, codebook loss, info) as CompVis/taming `VQModel.encode`."""
        return self.quantize(self.encode_to_prequant(x))

    def decode(self, quant: Tensor) -> Tensor:
        return self.decoder(self.post_quant_conv(quant))

    def decode_code(self, indices: Tensor) -> Tensor:
        """Code indices (B, h, w) -> image."""
        return self.decode(self.quantize.lookup(indices))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        quant, qloss, info = self.encode(x)
        return self.decode(quant), qloss, info

    def encode_latent(
        self, x: Tensor, sample: bool = False, generator: torch.Generator | None = None
    ) -> Tensor:
        """The pre-quantisation latent h, as CompVis LDM diffuses it (`sample`/`generator` are ignored)."""
        return self.encode_to_prequant(x)

    def decode_latent(self, z: Tensor) -> Tensor:
        """Quantise a (diffused) latent to its nearest codes, then decode (CompVis VQModelInterface)."""
        quant, _, _ = self.quantize(z)
        return self.decode(quant)


class SpaceToDepth(nn.Module):
    """A parameter-free, lossless "first stage": each f x f pixel block becomes 3*f^2 latent channels.

    x (B, 3, H, W) -> z (B, 3*f*f, H/f, W/f) by `pixel_unshuffle`, and back by `pixel_shuffle`, exactly.
    With it a stage-2 model diffuses in pixel space at latent-sized compute (SR3-style super-resolution whose
    output is not capped by an autoencoder's reconstruction error; see `LatentDiffusion(residual_over=...)`).
    """

    exact = True  # decode(encode(x)) == x: never tiled, nothing to blend

    def __init__(self, factor: int = 4) -> None:
        super().__init__()
        if int(factor) < 1:
            raise UserError(f"SpaceToDepth factor must be a positive integer; got {factor}.")
        self.factor = int(factor)

    @property
    def latent_channels(self) -> int:
        return 3 * self.factor * self.factor

    @property
    def downsample_factor(self) -> int:
        return self.factor

    def encode_latent(
        self, x: Tensor, sample: bool = False, generator: torch.Generator | None = None
    ) -> Tensor:
        """(B, 3, H, W) -> (B, 3*f*f, H/f, W/f); H and W must be multiples of f (`sample` is ignored)."""
        return nn.functional.pixel_unshuffle(x, self.factor)

    def decode_latent(self, z: Tensor) -> Tensor:
        """(B, 3*f*f, h, w) -> (B, 3, h*f, w*f)."""
        return nn.functional.pixel_shuffle(z, self.factor)
