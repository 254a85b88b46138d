"""Adapt a discrete-time network (eps / v / x0 output) to the denoiser D(x; sigma) samplers call."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ldm.diffusion.parameterization import check_parameterization, predict_x0_eps
from ldm.diffusion.schedules import NoiseSchedule
from ldm.samplers.sigmas import sigma_at, sigma_to_timestep, timestep_table


class DiscreteDenoiser(nn.Module):
    """D(x; sigma) for a network trained on x_t = alpha_t x0 + sigma_t eps at integer t (Karras 2022, Eq. 7).

    The sampler's x = x0 + sigma eps is the same point scaled by 1/alpha_t, so the network sees
    x_t = x / sqrt(1 + sigma^2) at the (fractional) timestep whose sigma(t) equals sigma, and its
    output is converted to x0 by the parameterisation.
    """

    alphas_cumprod: Tensor

    def __init__(
        self,
        model: Callable[..., Tensor],  # model(x_t, t, **cond) -> eps / v / x0, like UNetModel.forward
        schedule: NoiseSchedule | Tensor,  # or its alphas_cumprod (T,)
        parameterization: str = "eps",  # what the network predicts: eps | v | x0
        quantize: bool = False,  # round t to an integer (the model only saw integer t in training)
    ) -> None:
        super().__init__()
        self.model = model
        alphas_cumprod = schedule.alphas_cumprod if isinstance(schedule, NoiseSchedule) else schedule
        self.register_buffer("alphas_cumprod", alphas_cumprod.detach().float().clone(), persistent=False)
        self.parameterization = check_parameterization(parameterization)
        self.quantize = quantize
        self._table: tuple[Tensor, Tensor] | None = None  # (-log alpha_t, t) on the last device used

    @property
    def sigma_min(self) -> Tensor:
        """sigma at timestep 0."""
        return sigma_at(self.alphas_cumprod, torch.zeros(1))[0]

    @property
    def sigma_max(self) -> Tensor:
        """sigma at timestep T-1 (about 4096 for a zero-terminal-SNR schedule)."""
        return sigma_at(self.alphas_cumprod, torch.full((1,), len(self.alphas_cumprod) - 1.0))[0]

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        """The (fractional) timestep of a noise level, float32."""
        if self._table is None or self._table[0].device != sigma.device:  # built once per device
            self._table = timestep_table(self.alphas_cumprod.to(sigma.device))
        t = sigma_to_timestep(self.alphas_cumprod, sigma, self._table)
        return (t.round() if self.quantize else t).float()

    def forward(self, x: Tensor, sigma: Tensor, **cond: Any) -> Tensor:
        """The denoised estimate of x0 for x at noise level sigma (B,) or scalar."""
        sigma = sigma.to(x.device).expand(x.shape[0])  # (B,)
        t = self.sigma_to_t(sigma)  # (B,)
        shape = (-1,) + (1,) * (x.ndim - 1)
        alpha = (1 + sigma.double() ** 2).rsqrt() if x.device.type != "mps" else (1 + sigma**2).rsqrt()
        alpha = alpha.to(x.dtype).view(shape)  # alpha_t = 1 / sqrt(1 + sigma^2)
        sigma_vp = sigma.to(x.dtype).view(shape) * alpha  # sigma_t = sigma alpha_t
        x_t = x * alpha
        output = self.model(x_t, t, **cond)
        x0, _ = predict_x0_eps(self.parameterization, output.to(x.dtype), x_t, alpha, sigma_vp)
        return x0
