"""UniPC: unified predictor-corrector multistep solver (Zhao et al. 2023), data-prediction form.

Written on the variance-exploding x = x0 + sigma eps with lambda = -log sigma (the VP formulas of the
paper divided by alpha_t). The coefficients follow the paper's B(h) variants exactly as diffusers'
`UniPCMultistepScheduler` (predict_x0=True) computes them, so the two agree step for step.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ldm.errors import UserError
from ldm.samplers.base import Callback, Denoiser, Generator, after_step, call_denoiser, step_range

VARIANTS = ("bh1", "bh2")


def _solve(
    rks: list[float], h: float, order: int, variant: str, predictor: bool
) -> tuple[list[float], float, float]:
    """(rhos, h phi_1, B(h)) of one UniP-p (predictor) or UniC-p (corrector) update (Zhao et al. 2023).

    Alg. 2-3 there. rks: r_k = (lambda_{s_k} - lambda_{s_0}) / h of the order - 1 older points.
    Solves R rhos = b with R_pk = r_k^(p-1) (r = 1 appended), b_p = h phi_{p+1}(h) p! / B(h) for the
    data-prediction solver (hh = -h), B(h) = hh ("bh1") or e^hh - 1 ("bh2"); the predictor uses the
    first order - 1 rows and
    columns. UniP-2 and UniC-1 use rho = 1/2, as diffusers does. Float64 scalars.
    """
    hh = -h
    h_phi_1 = math.expm1(hh)
    b_h = hh if variant == "bh1" else math.expm1(hh)
    if predictor and order <= 2:
        return [0.5] * (order - 1), h_phi_1, b_h  # UniP-2: rho = 1/2 (diffusers' "simplified version")
    if not predictor and order == 1:
        return [0.5], h_phi_1, b_h  # UniC-1: rho = 1/2
    h_phi_k, factorial = h_phi_1 / hh - 1, 1
    rows, b = [], []
    for p in range(1, order + 1):
        rows.append([r ** (p - 1) for r in [*rks, 1.0]])
        b.append(h_phi_k * factorial / b_h)
        factorial *= p + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    r_mat, b_vec = torch.tensor(rows, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    if predictor:
        r_mat, b_vec = r_mat[:-1, :-1], b_vec[:-1]
    return torch.linalg.solve(r_mat, b_vec).tolist(), h_phi_1, b_h


def _differences(history: list[Tensor], lambdas: list[float], lam: float, h: float, order: int):
    """r_k = (lambda_{s_k} - lambda_{s_0}) / h and D1_k = (m_k - m_0) / r_k for the order - 1 older points."""
    rks, d1s = [], []
    for k in range(1, order):
        rk = (lambdas[-(k + 1)] - lam) / h
        rks.append(rk)
        d1s.append((history[-(k + 1)] - history[-1]) / rk)
    return rks, d1s


def unipc_step(
    x: Tensor,
    sigma: float,
    sigma_next: float,
    history: list[Tensor],
    lambdas: list[float],
    order: int,
    variant: str,
    denoised_next: Tensor | None = None,
) -> Tensor:
    """One UniP-p step sigma -> sigma_next, or with `denoised_next` the UniC-p correction of its result.

    history[-1] = D(x; sigma), history[-k-1] = D at the k-th older level, lambdas the matching -log sigma.
    Predictor: x_next = (sigma_next / sigma) x - h phi_1 D - B(h) sum_k rho_k D1_k (Zhao et al. 2023, Alg. 2).
    Corrector: the same with one more term rho_p (D(x_next) - D) and its own rhos (Alg. 3): order p + 1
    for the cost of no extra model call. x: (B, ...); sigma_next > 0.
    """
    lam = -math.log(sigma)
    h = -math.log(sigma_next) - lam
    rks, d1s = _differences(history, lambdas, lam, h, order)
    rhos, h_phi_1, b_h = _solve(rks, h, order, variant, predictor=denoised_next is None)
    out = (sigma_next / sigma) * x - h_phi_1 * history[-1]
    res = sum((rho * d for rho, d in zip(rhos, d1s)), torch.zeros_like(x))
    if denoised_next is not None:
        res = res + rhos[-1] * (denoised_next - history[-1])
    return out - b_h * res


@torch.no_grad()
def sample_unipc(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: Mapping[str, Any] | None = None,
    callback: Callback | None = None,
    generator: Generator = None,  # unused: UniPC is deterministic; kept for the shared signature
    disable: bool = False,
    order: int = 2,
    variant: str = "bh2",
    lower_order_final: bool = True,
    disable_corrector: Sequence[int] = (),
) -> Tensor:
    """UniPC-p (Zhao et al. 2023): UniP-p multistep predictor + UniC corrector, one model call per step.

    At step i the new D(x_i) first corrects x_i (UniC, using the point x_{i-1} and the history), then the
    predictor takes the corrected x_i to sigmas[i + 1]; the corrector raises the order by one at no
    extra model call. The first steps use the history they have; with `lower_order_final` the order
    drops to the steps left (diffusers' default), and a step to sigma = 0 returns D itself (the limit of
    every order there). `variant`: "bh2" (B(h) = e^h - 1, recommended for guided sampling) or "bh1"
    (B(h) = h, for unconditional). `disable_corrector`: step indices k whose result is not corrected
    at step k + 1 (diffusers' option; the paper skips it at the very first steps with big guidance).

    x: (B, ...) at sigmas[0]; returns x at sigmas[-1]. Raises UserError for order outside 1..3 or an
    unknown variant.
    """
    if not 1 <= int(order) <= 3:
        raise UserError(f"sample_unipc: order={order} must be 1, 2 or 3 (2 is the usual UniPC)")
    if variant not in VARIANTS:
        raise UserError(f"sample_unipc: variant={variant!r} is not one of {VARIANTS}")
    order, skip = int(order), {int(k) for k in disable_corrector}
    sigmas = sigmas.to(x.device)
    grid = sigmas.double().cpu().tolist()
    n = len(grid) - 1
    history: list[Tensor] = []
    lambdas: list[float] = []
    x_last, last_order = None, 0
    for i in step_range(sigmas, disable):
        denoised = call_denoiser(denoiser, x, sigmas[i], extra_args)
        if x_last is not None and (i - 1) not in skip:
            x = unipc_step(x_last, grid[i - 1], grid[i], history, lambdas, last_order, variant, denoised)
        history = (history + [denoised])[-order:]
        lambdas = (lambdas + [-math.log(grid[i])])[-order:]
        this_order = min(order, n - i) if lower_order_final else order
        this_order = min(this_order, len(history))
        x_last, last_order = x, this_order
        if grid[i + 1] == 0:
            x = denoised
        else:
            x = unipc_step(x, grid[i], grid[i + 1], history, lambdas, this_order, variant)
        x = after_step(callback, x, i, sigmas[i], sigmas[i + 1], denoised)
    return x
