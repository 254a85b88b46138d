"""Discrete DDPM noise schedules (Ho et al. 2020) and the `NoiseSchedule` that holds one.

Notation: q(x_t | x_0) = N(alpha_t x_0, sigma_t^2 I) with alpha_t = sqrt(alphas_cumprod[t]) and
sigma_t = sqrt(1 - alphas_cumprod[t]) (variance preserving). Samplers use the equivalent
variance-exploding noise level sigma = sigma_t / alpha_t = sqrt((1 - a) / a) (Karras et al. 2022).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ldm.errors import UserError

SCHEDULE_KINDS = ("linear", "scaled_linear", "cosine")


def linear_betas(num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """betas linear in t (Ho et al. 2020, Sec. 4): the pixel-space DDPM schedule."""
    return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)


def scaled_linear_betas(num_timesteps: int, beta_start: float = 0.00085, beta_end: float = 0.012) -> Tensor:
    """sqrt(betas) linear in t, as in Stable Diffusion (CompVis calls this "linear")."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float64) ** 2


def cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """alphas_cumprod = f(t)/f(0), f(t) = cos^2((t/T + s)/(1 + s) pi/2) (Nichol & Dhariwal 2021, Eq. 17)."""
    steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    alphas_cumprod = f / f[0]
    # Clipping keeps beta_T < 1 so the last step still has a finite SNR (their Sec. 3.2).
    return (1 - alphas_cumprod[1:] / alphas_cumprod[:-1]).clamp(0, max_beta)


def alphas_cumprod_from_betas(betas: Tensor) -> Tensor:
    """alphas_cumprod[t] = prod_{s<=t} (1 - betas[s]) (Ho et al. 2020, Eq. 4), float32.

    The product runs in float32 over float32 (1 - beta), which reproduces the reference SD table
    (`io.alphas_cumprod`) and diffusers bit for bit; a float64 product differs by < 5e-7.
    """
    return torch.cumprod(1 - betas.float(), dim=0)


def rescale_zero_terminal_snr(alphas_cumprod: Tensor) -> Tensor:
    """Shift and scale sqrt(alphas_cumprod) so the last step has SNR 0 (Lin et al. 2024, Algorithm 1)."""
    sqrt_ac = alphas_cumprod.double().sqrt()
    first, last = sqrt_ac[0].clone(), sqrt_ac[-1].clone()
    sqrt_ac = (sqrt_ac - last) * first / (first - last)  # last -> 0, first unchanged
    return (sqrt_ac**2).to(alphas_cumprod.dtype)


def make_alphas_cumprod(
    kind: str = "scaled_linear",
    num_timesteps: int = 1000,
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
    cosine_s: float = 0.008,
    zero_terminal_snr: bool = False,
) -> Tensor:
    """alphas_cumprod (float32, length num_timesteps) for a schedule named by `kind`."""
    if kind == "linear":
        betas = linear_betas(num_timesteps, beta_start, beta_end)
    elif kind == "scaled_linear":
        betas = scaled_linear_betas(num_timesteps, beta_start, beta_end)
    elif kind == "cosine":
        betas = cosine_betas(num_timesteps, cosine_s)
    else:
        raise UserError(
            f"NoiseSchedule: kind={kind!r} is not one of {SCHEDULE_KINDS}; "
            "note CompVis/SD 'linear' is our 'scaled_linear'"
        )
    alphas_cumprod = alphas_cumprod_from_betas(betas)
    return rescale_zero_terminal_snr(alphas_cumprod) if zero_terminal_snr else alphas_cumprod


class NoiseSchedule(nn.Module):
    """A discrete variance-preserving schedule: the `alphas_cumprod` buffer and what follows from it."""

    alphas_cumprod: Tensor

    def __init__(
        self,
        kind: str = "scaled_linear",  # linear | scaled_linear (SD v1/v2) | cosine
        num_timesteps: int = 1000,  # T: training timesteps 0..T-1
        beta_start: float = 0.00085,  # SD v1 values; DDPM pixel models use linear 1e-4..0.02
        beta_end: float = 0.012,
        cosine_s: float = 0.008,  # small offset so beta_0 is not vanishingly small (Nichol & Dhariwal)
        zero_terminal_snr: bool = False,  # Lin et al. 2024; pair with v-prediction and trailing steps
    ) -> None:
        super().__init__()
        if num_timesteps < 2:
            raise UserError(f"NoiseSchedule: num_timesteps must be >= 2, got {num_timesteps}")
        self.kind = kind
        self.zero_terminal_snr = zero_terminal_snr
        ac = make_alphas_cumprod(kind, num_timesteps, beta_start, beta_end, cosine_s, zero_terminal_snr)
        # float32 like CompVis (and MPS has no float64); not persistent: the config defines the schedule.
        self.register_buffer("alphas_cumprod", ac, persistent=False)

    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod: Tensor) -> NoiseSchedule:
        """Wrap an explicit alphas_cumprod table (e.g. one stored in a CompVis checkpoint)."""
        schedule = cls(num_timesteps=len(alphas_cumprod))
        schedule.kind = "custom"
        schedule.alphas_cumprod = alphas_cumprod.detach().float().clone()
        return schedule

    @property
    def num_timesteps(self) -> int:
        return self.alphas_cumprod.shape[0]

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(alpha_t, sigma_t) = (sqrt(a_t), sqrt(1 - a_t)) for integer timesteps t, shaped like t."""
        a = self.alphas_cumprod.to(t.device)[t.long()]
        return a.sqrt(), (1 - a).sqrt()

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """x_t = alpha_t x0 + sigma_t noise (Ho et al. 2020, Eq. 4); t has shape (B,)."""
        alpha, sigma = self.alpha_sigma(t)
        shape = (-1,) + (1,) * (x0.ndim - 1)
        return alpha.view(shape).to(x0.dtype) * x0 + sigma.view(shape).to(x0.dtype) * noise

    def snr(self, t: Tensor | None = None) -> Tensor:
        """SNR(t) = alpha_t^2 / sigma_t^2 = a / (1 - a) (Kingma et al. 2021); all steps if t is None."""
        a = self.alphas_cumprod if t is None else self.alphas_cumprod.to(t.device)[t.long()]
        return a / (1 - a)

    def log_snr(self, t: Tensor | None = None) -> Tensor:
        """log SNR(t) = log(a) - log(1 - a); -inf at a zero-terminal-SNR last step."""
        a = self.alphas_cumprod if t is None else self.alphas_cumprod.to(t.device)[t.long()]
        return a.log() - torch.log1p(-a)

    def sigmas(self) -> Tensor:
        """Variance-exploding noise levels sqrt((1 - a) / a) per timestep (inf where a == 0)."""
        a = self.alphas_cumprod
        return ((1 - a) / a).sqrt()

    def extra_repr(self) -> str:
        zt = self.zero_terminal_snr
        return f"kind={self.kind!r}, num_timesteps={self.num_timesteps}, zero_terminal_snr={zt}"
