"""The diagonal Gaussian posterior q(z|x) of the KL autoencoder (Kingma & Welling 2014; Rombach 2022)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

# CompVis clamps the log-variance so exp() stays finite in float32 (and in fp16 for std = exp(logvar / 2))
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


class DiagonalGaussianDistribution:
    """N(mean, diag(exp(logvar))) from encoder moments (B, 2C, h, w), split along channels."""

    def __init__(self, parameters: Tensor, deterministic: bool = False) -> None:
        self.parameters = parameters
        self.mean, logvar = torch.chunk(parameters, 2, dim=1)
        self.logvar = torch.clamp(logvar, LOGVAR_MIN, LOGVAR_MAX)
        self.deterministic = deterministic
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)
        if deterministic:
            self.var = self.std = torch.zeros_like(self.mean)

    @classmethod
    def from_mean_logvar(cls, mean: Tensor, logvar: Tensor) -> DiagonalGaussianDistribution:
        """Rebuild the posterior from cached `latent_mean` / `latent_logvar` tensors."""
        return cls(torch.cat([mean, logvar], dim=1))

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """z = mean + std * eps, eps ~ N(0, I) (reparameterisation trick, Kingma & Welling 2014 eq. 10)."""
        noise = torch.randn(
            self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype
        )
        return self.mean + self.std * noise

    def mode(self) -> Tensor:
        return self.mean

    def kl(self, other: DiagonalGaussianDistribution | None = None) -> Tensor:
        """KL(q || p) per sample, summed over (C, h, w); p = N(0, I) when `other` is None (VAE eq. 7)."""
        if self.deterministic:
            return torch.zeros(self.mean.shape[0], device=self.mean.device, dtype=self.mean.dtype)
        dims = list(range(1, self.mean.ndim))
        if other is None:
            return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=dims)
        return 0.5 * torch.sum(
            (self.mean - other.mean).pow(2) / other.var
            + self.var / other.var
            - 1.0
            - self.logvar
            + other.logvar,
            dim=dims,
        )

    def nll(self, sample: Tensor, dims: tuple[int, ...] = (1, 2, 3)) -> Tensor:
        """Negative log-likelihood -log N(sample; mean, var), summed over `dims`."""
        if self.deterministic:
            return torch.zeros(sample.shape[0], device=sample.device, dtype=sample.dtype)
        log_two_pi = math.log(2.0 * math.pi)
        return 0.5 * torch.sum(
            log_two_pi + self.logvar + (sample - self.mean).pow(2) / self.var, dim=list(dims)
        )
