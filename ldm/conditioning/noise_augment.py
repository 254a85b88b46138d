"""Noise-augmented low-res conditioning of the SD x4 upscaler (Ho et al. 2022, "Cascaded Diffusion Models").

The upscaler concatenates the low-res image, *noised* to level l of its own DDPM schedule, to the latent, and
tells the UNet l through its class embedding (`num_classes`, the level as label):

    concat = sqrt(abar_l) x_low + sqrt(1 - abar_l) eps      (Ho et al. 2020, Eq. 4; CDM Sec. 3.2)
    y      = l

Augmentation makes the model robust to the artefacts of whatever produced x_low; at sampling time l is a knob
(Stability's scripts: 20; larger values let the model change more). Both conditioners read the optional
batch key `noise_level` (an int, or (B,) ints), else their constructor default, so one input drives both.
The noise eps is the batch key `lowres_noise` (B, 3, h, w) when given (reproducible sampling, parity tests),
else a `torch.randn` draw. Training with random levels (the original draws l ~ U[0, max_noise_level) per
sample) needs a data transform that writes `noise_level`; without one every sample gets the default.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ldm.conditioning.base import BaseConditioner, EncodeFn, as_image_batch, get_input
from ldm.conditioning.spatial import SuperResConditioner
from ldm.diffusion.schedules import NoiseSchedule
from ldm.errors import UserError


def noise_levels(
    batch: Mapping[str, Any], key: str, default: int, n: int, num_timesteps: int, device: torch.device
) -> Tensor:
    """The batch's `key` (int, 0-d or (B,) tensor; absent: `default`) as (n,) int64, checked against T."""
    value = batch.get(key, default)
    if value is None:
        value = default
    levels = torch.as_tensor(value, device=device)
    if levels.is_floating_point() and not bool((levels == levels.round()).all()):
        raise UserError(f"'{key}' must hold integer noise levels, got {value!r}.")
    levels = levels.long().reshape(-1)
    if levels.numel() == 1:
        levels = levels.expand(n)
    if levels.numel() != n:
        raise UserError(f"'{key}' has {levels.numel()} noise levels for a batch of {n}; give one or {n}.")
    if levels.numel() and (int(levels.min()) < 0 or int(levels.max()) >= num_timesteps):
        raise UserError(
            f"'{key}'={value!r} is outside the noise-augmentation schedule's levels 0..{num_timesteps - 1}; "
            "the SD x4 upscaler was trained with 0..350 (max_noise_level) and samples with 20 by default."
        )
    return levels


class NoiseAugmentedLowRes(SuperResConditioner):
    """Low-res image (B, 3, h, w) in [-1, 1] -> its noise-augmented copy at latent size (B, 3, h', w').

    CompVis/Stability `ImageConcatWithNoiseAugmentation` with the given level: q_sample on a `scaled_linear`
    schedule (CompVis' "linear": betas = linspace(sqrt(linear_start), sqrt(linear_end), T)^2).
    """

    def __init__(
        self,
        noise_level: int = 20,  # default level at sampling (Stability's upscaling scripts)
        max_noise_level: int = 350,  # training drew levels in [0, max_noise_level)
        num_timesteps: int = 1000,  # the augmentation schedule's length
        linear_start: float = 1e-4,  # x4-upscaling.yaml low_scale_config.params.noise_schedule_config
        linear_end: float = 2e-2,
        input_key: str = "lowres",
        noise_level_key: str = "noise_level",
        noise_key: str = "lowres_noise",
        mode: str = "bicubic",  # resampling when the low-res image is not at latent size already
        dropout: float = 0.0,
    ) -> None:
        # upscale 1: the x4 upscaler's f=4 latents are the low-res image's size; the null image is zeros
        super().__init__(upscale=1.0, mode=mode, encode=False, input_key=input_key, dropout=dropout)
        self.noise_level_key = noise_level_key
        self.noise_key = noise_key
        self.max_noise_level = int(max_noise_level)
        self.schedule = NoiseSchedule(
            "scaled_linear", int(num_timesteps), float(linear_start), float(linear_end)
        )
        self.noise_level = int(
            noise_levels({}, "noise_level", int(noise_level), 1, int(num_timesteps), "cpu")[0]
        )

    def augment(self, lowres: Tensor, batch: Mapping[str, Any]) -> Tensor:
        """q_sample of the low-res image (already at latent size, (B, 3, h', w')) at the batch's level."""
        n = lowres.shape[0]
        levels = noise_levels(
            batch, self.noise_level_key, self.noise_level, n, self.schedule.num_timesteps, lowres.device
        )
        noise = batch.get(self.noise_key)
        if isinstance(noise, Tensor) and lowres.shape[0] == 1 and noise.shape[0] > 1:
            lowres = lowres.expand(noise.shape[0], -1, -1, -1)  # one shared image, per-image noise
            n = lowres.shape[0]
        if noise is None:
            noise = torch.randn_like(lowres)
        elif not isinstance(noise, Tensor) or tuple(noise.shape) != tuple(lowres.shape):
            got = tuple(noise.shape) if isinstance(noise, Tensor) else type(noise).__name__
            raise UserError(
                f"'{self.noise_key}' has shape {got} but the low-res image at latent size is "
                f"{tuple(lowres.shape)}; give noise of that shape, or leave '{self.noise_key}' out."
            )
        alpha, sigma = self.schedule.alpha_sigma(levels)  # (B,) each
        return alpha.view(-1, 1, 1, 1) * lowres + sigma.view(-1, 1, 1, 1) * noise.to(lowres)

    def extra_repr(self) -> str:
        return (
            f"noise_level={self.noise_level}, max_noise_level={self.max_noise_level}, " + super().extra_repr()
        )


class NoiseLevel(BaseConditioner):
    """The augmentation level as the UNet's class label y (B,), int64 (CompVis `c_adm` of the x4 upscaler).

    Its null value is the same level: the upscaler's unconditional branch keeps the low-res image and level.
    """

    output = "class"

    def __init__(
        self,
        noise_level: int = 20,  # must equal NoiseAugmentedLowRes' default
        num_classes: int = 1000,  # the UNet's label table (unet_config.params.num_classes)
        input_key: str = "lowres",  # read only for the batch size
        noise_level_key: str = "noise_level",
        dropout: float = 0.0,
    ) -> None:
        super().__init__(dropout)
        self.input_keys = (input_key,)
        self.noise_level_key = noise_level_key
        self.num_labels = int(num_classes)
        self.n_classes = self.num_labels - 1  # `Conditioner.num_classes` reports n_classes + 1
        self.noise_level = int(
            noise_levels({}, "noise_level", int(noise_level), 1, self.num_labels, "cpu")[0]
        )

    @property
    def out_dim(self) -> None:
        return None

    def prepare(self, inputs: Mapping[str, Any]) -> dict[str, Any]:
        key = self.input_keys[0]
        return {key: as_image_batch(get_input(inputs, key, self), key)}

    def forward(
        self,
        batch: Mapping[str, Any],
        *,
        encode_fn: EncodeFn | None = None,
        latent_size: tuple[int, int] | None = None,
    ) -> Tensor:
        lowres = get_input(batch, self.input_keys[0], self)
        n = int(lowres.shape[0]) if lowres.ndim == 4 else 1
        return noise_levels(batch, self.noise_level_key, self.noise_level, n, self.num_labels, lowres.device)

    def null(
        self,
        batch: Mapping[str, Any],
        *,
        encode_fn: EncodeFn | None = None,
        latent_size: tuple[int, int] | None = None,
    ) -> Tensor:
        return self.forward(batch, encode_fn=encode_fn, latent_size=latent_size)

    def extra_repr(self) -> str:
        return f"noise_level={self.noise_level}, num_classes={self.num_labels}, " + super().extra_repr()


__all__ = ["NoiseAugmentedLowRes", "NoiseLevel", "noise_levels"]
