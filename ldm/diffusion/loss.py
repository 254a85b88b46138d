"""The denoising training loss as one small callable (in the spirit of NVlabs/edm `training/loss.py`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ldm.diffusion.parameterization import check_parameterization, min_snr_weight, model_target
from ldm.diffusion.schedules import NoiseSchedule
from ldm.errors import UserError

ModelFn = Callable[..., Tensor]  # model_fn(x_t, t, **cond) -> network output shaped like x_t


TIMESTEP_SAMPLING = ("uniform", "logit_normal")


class DiffusionLoss(nn.Module):
    """E_{t, eps} w(t) || f(x_t, t, c) - target ||  with t ~ U{0..T-1} (Ho et al. 2020, Eq. 14).

    `timestep_sampling="logit_normal"` draws t = floor(T * sigmoid(n)), n ~ N(logit_mean, logit_std^2)
    instead (Esser et al. 2024, SD3, Eq. 19): logit_mean > 0 trains the noisy end more, where the model must
    rely on its conditioning alone (e.g. super-resolution's low-res input)."""

    def __init__(
        self,
        schedule: NoiseSchedule,
        parameterization: str = "eps",  # eps (SD v1) | v (SD v2-768) | x0
        loss_type: str = "l2",  # l2 = the DDPM "simple" loss; l1 as in some CompVis configs
        min_snr_gamma: float | None = None,  # Hang et al. 2023 recommend 5.0; None = uniform weights
        offset_noise: float = 0.0,  # Guttenberg 2023: ~0.1 lets the model learn very dark/bright images
        timestep_sampling: str = "uniform",  # uniform | logit_normal (SD3)
        logit_mean: float = 0.0,  # logit_normal only: > 0 favours noisy timesteps
        logit_std: float = 1.0,
    ) -> None:
        super().__init__()
        if loss_type not in ("l1", "l2"):
            raise UserError(f"DiffusionLoss: loss_type={loss_type!r} must be 'l1' or 'l2'")
        if min_snr_gamma is not None and min_snr_gamma <= 0:
            raise UserError(f"DiffusionLoss: min_snr_gamma must be > 0 or null, got {min_snr_gamma}")
        if offset_noise < 0:
            raise UserError(f"DiffusionLoss: offset_noise must be >= 0, got {offset_noise}")
        if timestep_sampling not in TIMESTEP_SAMPLING:
            raise UserError(
                f"DiffusionLoss: timestep_sampling={timestep_sampling!r} must be one of "
                f"{list(TIMESTEP_SAMPLING)}"
            )
        if not logit_std > 0:
            raise UserError(f"DiffusionLoss: logit_std must be > 0, got {logit_std}")
        self.timestep_sampling = timestep_sampling
        self.logit_mean = float(logit_mean)
        self.logit_std = float(logit_std)
        self.schedule = schedule
        self.parameterization = check_parameterization(parameterization)
        self.loss_type = loss_type
        self.min_snr_gamma = min_snr_gamma
        self.offset_noise = offset_noise

    def sample_noise(self, x0: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """N(0, I), plus offset_noise * a per-(image, channel) constant (Guttenberg 2023)."""
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        if self.offset_noise > 0:
            shape = x0.shape[:2] + (1,) * (x0.ndim - 2)
            offset = torch.randn(shape, generator=generator, device=x0.device, dtype=x0.dtype)
            noise = noise + self.offset_noise * offset
        return noise

    def sample_timesteps(
        self, batch: int, device: torch.device, generator: torch.Generator | None = None
    ) -> Tensor:
        """(batch,) int64 timesteps in [0, T) drawn as `timestep_sampling` says."""
        T = self.schedule.num_timesteps
        if self.timestep_sampling == "uniform":
            return torch.randint(0, T, (batch,), generator=generator, device=device)
        n = torch.randn(batch, generator=generator, device=device) * self.logit_std + self.logit_mean
        return (torch.sigmoid(n) * T).long().clamp_(0, T - 1)

    def weights(self, t: Tensor) -> Tensor:
        """Per-sample loss weights (B,): 1, or min-SNR-gamma in the prediction's own units."""
        if self.min_snr_gamma is None:
            return torch.ones(t.shape, device=t.device)
        return min_snr_weight(self.parameterization, self.schedule.snr(t).float(), self.min_snr_gamma)

    def forward(
        self,
        model_fn: ModelFn,
        x0: Tensor,
        cond: Mapping[str, Any] | None = None,
        *,
        t: Tensor | None = None,  # (B,) integer timesteps; drawn by `sample_timesteps` when None
        noise: Tensor | None = None,  # the full noise (offset included); sampled when None
        generator: torch.Generator | None = None,  # on x0's device; for t and noise
        sample_weight: Tensor | None = None,  # (B,) per-sample factors, e.g. DreamBooth's prior_loss_weight
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Return (scalar loss, logs) for clean latents x0 (B, C, H, W) and conditioning kwargs `cond`.

        Loss = batch mean of w(t) * sample_weight * per-sample error (sample_weight: 1 by default)."""
        batch = x0.shape[0]
        if t is None:
            t = self.sample_timesteps(batch, x0.device, generator)
        if noise is None:
            noise = self.sample_noise(x0, generator)
        alpha, sigma = self.schedule.alpha_sigma(t)
        shape = (batch,) + (1,) * (x0.ndim - 1)
        alpha, sigma = alpha.view(shape).to(x0.dtype), sigma.view(shape).to(x0.dtype)

        x_t = alpha * x0 + sigma * noise
        output = model_fn(x_t, t, **(cond or {}))
        target = model_target(self.parameterization, x0, noise, alpha, sigma)
        error = output.float() - target.float()
        err = error.abs() if self.loss_type == "l1" else error.square()
        per_sample = err.mean(dim=tuple(range(1, err.ndim)))  # (B,)
        weights = self.weights(t)
        if sample_weight is not None:
            weights = weights * sample_weight.to(weights.device, weights.dtype).reshape(batch)
        loss = (weights * per_sample).mean()
        logs = {"loss": loss.detach(), "loss_unweighted": per_sample.mean().detach()}
        return loss, logs
