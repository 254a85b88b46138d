"""Euler and Euler-ancestral on the ODE dx/dsigma = (x - D(x; sigma)) / sigma (Karras et al. 2022, Eq. 4)."""

from __future__ import annotations

import math
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
def sample_euler(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: Mapping[str, Any] | None = None,
    callback: Callback | None = None,
    generator: Generator = None,
    disable: bool = False,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = math.inf,
    s_noise: float = 1.0,
) -> Tensor:
    """Euler steps (Karras et al. 2022, Algorithm 2 without the 2nd-order correction).

    s_churn > 0 first raises sigma to sigma_hat = sigma (1 + gamma) with fresh noise for sigma in
    [s_tmin, s_tmax] (their "churn"); the default 0 is the deterministic ODE solver (= DDIM, eta 0).
    """
    sigmas = sigmas.to(x.device)
    n = len(sigmas) - 1
    for i in step_range(sigmas, disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        gamma = min(s_churn / n, 2**0.5 - 1) if s_tmin <= float(sigma) <= s_tmax else 0.0
        sigma_hat = sigma * (1 + gamma)
        if gamma > 0:
            x = x + randn_like(x, generator) * s_noise * (sigma_hat**2 - sigma**2).sqrt()
        denoised = call_denoiser(denoiser, x, sigma_hat, extra_args)
        d = (x - denoised) / sigma_hat
        x = x + d * (sigma_next - sigma_hat)
        x = after_step(callback, x, i, sigma, sigma_next, denoised)
    return x


@torch.no_grad()
def sample_euler_ancestral(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: Mapping[str, Any] | None = None,
    callback: Callback | None = None,
    generator: Generator = None,
    disable: bool = False,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> Tensor:
    """An Euler step down to sigma_down, then fresh noise up to sigma_next (k-diffusion `euler_ancestral`).

    With s_noise = 1 this is the same update as DDIM with the same eta (see `ancestral_step`).
    """
    sigmas = sigmas.to(x.device)
    for i in step_range(sigmas, disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = call_denoiser(denoiser, x, sigma, extra_args)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        d = (x - denoised) / sigma
        x = x + d * (sigma_down - sigma)
        if sigma_up > 0:
            x = x + randn_like(x, generator) * s_noise * sigma_up
        x = after_step(callback, x, i, sigma, sigma_next, denoised)
    return x
