"""DPM-Solver++(2M) and its SDE variant (Lu et al. 2022, "DPM-Solver++"), in lambda = -log sigma."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ldm.samplers.base import Callback, Denoiser, Generator, after_step, call_denoiser, randn_like, step_range


@torch.no_grad()
def sample_dpmpp_2m(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: Mapping[str, Any] | None = None,
    callback: Callback | None = None,
    generator: Generator = None,
    disable: bool = False,
    eta: float = 0.0,
    s_noise: float = 1.0,
    lower_order_final: bool = True,
) -> Tensor:
    """Multistep second-order data-prediction solver (Lu et al. 2022b, Algorithm 2; eta > 0: Eq. 18 SDE).

    x_next = (sigma_next / sigma) e^{-eta h} x + (1 - e^{-(1+eta) h}) (D + (D - D_prev) / (2 r)),
    h = log(sigma / sigma_next), r = h_prev / h. The first step is first order; with
    `lower_order_final`, so is the last one when there are fewer than 15 steps (it stabilises few-step
    sampling; DPM-Solver and diffusers do the same). A step to sigma = 0 returns D itself.
    """
    sigmas = sigmas.to(x.device)
    n = len(sigmas) - 1
    old_denoised, h_last = None, None
    for i in step_range(sigmas, disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = call_denoiser(denoiser, x, sigma, extra_args)
        if sigma_next == 0:
            x, h = denoised, None
        else:
            h = sigma.log() - sigma_next.log()
            eta_h = eta * h
            d = denoised
            final = lower_order_final and n < 15 and i == n - 1
            if old_denoised is not None and h_last is not None and not final:
                r = h_last / h
                d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (sigma_next / sigma) * (-eta_h).exp() * x - torch.expm1(-h - eta_h) * d
            if eta > 0:
                x = x + randn_like(x, generator) * sigma_next * (-torch.expm1(-2 * eta_h)).sqrt() * s_noise
        x = after_step(callback, x, i, sigma, sigma_next, denoised)
        old_denoised, h_last = denoised, h
    return x
