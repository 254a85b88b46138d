"""What the network predicts: epsilon (Ho et al. 2020), v (Salimans & Ho 2022) or x0.

All functions use the variance-preserving coefficients alpha = sqrt(a_t), sigma = sqrt(1 - a_t)
(alpha^2 + sigma^2 = 1), with x_t = alpha x0 + sigma eps; alpha and sigma broadcast against x.
"""

from __future__ import annotations

from torch import Tensor

from ldm.errors import UserError

PARAMETERIZATIONS = ("eps", "v", "x0")


def check_parameterization(parameterization: str) -> str:
    """Return the name if it is known, else raise a UserError naming the choices."""
    if parameterization not in PARAMETERIZATIONS:
        raise UserError(
            f"parameterization={parameterization!r} is not one of {PARAMETERIZATIONS} "
            "(eps: noise prediction, SD v1; v: velocity, SD v2-768; x0: data prediction)"
        )
    return parameterization


def model_target(parameterization: str, x0: Tensor, noise: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """The regression target: eps, v = alpha eps - sigma x0 (Salimans & Ho 2022, Sec. 4), or x0."""
    check_parameterization(parameterization)
    if parameterization == "eps":
        return noise
    if parameterization == "v":
        return alpha * noise - sigma * x0
    return x0


def predict_x0_eps(
    parameterization: str, output: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor
) -> tuple[Tensor, Tensor]:
    """Turn a network output into (x0, eps) estimates at x_t = alpha x0 + sigma eps."""
    check_parameterization(parameterization)
    if parameterization == "eps":
        return (x_t - sigma * output) / alpha, output
    if parameterization == "v":
        # x0 = alpha x_t - sigma v, eps = sigma x_t + alpha v (Salimans & Ho 2022, Appendix D)
        return alpha * x_t - sigma * output, sigma * x_t + alpha * output
    return output, (x_t - alpha * output) / sigma


def min_snr_weight(parameterization: str, snr: Tensor, gamma: float) -> Tensor:
    """Min-SNR-gamma loss weight (Hang et al. 2023, Eq. 9-11), per parameterisation.

    The weight on the x0-space MSE is min(SNR, gamma); expressed in each prediction's own MSE:
    x0: min(SNR, gamma); eps: min(SNR, gamma) / SNR; v: min(SNR, gamma) / (SNR + 1).
    """
    check_parameterization(parameterization)
    clipped = snr.clamp(max=gamma)
    if parameterization == "x0":
        return clipped
    if parameterization == "v":
        return clipped / (snr + 1)
    # min(SNR, gamma)/SNR written without 0/0 at a zero-terminal-SNR step (its limit is 1).
    return (gamma / snr).clamp(max=1.0)
