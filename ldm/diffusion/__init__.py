"""ldm.diffusion: noise schedules, parameterisations (eps / v / x0) and the training loss."""

from ldm.diffusion.loss import DiffusionLoss
from ldm.diffusion.parameterization import (
    PARAMETERIZATIONS,
    check_parameterization,
    min_snr_weight,
    model_target,
    predict_x0_eps,
)
from ldm.diffusion.schedules import (
    NoiseSchedule,
    alphas_cumprod_from_betas,
    cosine_betas,
    linear_betas,
    make_alphas_cumprod,
    rescale_zero_terminal_snr,
    scaled_linear_betas,
)

__all__ = [
    "PARAMETERIZATIONS",
    "DiffusionLoss",
    "NoiseSchedule",
    "alphas_cumprod_from_betas",
    "check_parameterization",
    "cosine_betas",
    "linear_betas",
    "make_alphas_cumprod",
    "min_snr_weight",
    "model_target",
    "predict_x0_eps",
    "rescale_zero_terminal_snr",
    "scaled_linear_betas",
]
