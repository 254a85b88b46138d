"""The latent diffusion model as one plain `nn.Module` (Rombach et al. 2022), shared by training and sampling.

    pixels (B,3,H,W) in [-1,1] --first_stage--> scaled latents z (B,C,H/f,W/f)
    batch / user inputs --conditioner--> {context (B,L,D), concat (B,C',h,w), y (B,) | (B,D)}
    net(z_t, t, context, concat, y) = UNet(cat[z_t, concat], t, context, y) -> eps | v | x0

`residual_over="lowres"` (super-resolution, as SR3/SRDiff/ResShift): the diffusion runs on z - z_up, where
z_up encodes the bicubic upscale of the low-res input, and sampling adds z_up back; the latent scale is then
fitted to that residual.

Training (`ldm.training.diffusion_module.LatentDiffusionModule`) wraps this object with the optimizer, EMA and
logging; `sample.py`, `ldm.pipeline.Pipeline` and the checkpoint loaders use it directly, so sampling never
imports Lightning. State-dict names: `unet.*`, `conditioner.*`, `first_stage.autoencoder.*`,
`first_stage.scale_factor`, `loss.*` (the CompVis layout is produced by `export_state_dict`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm.conditioning.base import as_image_batch, get_input
from ldm.conditioning.conditioner import Conditioner
from ldm.diffusion.loss import DiffusionLoss
from ldm.diffusion.schedules import NoiseSchedule
from ldm.errors import UserError
from ldm.models.first_stage import LatentCodec
from ldm.samplers.generate import generate_latents
from ldm.samplers.sigmas import StepSchedule

LATENT_KEYS = ("latent_mean", "latent_logvar")
RESIDUAL_BASES = (None, "lowres")  # what `residual_over` may name
# CompVis names of an export (and of original checkpoints) <- our names
EXPORT_PREFIXES = (
    ("unet.", "model.diffusion_model."),
    ("first_stage.autoencoder.", "first_stage_model."),
)


def default_spacing(alphas_cumprod: Tensor) -> str:
    """Lin et al. 2024: a zero-terminal-SNR schedule starts sampling at its pure-noise step (trailing); others
    keep CompVis' leading spacing. Read off the loaded alphas_cumprod, never a config flag."""
    return "trailing" if float(alphas_cumprod[-1]) < 1e-6 else "leading"


class LatentDiffusion(nn.Module):
    """First stage + conditioner + UNet + noise schedule/parameterisation; encode, denoise, sample, decode."""

    def __init__(
        self,
        unet: nn.Module,  # UNetModel: x (B, C_latent + C_concat, h, w), t (B,) -> (B, C_latent, h, w)
        conditioner: Conditioner,  # batch / user inputs -> {context, concat, y} and their null values
        first_stage: LatentCodec,  # frozen autoencoder with the latent scale (the one place it lives)
        loss: DiffusionLoss,  # noise schedule, parameterisation (eps | v | x0) and the training objective
        sample_posterior: bool = True,  # KL first stage in training: a posterior draw (CompVis) or its mean
        unet_key: str = "model.unet",  # how the user's config names the UNet's options, for messages
        residual_over: str | None = None,  # "lowres": diffuse z - E(bicubic upscale of batch["lowres"])
    ) -> None:
        super().__init__()
        if residual_over not in RESIDUAL_BASES:
            raise UserError(
                f"model.residual_over={residual_over!r} is not one of {list(RESIDUAL_BASES)}: null diffuses "
                "the latents themselves, lowres their residual over the bicubic upscale of the low-res input."
            )
        self.residual_over = residual_over
        self.unet = unet
        self.conditioner = conditioner
        self.first_stage = first_stage
        self.loss = loss
        self.sample_posterior = bool(sample_posterior)
        unet_cfg = getattr(unet, "config", None) or {}
        conditioner.check_unet(
            context_dim=getattr(unet, "context_dim", unet_cfg.get("context_dim")),
            in_channels=getattr(unet, "in_channels", unet_cfg.get("in_channels")),
            latent_channels=first_stage.latent_channels,
            num_classes=getattr(unet, "num_classes", unet_cfg.get("num_classes")),
            where=unet_key,
        )

    # ---- what the pieces say about the model ------------------------------------------------------

    @property
    def schedule(self) -> NoiseSchedule:
        return self.loss.schedule

    @property
    def parameterization(self) -> str:
        return str(self.loss.parameterization)

    @property
    def default_spacing(self) -> str:
        """The step spacing `spacing=auto` means for this model (see `default_spacing`)."""
        return default_spacing(self.schedule.alphas_cumprod)

    @property
    def input_keys(self) -> tuple[str, ...]:
        """Conditioning inputs the model reads (caption, masked_image + mask, lowres, segmap, label)."""
        return tuple(self.conditioner.input_keys)

    # ---- the network as the loss and samplers call it ---------------------------------------------

    def net(self, x: Tensor, t: Tensor, context: Tensor | None = None, concat: Tensor | None = None, y=None):
        """UNet(x_t ++ concat, t, context, y): concat conditions join the latent along channels."""
        if concat is not None:
            x = torch.cat([x, concat.to(x.dtype)], dim=1)  # (B, C_latent + C_concat, h, w)
        return self.unet(x, t, context=context, y=y)

    def encode_fn(self, pixels: Tensor) -> Tensor:
        """(B,3,H,W) in [-1,1] -> scaled latents (posterior mean): what concat conditioners encode with."""
        return self.first_stage.encode_pixels(pixels, sample=False)

    def decode(self, latents: Tensor) -> Tensor:
        """Scaled latents (B,C,h,w) -> pixels (B,3,h*f,w*f) in [-1,1], clamped."""
        return self.first_stage.decode(latents).clamp(-1, 1)

    def latents(
        self,
        batch: Mapping[str, Any],
        generator: torch.Generator | None = None,
        fit_scale: Callable[[float], float] | None = None,  # e.g. broadcast rank 0's value under DDP
    ) -> Tensor:
        """Scaled latents of a training batch: from cached posterior moments, a cached latent, or `image`.

        An unset scale_factor is fitted once from this batch (1/std, LDM's scale_by_std)."""
        if all(k in batch for k in LATENT_KEYS):
            unscaled = batch["latent_mean"].float()
            if self.sample_posterior:
                noise = torch.randn(unscaled.shape, generator=generator, device=unscaled.device)
                unscaled = unscaled + (0.5 * batch["latent_logvar"].float()).exp() * noise
        elif "latent" in batch:
            unscaled = batch["latent"].float()
        elif "image" in batch:
            unscaled = self.first_stage.encode_unscaled(
                batch["image"], sample=self.sample_posterior, generator=generator
            )
        else:
            raise UserError(f"batch has neither 'image' nor latent keys {LATENT_KEYS}; got {sorted(batch)}")
        base = self.residual_base(batch, tuple(unscaled.shape[-2:]), unscaled.device)
        if base is not None:
            unscaled = unscaled - base.to(unscaled.dtype)
        if not self.first_stage.scale_known:
            value = self.first_stage.fit_scale(unscaled)
            if fit_scale is not None:
                self.first_stage.scale_factor.fill_(fit_scale(value))
        return self.first_stage.scale(unscaled)

    def training_loss(
        self,
        batch: Mapping[str, Any],
        train: bool,
        generator: torch.Generator,
        fit_scale: Callable[[float], float] | None = None,
    ) -> tuple[Tensor, dict]:
        """The diffusion loss of a batch (condition dropout only when `train`); returns (loss, logs).

        A `loss_weight` batch entry (B,) scales each sample's loss (DreamBooth's prior preservation)."""
        z = self.latents(batch, generator, fit_scale)
        cond = self.conditioner(
            batch, train=train, generator=generator, encode_fn=self.encode_fn, latent_size=tuple(z.shape[-2:])
        )
        weight = batch.get("loss_weight")
        if weight is not None and not isinstance(weight, Tensor):
            weight = torch.as_tensor(weight, dtype=torch.float32)
        return self.loss(self.net, z, cond, generator=generator, sample_weight=weight)

    # ---- sampling ---------------------------------------------------------------------------------

    @torch.no_grad()
    def sample(
        self,
        inputs: Mapping[str, Any],
        seeds: list[int],
        cfg_scale: float,
        sampler: Callable[..., Tensor],
        steps: StepSchedule,
        latent_size: tuple[int, int] | None = None,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """Images (B,3,H,W) in [-1,1] for raw conditioning inputs (prompts, labels, masked images...)."""
        device = device or next(self.unet.parameters()).device
        latent_hw = latent_size or self.latent_size(inputs)
        cond, uncond = self.conditioner.encode_with_null(
            inputs, batch_size=len(seeds), device=device, encode_fn=self.encode_fn, latent_size=latent_hw
        )
        z = generate_latents(
            self.net,
            self.schedule.alphas_cumprod,
            sampler=sampler,
            steps=steps,
            shape=(self.first_stage.latent_channels, *latent_hw),
            seeds=seeds,
            cond=cond,
            uncond=uncond if cfg_scale != 1.0 else None,
            cfg_scale=cfg_scale,
            parameterization=self.parameterization,
            device=device,
        )
        return self.decode(self.add_residual_base(z, inputs))

    def add_residual_base(self, z: Tensor, inputs: Mapping[str, Any]) -> Tensor:
        """Sampled scaled latents (B, C, h, w) -> the output's latents: + the scaled residual base
        (`residual_over`), broadcast over B; z itself for a model that diffuses plain latents."""
        base = self.residual_base(inputs, tuple(z.shape[-2:]), z.device)
        if base is None:
            return z
        return z + self.first_stage.scale(base.expand(z.shape[0], -1, -1, -1).to(z.dtype))

    def residual_base(
        self, batch: Mapping[str, Any], latent_hw: tuple[int, int], device: torch.device | str
    ) -> Tensor | None:
        """Unscaled latents (B, C, h, w) of the bicubic upscale of `batch["lowres"]` (B, 3, h', w') in [-1, 1]
        to the output's (h*f, w*f) pixels: what `residual_over="lowres"` subtracts in training and adds back
        after sampling. None when the model diffuses plain latents."""
        if self.residual_over is None:
            return None
        lowres = as_image_batch(get_input(batch, self.residual_over, self), self.residual_over).to(device)
        f = self.first_stage.downsample_factor
        size = (int(latent_hw[0]) * f, int(latent_hw[1]) * f)
        upscaled = F.interpolate(lowres, size=size, mode="bicubic", align_corners=False).clamp(-1, 1)
        return self.first_stage.encode_unscaled(upscaled, sample=False)

    def latent_size(self, batch: Mapping[str, Any]) -> tuple[int, int]:
        """(h, w) of the latents a batch of conditioning inputs asks for."""
        f = self.first_stage.downsample_factor
        for key in ("image", "masked_image", "segmap"):
            if key in batch and hasattr(batch[key], "shape"):
                return batch[key].shape[-2] // f, batch[key].shape[-1] // f
        for key in ("latent_mean", "latent"):  # cached KL moments, or a cached (VQ) latent
            if key in batch:
                return tuple(batch[key].shape[-2:])
        if "lowres" in batch:  # SuperResConditioner.upscale = latent side / low-res side
            up = self.superres_upscale()
            return round(batch["lowres"].shape[-2] * up), round(batch["lowres"].shape[-1] * up)
        raise UserError(f"cannot tell the latent size from a batch with keys {sorted(batch)}")

    def superres_upscale(self) -> float:
        """Latent side / low-res side of a super-resolution conditioner (1.0 when there is none)."""
        for c in self.conditioner.conditioners.values():
            if hasattr(c, "upscale"):
                return float(c.upscale)
        return 1.0

    # ---- files ------------------------------------------------------------------------------------

    def export_state_dict(self, state: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        """CompVis layout: model.diffusion_model.*, first_stage_model.*, scale_factor; conditioner.* and
        loss.* keep our names. `state` (e.g. with EMA weights in place) defaults to this model's."""
        out: dict[str, Tensor] = {}
        for key, value in (state if state is not None else self.state_dict()).items():
            for ours, theirs in EXPORT_PREFIXES:
                if key.startswith(ours):
                    out[theirs + key[len(ours) :]] = value
                    break
            else:
                if key == "first_stage.scale_factor":
                    out["scale_factor"] = value
                elif key.startswith(("loss.", "conditioner.")):
                    out[key] = value
        return out
