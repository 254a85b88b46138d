"""DDIM (Song et al. 2021), written on the variance-exploding x = x0 + sigma eps."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ldm.samplers.base import (
    Callback,
    Denoiser,
    Generator,
    after_step,
    ancestral_step,
    call_denoiser,
    randn_like,
    step_range,
)


@torch.no_grad()
def sample_ddim(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: Mapping[str, Any] | None = None,
    callback: Callback | None = None,
    generator: Generator = None,
    disable: bool = False,
    eta: float = 0.0,
) -> Tensor:
    """DDIM (Song et al. 2021, Eq. 12): x_next = D + sigma_down eps + sigma_up z.

    Dividing Eq. 12 by sqrt(a_next) gives this form; eta = 0 is deterministic (and equals Euler on
    the probability-flow ODE), eta = 1 draws the DDPM posterior noise at every step.
    """
    sigmas = sigmas.to(x.device)
    for i in step_range(sigmas, disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = call_denoiser(denoiser, x, sigma, extra_args)
        eps = (x - denoised) / sigma
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        x = denoised + sigma_down * eps
        if sigma_up > 0:
            x = x + sigma_up * randn_like(x, generator)
        x = after_step(callback, x, i, sigma, sigma_next, denoised)
    return x
