"""Linear multistep (LMS, Adams-Bashforth in sigma) as k-diffusion's `sample_lms` / diffusers' LMSDiscrete."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ldm.errors import UserError
from ldm.samplers.base import Callback, Denoiser, Generator, after_step, call_denoiser, step_range


def lms_coefficient(sigmas: Sequence[float], i: int, j: int, order: int) -> float:
    """The weight of the slope at sigmas[i - j] in the step sigmas[i] -> sigmas[i + 1].

    The integral over [sigmas[i], sigmas[i + 1]] of the Lagrange basis polynomial that is 1 at sigmas[i - j]
    and 0 at the other points sigmas[i], ..., sigmas[i - order + 1] (Adams-Bashforth on a non-uniform
    grid). The polynomial has degree order - 1, so `order`-point Gauss-Legendre quadrature is exact
    (k-diffusion and diffusers use scipy's adaptive `quad` on the same integrand). Float64.
    """
    a, b = float(sigmas[i]), float(sigmas[i + 1])
    nodes, weights = np.polynomial.legendre.leggauss(max(order, 1))
    tau = 0.5 * (b - a) * nodes + 0.5 * (b + a)
    basis = np.ones_like(tau)
    for k in range(order):
        if k != j:
            basis *= (tau - sigmas[i - k]) / (sigmas[i - j] - sigmas[i - k])
    return float(0.5 * (b - a) * np.dot(weights, basis))


@torch.no_grad()
def sample_lms(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: Mapping[str, Any] | None = None,
    callback: Callback | None = None,
    generator: Generator = None,  # unused: LMS is deterministic; kept for the shared signature
    disable: bool = False,
    order: int = 4,
) -> Tensor:
    """Linear multistep on dx/dsigma = (x - D) / sigma with the last `order` slopes (Karras et al. 2022
    ODE; the k-diffusion `sample_lms` / diffusers `LMSDiscreteScheduler` method, step(order=4)).

    x_next = x + sum_j c_j d_{i-j}, c_j = `lms_coefficient`: the exact integral of the polynomial through
    the last `order` slopes over the step. Order 1 is Euler (= DDIM); the first steps use the history
    they have. One model call per step. x: (B, ...) at sigmas[0]; returns x at sigmas[-1].

    Raises UserError for order < 1.
    """
    if int(order) < 1:
        raise UserError(f"sample_lms: order={order} must be >= 1 (4 is the usual LMS)")
    sigmas = sigmas.to(x.device)
    grid = sigmas.double().cpu().tolist()
    slopes: list[Tensor] = []
    for i in step_range(sigmas, disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = call_denoiser(denoiser, x, sigma, extra_args)
        slopes = (slopes + [(x - denoised) / sigma])[-int(order) :]
        current = len(slopes)  # min(i + 1, order)
        for j, d in enumerate(reversed(slopes)):
            x = x + lms_coefficient(grid, i, j, current) * d
        x = after_step(callback, x, i, sigma, sigma_next, denoised)
    return x
