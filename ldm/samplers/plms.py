"""PLMS: pseudo linear multistep sampling (Liu et al. 2022, "Pseudo Numerical Methods for DMs")."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ldm.samplers.base import Callback, Denoiser, Generator, after_step, call_denoiser, step_range


def _eps(denoiser: Denoiser, x: Tensor, sigma: Tensor, extra_args: Mapping[str, Any] | None) -> Tensor:
    return (x - call_denoiser(denoiser, x, sigma, extra_args)) / sigma


@torch.no_grad()
def sample_plms(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: Mapping[str, Any] | None = None,
    callback: Callback | None = None,
    generator: Generator = None,  # unused: PLMS is deterministic; kept for the shared signature
    disable: bool = False,
) -> Tensor:
    """Adams-Bashforth combinations of past eps in the DDIM transfer step (Liu et al. 2022, Eq. 12-13).

    Orders 2, 3, 4 as history builds up; the first step is their pseudo improved Euler (one extra
    model call), exactly as the CompVis PLMSSampler does.
    """
    sigmas = sigmas.to(x.device)
    old_eps: list[Tensor] = []
    for i in step_range(sigmas, disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        eps = _eps(denoiser, x, sigma, extra_args)
        if not old_eps:
            eps_prime = eps
            if sigma_next > 0:  # pseudo improved Euler: average with eps at the DDIM prediction
                x_euler = x + (sigma_next - sigma) * eps
                eps_prime = (eps + _eps(denoiser, x_euler, sigma_next, extra_args)) / 2
        elif len(old_eps) == 1:
            eps_prime = (3 * eps - old_eps[-1]) / 2
        elif len(old_eps) == 2:
            eps_prime = (23 * eps - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
        else:
            eps_prime = (55 * eps - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24
        denoised = x - sigma * eps_prime
        x = denoised + sigma_next * eps_prime  # the DDIM transfer with the combined eps
        old_eps = (old_eps + [eps])[-3:]
        x = after_step(callback, x, i, sigma, sigma_next, denoised)
    return x
