"""Heun's second-order method on the probability-flow ODE (Karras et al. 2022, Algorithm 2)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ldm.samplers.base import Callback, Denoiser, Generator, after_step, call_denoiser, randn_like, step_range


@torch.no_grad()
def sample_heun(
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
    """Heun steps on dx/dsigma = (x - D(x; sigma)) / sigma (Karras et al. 2022, Algorithm 2).

    An Euler step to sigma_next, then the trapezoidal correction with the slope there:
    x_next = x + (sigma_next - sigma) (d + d') / 2. The step to sigma = 0 stays an Euler step (the slope
    at 0 is undefined), so n steps cost 2n - 1 model calls; this is k-diffusion's `sample_heun` and
    diffusers' `HeunDiscreteScheduler`. s_churn > 0 first raises sigma to sigma (1 + gamma) with fresh
    noise for sigma in [s_tmin, s_tmax] (their stochastic variant, Algorithm 2 lines 4-6); the default
    0 is the deterministic solver.

    x: (B, ...) at sigmas[0]; sigmas: (steps + 1,) decreasing; returns x at sigmas[-1], same shape.
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
        dt = sigma_next - sigma_hat
        if sigma_next == 0:
            x = x + d * dt
        else:
            x_euler = x + d * dt
            d_next = (x_euler - call_denoiser(denoiser, x_euler, sigma_next, extra_args)) / sigma_next
            x = x + (d + d_next) / 2 * dt
        x = after_step(callback, x, i, sigma, sigma_next, denoised)
    return x
