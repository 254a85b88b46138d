"""DPM-Solver++ single-step and SDE samplers: 2S ancestral, SDE, 2M SDE (Lu et al. 2022, "DPM-Solver++").

All in the variance-exploding x = x0 + sigma eps with t = lambda = -log sigma, as k-diffusion writes them
(`sample_dpmpp_2s_ancestral`, `sample_dpmpp_sde`, `sample_dpmpp_2m_sde`). The stochastic ones take their
noise from `noise_sampler(sigma, sigma_next) -> N(0, I) like x` when given (e.g. a Brownian tree, or the
exact noise another implementation drew), otherwise from `generator` (one per image keeps images
independent of the batch size).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from ldm.errors import UserError
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

NoiseSampler = Callable[[Tensor, Tensor], Tensor]
SOLVER_TYPES = ("midpoint", "heun")


class BrownianNoise:
    """A Brownian motion W(sigma), drawn lazily where asked; a call returns its normalised increment.

    noise(sigma, sigma_next) = (W(sigma_next) - W(sigma)) / sqrt(|sigma - sigma_next|) ~ N(0, I) like x.
    New levels extend the path (independent increments) or, between two known levels, are drawn from
    the Brownian bridge, so overlapping intervals get the right correlation: exactly the law of
    k-diffusion's `BrownianTreeNoiseSampler` (Li et al. 2020's virtual Brownian tree), from `generator`
    instead of a seed. Levels above the highest one of the latest call are forgotten (samplers only move
    down in sigma), so memory stays at a few tensors like x.
    """

    def __init__(self, x: Tensor, generator: Generator = None) -> None:
        self.like, self.generator = x, generator
        self.path: dict[float, Tensor] = {}  # sigma -> W(sigma)

    def _w(self, s: float) -> Tensor:
        if s in self.path:
            return self.path[s]
        if not self.path:
            w = torch.zeros_like(self.like)
        else:
            below = [k for k in self.path if k < s]
            above = [k for k in self.path if k > s]
            z = randn_like(self.like, self.generator)
            if below and above:  # Brownian bridge between the nearest known levels
                a, b = max(below), min(above)
                mean = self.path[a] + (s - a) / (b - a) * (self.path[b] - self.path[a])
                w = mean + math.sqrt((s - a) * (b - s) / (b - a)) * z
            else:
                k = min(above) if above else max(below)
                w = self.path[k] + math.sqrt(abs(s - k)) * z
        self.path[s] = w
        return w

    def __call__(self, sigma: Tensor | float, sigma_next: Tensor | float) -> Tensor:
        """Standard normal noise for the interval (sigma_next, sigma), shaped like x."""
        a, b = float(sigma), float(sigma_next)
        if a == b:
            raise UserError(f"BrownianNoise: empty interval sigma = sigma_next = {a}")
        w_a, w_b = self._w(a), self._w(b)
        top = max(a, b)
        self.path = {k: v for k, v in self.path.items() if k <= top}
        return (w_b - w_a) / math.sqrt(abs(a - b))


def _fresh_noise(x: Tensor, generator: Generator) -> NoiseSampler:
    return lambda sigma, sigma_next: randn_like(x, generator)


@torch.no_grad()
def sample_dpmpp_2s_ancestral(
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
    noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    """DPM-Solver++(2S) down to sigma_down, then fresh noise up to sigma_next (k-diffusion "DPM++ 2S a").

    Each step: split sigma -> sigma_next into sigma_down and sigma_up (`ancestral_step`, eta = 1 the DDPM
    posterior, 0 deterministic), take the single-step second-order DPM-Solver++ (Lu et al. 2022b,
    Alg. 1, r = 1/2): x_mid = D + (sigma_mid / sigma)(x - D) at sigma_mid = sqrt(sigma sigma_down),
    x = D_mid + (sigma_down / sigma)(x - D_mid) with D_mid = D(x_mid; sigma_mid), then add
    s_noise sigma_up z. A step to sigma_down = 0 is one Euler step. 2 model calls per step (the last: 1).
    x: (B, ...) at sigmas[0]; returns x at sigmas[-1].
    """
    sigmas = sigmas.to(x.device)
    noise = noise_sampler or _fresh_noise(x, generator)
    for i in step_range(sigmas, disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = call_denoiser(denoiser, x, sigma, extra_args)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        if sigma_down == 0:
            x = x + (x - denoised) / sigma * (sigma_down - sigma)
        else:
            t, t_next = -sigma.log(), -sigma_down.log()
            sigma_mid = (-(t + (t_next - t) / 2)).exp()
            x_mid = (sigma_mid / sigma) * x - torch.expm1(-(t_next - t) / 2) * denoised
            denoised_mid = call_denoiser(denoiser, x_mid, sigma_mid, extra_args)
            x = (sigma_down / sigma) * x - torch.expm1(-(t_next - t)) * denoised_mid
        if sigma_next > 0 and sigma_up > 0:
            x = x + noise(sigma, sigma_next) * s_noise * sigma_up
        x = after_step(callback, x, i, sigma, sigma_next, denoised)
    return x


@torch.no_grad()
def sample_dpmpp_sde(
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
    r: float = 0.5,
    noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    """Stochastic DPM-Solver++ with a single-step second-order stage at r h (k-diffusion "DPM++ SDE").

    Each step t -> t_next (t = -log sigma, h = t_next - t, s = t + r h): an ancestral first-order step
    to sigma(s) (eta: noise share as in `ancestral_step`), D_2 = D(x_2; sigma(s)), then an ancestral step
    from x with the denoised blend (1 - 1/(2r)) D + 1/(2r) D_2 to sigma_next (Lu et al. 2022b, Sec. 4
    with the SDE noise of Eq. 18). Both noises come from one Brownian path in sigma (`BrownianNoise`,
    or `noise_sampler`), as k-diffusion's Brownian tree and diffusers' `DPMSolverSDEScheduler` (eta = 1,
    r = 1/2) draw them. A step to sigma = 0 is one Euler step; 2 model calls per other step.
    x: (B, ...) at sigmas[0]; returns x at sigmas[-1]. Raises UserError for r outside (0, 1].
    """
    if not 0 < r <= 1:
        raise UserError(f"sample_dpmpp_sde: r={r} must be in (0, 1] (1/2: the midpoint stage)")
    sigmas = sigmas.to(x.device)
    noise = noise_sampler or BrownianNoise(x, generator)
    fac = 1 / (2 * r)
    for i in step_range(sigmas, disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = call_denoiser(denoiser, x, sigma, extra_args)
        if sigma_next == 0:
            x = x + (x - denoised) / sigma * (sigma_next - sigma)
        else:
            # sigma(t) = e^-t as k-diffusion computes it: a Brownian tree sees the same query points
            t, t_next = -sigma.log(), -sigma_next.log()
            sigma_t, sigma_s, sigma_to = (-t).exp(), (-(t + (t_next - t) * r)).exp(), (-t_next).exp()
            sd, su = ancestral_step(sigma_t, sigma_s, eta)  # stage 1: to sigma(s)
            x_2 = (sd / sigma_t) * x - torch.expm1(t + sd.log()) * denoised
            if su > 0:
                x_2 = x_2 + noise(sigma_t, sigma_s) * s_noise * su
            denoised_2 = call_denoiser(denoiser, x_2, sigma_s, extra_args)
            sd, su = ancestral_step(sigma_t, sigma_to, eta)  # stage 2: the whole step
            denoised_d = (1 - fac) * denoised + fac * denoised_2
            x = (sd / sigma_t) * x - torch.expm1(t + sd.log()) * denoised_d
            if su > 0:
                x = x + noise(sigma_t, sigma_to) * s_noise * su
        x = after_step(callback, x, i, sigma, sigma_next, denoised)
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(
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
    solver_type: str = "midpoint",
    noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    """SDE-DPM-Solver++(2M) (Lu et al. 2022b, Eq. 18 and App. B; k-diffusion "DPM++ 2M SDE").

    x_next = (sigma_next / sigma) e^{-eta h} x + (1 - e^{-(1+eta) h}) D + c (D - D_prev) / r
             + s_noise sigma_next sqrt(1 - e^{-2 eta h}) z,
    h = log(sigma / sigma_next), r = h_prev / h, c = (1 - e^{-(1+eta) h}) / 2 ("midpoint") or
    (1 - e^{-(1+eta) h}) / (-(1+eta) h) + 1 ("heun"). The first step is first order; a step to sigma = 0
    returns D. One model call per step; eta = 0 is the ODE solver DPM-Solver++(2M). The noise of
    consecutive steps is independent (the intervals do not overlap), which is what k-diffusion's Brownian
    tree gives too. Equals diffusers' DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++").
    x: (B, ...) at sigmas[0]; returns x at sigmas[-1]. Raises UserError for an unknown solver_type.
    """
    if solver_type not in SOLVER_TYPES:
        raise UserError(f"sample_dpmpp_2m_sde: solver_type={solver_type!r} is not one of {SOLVER_TYPES}")
    sigmas = sigmas.to(x.device)
    noise = noise_sampler or _fresh_noise(x, generator)
    old_denoised, h_last = None, None
    for i in step_range(sigmas, disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = call_denoiser(denoiser, x, sigma, extra_args)
        if sigma_next == 0:
            x, h = denoised, None
        else:
            h = sigma.log() - sigma_next.log()
            eta_h = eta * h
            phi = -torch.expm1(-h - eta_h)  # 1 - e^{-(1+eta) h}
            x = (sigma_next / sigma) * (-eta_h).exp() * x + phi * denoised
            if old_denoised is not None and h_last is not None:
                r = h_last / h
                c = phi / 2 if solver_type == "midpoint" else phi / (-h - eta_h) + 1
                x = x + c * (denoised - old_denoised) / r
            if eta > 0:
                x = x + noise(sigma, sigma_next) * sigma_next * (-torch.expm1(-2 * eta_h)).sqrt() * s_noise
        x = after_step(callback, x, i, sigma, sigma_next, denoised)
        old_denoised, h_last = denoised, h
    return x
