"""Step schedules: which noise levels a sampler visits (uniform timesteps, time-uniform, Karras).

A discrete schedule is seen through its variance-exploding noise levels sigma(t) = sqrt((1 - a_t) / a_t).
Between integer timesteps, log alpha_t = 0.5 log a_t is interpolated linearly, as DPM-Solver's
discrete-time wrapper does (Lu et al. 2022, App. D), so fractional timesteps are well defined.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ldm.errors import UserError

# A zero-terminal-SNR schedule has a_T = 0 (sigma = inf); like diffusers we sample from a_T = 2^-24
# (sigma ~ 4096) instead, which a v-prediction model cannot tell apart from pure noise.
MIN_ALPHA_CUMPROD = 2.0**-24
SPACINGS = ("leading", "trailing", "time_uniform", "karras")


def _float64_ok(device: torch.device) -> bool:
    return device.type != "mps"  # MPS has no float64


def log_alpha_table(alphas_cumprod: Tensor) -> Tensor:
    """0.5 log a_t per integer timestep, in float64 where the device has it."""
    dtype = torch.float64 if _float64_ok(alphas_cumprod.device) else torch.float32
    return 0.5 * alphas_cumprod.to(dtype).clamp(min=MIN_ALPHA_CUMPROD).log()


def interp(x: Tensor, xp: Tensor, fp: Tensor) -> Tensor:
    """Piecewise-linear interpolation of (xp, fp) at x for increasing xp, clamped at the ends."""
    idx = torch.searchsorted(xp, x.contiguous()).clamp(1, len(xp) - 1)
    x0, x1, f0, f1 = xp[idx - 1], xp[idx], fp[idx - 1], fp[idx]
    w = ((x - x0) / (x1 - x0)).clamp(0, 1)
    return f0 + w * (f1 - f0)


def sigma_at(alphas_cumprod: Tensor, timesteps: Tensor) -> Tensor:
    """sigma at (possibly fractional) timesteps in [0, T-1], float32 on alphas_cumprod's device."""
    log_alpha = log_alpha_table(alphas_cumprod)
    t = timesteps.to(device=log_alpha.device, dtype=log_alpha.dtype)
    grid = torch.arange(len(log_alpha), device=log_alpha.device, dtype=log_alpha.dtype)
    la = interp(t, grid, log_alpha)
    return torch.expm1(-2 * la).sqrt().float()  # sigma^2 = 1/a - 1 = exp(-2 log alpha) - 1


def timestep_table(alphas_cumprod: Tensor) -> tuple[Tensor, Tensor]:
    """(-log alpha_t increasing, t) per integer timestep, for `sigma_to_timestep`."""
    neg_log_alpha = -log_alpha_table(alphas_cumprod)
    return neg_log_alpha, torch.arange(
        len(neg_log_alpha), device=neg_log_alpha.device, dtype=neg_log_alpha.dtype
    )


def sigma_to_timestep(
    alphas_cumprod: Tensor, sigma: Tensor, table: tuple[Tensor, Tensor] | None = None
) -> Tensor:
    """Inverse of `sigma_at`: the fractional timestep whose interpolated log alpha matches sigma.

    `table` is `timestep_table(alphas_cumprod)` on sigma's device, for callers that cache it.
    """
    neg_log_alpha, grid = timestep_table(alphas_cumprod.to(sigma.device)) if table is None else table
    target = 0.5 * torch.log1p(sigma.to(grid.dtype) ** 2)  # -log alpha = 0.5 log(1 + sigma^2)
    return interp(target, neg_log_alpha, grid)


def timesteps_leading(num_timesteps: int, steps: int, offset: int = 1) -> Tensor:
    """Descending (T // steps) * k + offset: CompVis DDIM/PLMS (offset 1) and diffusers 'leading'."""
    ratio = num_timesteps // steps
    return (torch.arange(steps - 1, -1, -1, dtype=torch.float64) * ratio + offset).clamp(
        max=num_timesteps - 1
    )


def timesteps_trailing(num_timesteps: int, steps: int) -> Tensor:
    """Descending round(T - k T/steps) - 1, starting at T-1 (Lin et al. 2024, Sec. 3.3)."""
    return torch.round(torch.arange(num_timesteps, 0, -num_timesteps / steps, dtype=torch.float64)) - 1


def timesteps_time_uniform(num_timesteps: int, steps: int) -> Tensor:
    """steps + 1 fractional timesteps T t - 1 for t uniform in [1, 1/T] (DPM-Solver 'time_uniform')."""
    t = torch.linspace(1.0, 1.0 / num_timesteps, steps + 1, dtype=torch.float64)
    return t * num_timesteps - 1


def get_sigmas_karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """n levels (s_max^(1/rho) + i/(n-1) (s_min^(1/rho) - s_max^(1/rho)))^rho (Karras et al. 2022, Eq. 5)."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return ((hi + ramp * (lo - hi)) ** rho).float()


class StepSchedule:
    """Builds the (steps + 1,) decreasing sigmas for a discrete schedule; Hydra-instantiable.

    spacing: "leading" (uniform timesteps T//steps apart plus `offset`; CompVis DDIM/PLMS),
    "trailing" (uniform, starting at T-1; pair with zero-terminal SNR), "time_uniform" (continuous
    t uniform; CompVis DPM-Solver), "karras" (Karras et al. 2022, Eq. 5, between sigma(0) and sigma(T-1)).
    final: "zero" ends at sigma = 0 (a fully denoised sample); "min" ends at sigma(0), the least noisy
    training level, as CompVis does (convert the result with `to_variance_preserving` to match it).
    """

    def __init__(
        self,
        steps: int = 50,  # model evaluations for one-evaluation-per-step samplers
        spacing: str = "leading",  # see the class docstring
        offset: int = 1,  # leading only: CompVis and SD's diffusers config both use +1
        final: str = "zero",  # zero | min
        rho: float = 7.0,  # karras only: 7 balances errors across levels (Karras et al. 2022, Sec. 3)
    ) -> None:
        if steps < 1:
            raise UserError(f"StepSchedule: steps must be >= 1, got {steps}")
        if spacing not in SPACINGS:
            raise UserError(f"StepSchedule: spacing={spacing!r} is not one of {SPACINGS}")
        if final not in ("zero", "min"):
            raise UserError(f"StepSchedule: final={final!r} must be 'zero' or 'min'")
        self.steps, self.spacing, self.offset, self.final, self.rho = steps, spacing, offset, final, rho

    def __call__(self, alphas_cumprod: Tensor) -> Tensor:
        """The sigmas (steps + 1,) float32 for this alphas_cumprod table."""
        num_timesteps = len(alphas_cumprod)
        if self.steps > num_timesteps:
            raise UserError(
                f"StepSchedule: steps={self.steps} exceeds the {num_timesteps} training timesteps"
            )
        ac = alphas_cumprod.detach().cpu()
        last = torch.zeros(1) if self.final == "zero" else sigma_at(ac, torch.zeros(1))
        if self.spacing == "time_uniform":
            sigmas = sigma_at(ac, timesteps_time_uniform(num_timesteps, self.steps))
            sigmas[-1] = last[0]  # the last point is timestep 0 itself
            return sigmas
        if self.spacing == "karras":
            sigma_min, sigma_max = sigma_at(ac, torch.tensor([0.0, num_timesteps - 1.0])).tolist()
            n = self.steps if self.final == "zero" else self.steps + 1
            sigmas = get_sigmas_karras(n, sigma_min, sigma_max, self.rho)
            return torch.cat([sigmas, torch.zeros(1)]) if self.final == "zero" else sigmas
        if self.spacing == "leading":
            timesteps = timesteps_leading(num_timesteps, self.steps, self.offset)
        else:
            timesteps = timesteps_trailing(num_timesteps, self.steps)
        return torch.cat([sigma_at(ac, timesteps), last])

    def __repr__(self) -> str:
        return (
            f"StepSchedule(steps={self.steps}, spacing={self.spacing!r}, offset={self.offset}, "
            f"final={self.final!r}, rho={self.rho})"
        )


def truncate_for_strength(sigmas: Tensor, strength: float) -> Tensor:
    """Keep the last int(strength * steps) steps for img2img (SDEdit, Meng et al. 2022); 1.0 keeps all."""
    if not 0.0 < strength <= 1.0:
        raise UserError(f"strength must be in (0, 1], got {strength}")
    steps = len(sigmas) - 1
    keep = min(int(strength * steps + 1e-6), steps)
    return sigmas[steps - keep :]


def start_x(noise: Tensor, sigma: Tensor | float, x0: Tensor | None = None) -> Tensor:
    """The sampler's starting point at noise level sigma.

    Pure noise: noise * sqrt(1 + sigma^2), the variance-exploding image of a unit-variance x_T (what
    CompVis samplers start from). From an image (img2img / inpainting): x0 + sigma * noise.
    """
    sigma = torch.as_tensor(sigma, dtype=noise.dtype, device=noise.device)
    if x0 is None:
        return noise * (1 + sigma**2).sqrt()
    return x0 + sigma * noise


def to_variance_preserving(x: Tensor, sigma: Tensor | float) -> Tensor:
    """x_t = x / sqrt(1 + sigma^2): the DDPM-scaled latent at the same noise level (CompVis outputs)."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    return x / (1 + sigma**2).sqrt()


__all__ = [
    "MIN_ALPHA_CUMPROD",
    "StepSchedule",
    "get_sigmas_karras",
    "interp",
    "log_alpha_table",
    "sigma_at",
    "sigma_to_timestep",
    "start_x",
    "timestep_table",
    "timesteps_leading",
    "timesteps_time_uniform",
    "timesteps_trailing",
    "to_variance_preserving",
    "truncate_for_strength",
]
