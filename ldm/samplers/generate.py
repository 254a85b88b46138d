"""From conditioning to latents: the one sampling loop shared by training previews and sample.py."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ldm.samplers.base import Callback, generators_from_seeds, randn
from ldm.samplers.denoiser import DiscreteDenoiser
from ldm.samplers.guidance import ClassifierFreeGuidance
from ldm.samplers.hooks import inpaint_callback
from ldm.samplers.sigmas import StepSchedule, start_x, truncate_for_strength

NetFn = Callable[..., Tensor]  # net(x_t, t, context=None, concat=None, y=None) -> eps / v / x0


@torch.no_grad()
def generate_latents(
    net: NetFn,
    alphas_cumprod: Tensor,
    *,
    sampler: Callable[..., Tensor],  # a sample_xxx function with its options bound (conf/sampler)
    steps: StepSchedule,
    shape: Sequence[int],  # (C, h, w) of one latent
    seeds: Sequence[int],  # one per image: image k is the same whatever the batch size
    cond: Mapping[str, Any],
    uncond: Mapping[str, Any] | None = None,
    cfg_scale: float = 1.0,
    parameterization: str = "eps",
    init_latents: Tensor | None = None,  # img2img / inpainting: scaled latents of the input image
    strength: float = 1.0,  # img2img: fraction of the schedule re-run from init_latents (SDEdit)
    blend_mask: Tensor | None = None,  # latent-size mask, 1 = generate, 0 = keep init_latents
    callback: Callback | None = None,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> Tensor:
    """Sample scaled latents (B, C, h, w) for B = len(seeds) with guidance, strength and blending."""
    denoiser = DiscreteDenoiser(net, alphas_cumprod.to(device), parameterization=parameterization)
    guided = (
        ClassifierFreeGuidance(denoiser, scale=cfg_scale, uncond=uncond) if uncond is not None else denoiser
    )
    sigmas = steps(alphas_cumprod).to(device)
    generators = generators_from_seeds(seeds, device)
    noise = randn((len(seeds), *shape), generators, device=device)
    if init_latents is not None and strength < 1.0:
        sigmas = truncate_for_strength(sigmas, strength)
        x = start_x(noise, sigmas[0], init_latents)
    else:
        x = start_x(noise, sigmas[0])
    if blend_mask is not None:
        if init_latents is None:
            raise ValueError("blend_mask needs init_latents (the latents of the image to keep)")
        callback = inpaint_callback(init_latents, blend_mask, generators, previous=callback)
    return sampler(
        guided,
        x,
        sigmas,
        extra_args=dict(cond),
        callback=callback,
        generator=generators,
        disable=not progress,
    )
