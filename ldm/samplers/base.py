"""What every sampler shares: the denoiser/callback contract, per-image noise, the ancestral split.

The shared sampler signature (k-diffusion style; Karras et al. 2022 notation):

    sample_xxx(denoiser, x, sigmas, *, extra_args=None, callback=None, generator=None,
               disable=False, **algorithm_opts) -> Tensor

- `denoiser(x, sigma, **extra_args) -> denoised`: D(x; sigma), the estimate of the clean latent for
  x = x0 + sigma * eps (variance-exploding scaling). `DiscreteDenoiser` adapts an eps/v/x0 network;
  `ClassifierFreeGuidance` wraps any denoiser with the same signature.
- `x`: the start at noise level sigmas[0], e.g. `start_x(noise, sigmas[0])`; the result is x at sigmas[-1]
  (the clean sample when sigmas[-1] == 0).
- `sigmas`: (steps + 1,) decreasing noise levels, see `ldm.samplers.sigmas`.
- `callback(info) -> Tensor | None`: called after every step with info = {"x": x at sigma_next, "i": step
  index, "sigma": sigmas[i], "sigma_next": sigmas[i+1], "denoised": D(x_i; sigma_i)}. Returning a tensor
  replaces x (e.g. to paste known latents for inpainting, see `ldm.samplers.hooks`); None keeps it.
- `generator`: None, one torch.Generator, or a list with one generator per image, so that image k of a
  batch gets the same noise whatever the batch size (edm2 `StackedRandomGenerator`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor
from tqdm.auto import trange

from ldm.errors import UserError

Generator = torch.Generator | Sequence[torch.Generator] | None
Callback = Callable[[dict[str, Any]], Tensor | None]


class Denoiser(Protocol):
    def __call__(self, x: Tensor, sigma: Tensor, **cond: Any) -> Tensor: ...


def randn(
    shape: Sequence[int],
    generator: Generator = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Standard normal noise; with a list of generators, row k is drawn from generator k alone."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)
    if len(generator) != shape[0]:
        raise UserError(f"got {len(generator)} generators for a batch of {shape[0]}; pass one per image")
    rows = [torch.randn(tuple(shape[1:]), generator=g, device=g.device, dtype=dtype) for g in generator]
    return torch.stack(rows).to(device)


def randn_like(x: Tensor, generator: Generator = None) -> Tensor:
    """`randn` shaped, placed and typed like x."""
    return randn(x.shape, generator, x.device, x.dtype)


def generators_from_seeds(seeds: Sequence[int], device: torch.device | str = "cpu") -> list[torch.Generator]:
    """One seeded generator per image (pass the list as `generator=`)."""
    return [torch.Generator(device).manual_seed(int(s)) for s in seeds]


def ancestral_step(sigma: Tensor, sigma_next: Tensor, eta: float = 1.0) -> tuple[Tensor, Tensor]:
    """Split a step sigma -> sigma_next into a deterministic part to sigma_down plus fresh noise sigma_up.

    sigma_up^2 = eta^2 sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2 is the DDIM noise (Song et al.
    2021, Eq. 16) in variance-exploding units; eta = 1 gives the DDPM posterior (Ho et al. 2020).
    """
    if eta == 0 or sigma_next == 0:
        return sigma_next, sigma_next * 0
    sigma_up = torch.minimum(sigma_next, eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2).sqrt())
    sigma_down = (sigma_next**2 - sigma_up**2).sqrt()
    return sigma_down, sigma_up


def step_range(sigmas: Tensor, disable: bool) -> range:
    """The step indices 0..len(sigmas)-2, with a tqdm progress bar unless disabled."""
    if sigmas.ndim != 1 or len(sigmas) < 2:
        raise UserError(
            f"sigmas must be a 1-D tensor with at least 2 noise levels, got shape {tuple(sigmas.shape)}"
        )
    return trange(len(sigmas) - 1, disable=disable, leave=False)


def call_denoiser(
    denoiser: Denoiser, x: Tensor, sigma: Tensor, extra_args: Mapping[str, Any] | None
) -> Tensor:
    """D(x; sigma) with sigma broadcast to one value per image."""
    return denoiser(x, sigma.expand(x.shape[0]), **(extra_args or {}))


def after_step(
    callback: Callback | None, x: Tensor, i: int, sigma: Tensor, sigma_next: Tensor, denoised: Tensor
) -> Tensor:
    """Run the user callback; a returned tensor replaces x."""
    if callback is None:
        return x
    out = callback({"x": x, "i": i, "sigma": sigma, "sigma_next": sigma_next, "denoised": denoised})
    return x if out is None else out
