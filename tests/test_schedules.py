"""Noise schedules: hand-computed values, the SD v1 reference table, zero-terminal SNR, SNR helpers."""

import math

import pytest
import torch
from hydra.utils import instantiate
from safetensors.torch import load_file

from ldm.diffusion import (
    NoiseSchedule,
    cosine_betas,
    linear_betas,
    make_alphas_cumprod,
    rescale_zero_terminal_snr,
    scaled_linear_betas,
)
from ldm.errors import UserError


def test_sd_scaled_linear_equals_the_compvis_reference_table(reference_dir):
    ref = load_file(str(reference_dir / "sd_v1_tiny.safetensors"))["io.alphas_cumprod"]
    schedule = NoiseSchedule("scaled_linear", 1000, 0.00085, 0.012)
    assert schedule.alphas_cumprod.dtype == torch.float32
    torch.testing.assert_close(schedule.alphas_cumprod, ref, rtol=0, atol=0)


def test_beta_schedules_match_hand_computed_values():
    betas = linear_betas(5, 0.1, 0.5)
    torch.testing.assert_close(betas, torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5], dtype=torch.float64))
    ac = make_alphas_cumprod("linear", 5, 0.1, 0.5)
    torch.testing.assert_close(ac[:3], torch.tensor([0.9, 0.9 * 0.8, 0.9 * 0.8 * 0.7]))

    sl = scaled_linear_betas(3, 0.01, 0.09)  # sqrt: 0.1, 0.2, 0.3
    torch.testing.assert_close(sl, torch.tensor([0.01, 0.04, 0.09], dtype=torch.float64))
    sd = scaled_linear_betas(1000)
    torch.testing.assert_close(sd[[0, -1]], torch.tensor([0.00085, 0.012], dtype=torch.float64))

    # cosine, T = 4, s = 0.008: alphas_cumprod[t] = f(t+1)/f(0), the last beta clipped to 0.999
    f = lambda t: math.cos((t / 4 + 0.008) / 1.008 * math.pi / 2) ** 2
    expected = [f(1) / f(0), f(2) / f(0), f(3) / f(0)]
    ac = make_alphas_cumprod("cosine", 4)
    torch.testing.assert_close(ac[:3], torch.tensor(expected, dtype=torch.float32))
    assert cosine_betas(4)[-1].item() == pytest.approx(0.999)
    torch.testing.assert_close(ac[3], ac[2] * (1 - 0.999))


def test_zero_terminal_snr_rescaling():
    ac = make_alphas_cumprod("scaled_linear", 1000)
    zt = rescale_zero_terminal_snr(ac)
    assert zt[-1].item() == 0.0
    torch.testing.assert_close(zt[0], ac[0])  # the first step is kept
    assert (zt[1:] < zt[:-1]).all()  # still decreasing
    # sqrt(a) is shifted and scaled linearly (Lin et al. 2024, Alg. 1): check one interior point by hand.
    s0, sT, s = ac[0].double().sqrt(), ac[-1].double().sqrt(), ac[500].double().sqrt()
    torch.testing.assert_close(zt[500].double(), ((s - sT) * s0 / (s0 - sT)) ** 2, rtol=1e-6, atol=0)
    schedule = NoiseSchedule(zero_terminal_snr=True)
    assert schedule.snr()[-1] == 0 and schedule.log_snr()[-1] == -math.inf
    assert math.isinf(schedule.sigmas()[-1])


def test_snr_sigma_and_alpha_sigma_helpers():
    schedule = NoiseSchedule()
    a = schedule.alphas_cumprod
    t = torch.tensor([0, 10, 500, 999])
    torch.testing.assert_close(schedule.snr(t), a[t] / (1 - a[t]))
    torch.testing.assert_close(schedule.log_snr(t), torch.log(a[t] / (1 - a[t])))
    torch.testing.assert_close(schedule.sigmas()[t] ** 2, 1 / schedule.snr(t))  # VE sigma^2 = 1/SNR
    alpha, sigma = schedule.alpha_sigma(t)
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones(4))
    torch.testing.assert_close(alpha, a[t].sqrt())
    x0, noise = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)
    x_t = schedule.add_noise(x0, noise, t)
    torch.testing.assert_close(
        x_t, a[t].sqrt().view(-1, 1, 1, 1) * x0 + (1 - a[t]).sqrt().view(-1, 1, 1, 1) * noise
    )
    assert schedule.snr().shape == (1000,) and (schedule.snr()[1:] < schedule.snr()[:-1]).all()
    # SD v1 end points (the sigma range samplers see): sigma(0) ~ 0.0292, sigma(999) ~ 14.61
    assert schedule.sigmas()[0].item() == pytest.approx(0.02916, abs=1e-4)
    assert schedule.sigmas()[-1].item() == pytest.approx(14.6146, abs=1e-3)


def test_schedule_is_hydra_instantiable_and_validates():
    schedule = instantiate({"_target_": "ldm.diffusion.NoiseSchedule", "kind": "cosine", "num_timesteps": 50})
    assert schedule.num_timesteps == 50 and schedule.kind == "cosine"
    assert "alphas_cumprod" not in schedule.state_dict()  # defined by the config, not stored
    with pytest.raises(UserError, match="scaled_linear"):
        NoiseSchedule(kind="sqrt_linear")
    custom = NoiseSchedule.from_alphas_cumprod(torch.linspace(0.99, 0.01, 10))
    assert custom.num_timesteps == 10 and custom.alphas_cumprod[0].item() == pytest.approx(0.99)
