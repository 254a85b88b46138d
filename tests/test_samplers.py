"""Samplers on Gaussian data, where the ideal denoiser and the exact ODE solution are closed form.

For x0 ~ N(mu, s^2 I) and x = x0 + sigma eps: D(x; sigma) = mu + s^2 / (s^2 + sigma^2) (x - mu), and the
probability-flow ODE dx/dsigma = (x - D) / sigma keeps (x - mu) / sqrt(s^2 + sigma^2) constant.
"""

import math

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ldm.diffusion import NoiseSchedule
from ldm.errors import UserError
from ldm.samplers import (
    ClassifierFreeGuidance,
    DiscreteDenoiser,
    StepSchedule,
    generators_from_seeds,
    inpaint_callback,
    randn,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
    sample_euler,
    sample_euler_ancestral,
    sample_plms,
    sigma_at,
    start_x,
    truncate_for_strength,
)
from ldm.samplers.sigmas import timesteps_leading, timesteps_trailing

CONF_DIR = __import__("pathlib").Path(__file__).resolve().parents[1] / "conf" / "sampler"
MU = torch.tensor([0.5, -0.3, 0.1, 0.0]).view(1, 4, 1, 1)
S = 0.5  # data std


class GaussianModel(torch.nn.Module):
    """The ideal discrete-time network for x0 ~ N(mu, s^2): E[eps | x_t] or E[v | x_t] at timestep t."""

    def __init__(self, alphas_cumprod, parameterization="eps", mu=MU, s=S):
        super().__init__()
        self.ac, self.parameterization, self.mu, self.s = alphas_cumprod, parameterization, mu, s
        self.calls = 0

    def forward(self, x_t, t, shift=None):
        self.calls += 1
        sigma_ve = sigma_at(self.ac, t.double()).to(x_t).view(-1, 1, 1, 1)
        alpha = (1 + sigma_ve**2).rsqrt()
        sigma = sigma_ve * alpha
        mu = self.mu if shift is None else self.mu + shift.view(-1, 1, 1, 1)
        resid = (x_t - alpha * mu) / (alpha**2 * self.s**2 + sigma**2)
        eps = sigma * resid
        if self.parameterization == "eps":
            return eps
        x0 = mu + alpha * self.s**2 * resid
        return alpha * eps - sigma * x0  # v


@pytest.fixture(scope="module")
def schedule():
    return NoiseSchedule()  # SD v1 scaled-linear


def denoiser_for(schedule, parameterization="eps", **kw):
    return DiscreteDenoiser(
        GaussianModel(schedule.alphas_cumprod, parameterization, **kw), schedule, parameterization
    )


def exact_ode(x_start, sigma_start, sigma_end, mu=MU, s=S):
    return mu + (x_start - mu) * math.sqrt(s**2 + sigma_end**2) / math.sqrt(s**2 + sigma_start**2)


def start_from_marginal(sigmas, n=1024, seed=0):
    """x ~ N(mu, s^2 + sigma_max^2): the exact marginal, so errors are the solver's alone."""
    noise = torch.randn(n, 4, 2, 2, generator=torch.Generator().manual_seed(seed))
    return MU + noise * math.sqrt(S**2 + float(sigmas[0]) ** 2)


def ode_error(sampler, schedule, steps, spacing="leading", parameterization="eps"):
    """RMS distance to the exact ODE solution from the same start."""
    sigmas = StepSchedule(steps, spacing)(schedule.alphas_cumprod)
    x = start_from_marginal(sigmas)
    out = sampler(denoiser_for(schedule, parameterization), x, sigmas, disable=True)
    return (out - exact_ode(x, float(sigmas[0]), 0.0)).pow(2).mean().sqrt().item()


def assert_data_distribution(out, atol_std=0.02):
    """Per-channel mean and std of N(mu, s^2); 4096 values per channel give standard errors 0.008 / 0.006."""
    torch.testing.assert_close(out.mean(dim=(0, 2, 3)), MU.flatten(), atol=0.03, rtol=0)
    torch.testing.assert_close(out.std(dim=(0, 2, 3)), torch.full((4,), S), atol=atol_std, rtol=0)


def test_step_schedule_values(schedule):
    ac = schedule.alphas_cumprod
    assert timesteps_leading(1000, 10).tolist() == [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]
    assert timesteps_trailing(1000, 4).tolist() == [999, 749, 499, 249]
    sig = StepSchedule(10, "leading", final="min")(ac)
    expected = (
        (1 - ac[[901, 801, 701, 601, 501, 401, 301, 201, 101, 1, 0]])
        / ac[[901, 801, 701, 601, 501, 401, 301, 201, 101, 1, 0]]
    ).sqrt()
    torch.testing.assert_close(sig, expected, rtol=1e-6, atol=0)
    assert StepSchedule(10)(ac)[-1] == 0 and len(StepSchedule(10)(ac)) == 11
    tu = StepSchedule(10, "time_uniform", final="min")(ac)
    torch.testing.assert_close(
        tu[[0, -1]], expected.new_tensor([((1 - ac[-1]) / ac[-1]).sqrt(), expected[-1]])
    )
    # DPM-Solver's t = 0.9001 is timestep 899.1: log alpha interpolated between 899 and 900.
    la = 0.9 * 0.5 * ac[899].double().log() + 0.1 * 0.5 * ac[900].double().log()
    torch.testing.assert_close(tu[1].double(), torch.expm1(-2 * la).sqrt(), rtol=1e-6, atol=0)
    k = StepSchedule(5, "karras")(ac)
    sigma_min, sigma_max = float(expected[-1]), float(((1 - ac[-1]) / ac[-1]).sqrt())
    ramp = torch.linspace(0, 1, 5, dtype=torch.float64)
    hand = (sigma_max ** (1 / 7) + ramp * (sigma_min ** (1 / 7) - sigma_max ** (1 / 7))) ** 7
    torch.testing.assert_close(k, torch.cat([hand.float(), torch.zeros(1)]))
    # img2img: strength 0.5 of 10 steps keeps the last 5 steps (6 levels).
    assert torch.equal(truncate_for_strength(sig, 0.5), sig[5:])
    with pytest.raises(UserError):
        truncate_for_strength(sig, 1.5)
    with pytest.raises(UserError):
        StepSchedule(10, "cosine")


def test_denoiser_maps_sigma_back_to_the_timestep(schedule):
    den = denoiser_for(schedule)
    t = torch.tensor([0.0, 1.0, 250.0, 899.1, 999.0])
    torch.testing.assert_close(den.sigma_to_t(sigma_at(schedule.alphas_cumprod, t)), t, atol=2e-4, rtol=0)
    quantized = DiscreteDenoiser(den.model, schedule, quantize=True)
    assert quantized.sigma_to_t(sigma_at(schedule.alphas_cumprod, torch.tensor([899.3]))).item() == 899.0
    # The ideal eps network gives the ideal denoiser D = mu + s^2/(s^2+sigma^2)(x - mu).
    x = torch.randn(3, 4, 2, 2)
    sigma = torch.tensor(2.5)
    torch.testing.assert_close(den(x, sigma), MU + S**2 / (S**2 + 2.5**2) * (x - MU), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(denoiser_for(schedule, "v")(x, sigma), den(x, sigma), rtol=1e-5, atol=1e-5)


def test_deterministic_samplers_follow_the_exact_ode(schedule):
    err = {
        (name, steps, spacing): ode_error(sampler, schedule, steps, spacing)
        for name, sampler, steps, spacing in [
            ("ddim", sample_ddim, 200, "leading"),
            ("dpmpp", sample_dpmpp_2m, 200, "leading"),
            ("ddim", sample_ddim, 20, "karras"),
            ("dpmpp", sample_dpmpp_2m, 20, "karras"),
            ("ddim", sample_ddim, 20, "time_uniform"),
            ("dpmpp", sample_dpmpp_2m, 20, "time_uniform"),
            ("plms", sample_plms, 20, "leading"),
            ("euler", sample_euler, 50, "karras"),
        ]
    }
    # RMS errors for data std 0.5; measured: 7.8e-3, 1.0e-4, 4.3e-2, 6.4e-3, 6.7e-2, 4.3e-2, 1.9e-4, 1.8e-2.
    assert err["ddim", 200, "leading"] < 0.015 and err["dpmpp", 200, "leading"] < 5e-4, err  # converge
    assert err["plms", 20, "leading"] < 2e-3 and err["euler", 50, "karras"] < 0.03, err
    # At 20 steps the second-order DPM-Solver++ is closer to the exact solution than DDIM.
    assert err["dpmpp", 20, "karras"] < err["ddim", 20, "karras"] / 4, err
    assert err["dpmpp", 20, "time_uniform"] < 0.8 * err["ddim", 20, "time_uniform"], err
    # Euler with no churn is DDIM with eta 0 (Karras et al. 2022, Sec. 4).
    sigmas = StepSchedule(10)(schedule.alphas_cumprod)
    x = start_from_marginal(sigmas, n=16)
    euler = sample_euler(denoiser_for(schedule), x, sigmas, disable=True)
    torch.testing.assert_close(euler, sample_ddim(denoiser_for(schedule), x, sigmas, disable=True))


def test_samples_have_the_data_mean_and_variance(schedule):
    sigmas = StepSchedule(200)(schedule.alphas_cumprod)
    x = start_from_marginal(sigmas)
    for sampler in (sample_ddim, sample_dpmpp_2m, sample_plms):
        assert_data_distribution(sampler(denoiser_for(schedule), x, sigmas, disable=True))


@pytest.mark.parametrize(
    "sampler, steps, spacing, opts",
    [
        (sample_ddpm, 200, "karras", {}),
        (sample_euler_ancestral, 200, "karras", {}),
        (sample_ddim, 200, "karras", {"eta": 0.5}),
        (sample_euler, 200, "karras", {"s_churn": 5.0}),
        (sample_dpmpp_2m, 50, "karras", {"eta": 1.0}),
    ],
)
def test_stochastic_samplers_reach_the_data_distribution(schedule, sampler, steps, spacing, opts):
    # First-order ancestral steps shrink the variance by O(1/steps): ~3% at 100 Karras steps, ~1% at 200.
    sigmas = StepSchedule(steps, spacing)(schedule.alphas_cumprod)
    x = start_from_marginal(sigmas)
    gen = torch.Generator().manual_seed(1)
    assert_data_distribution(sampler(denoiser_for(schedule), x, sigmas, disable=True, generator=gen, **opts))


@pytest.mark.parametrize("sampler", [sample_ddim, sample_dpmpp_2m, sample_plms, sample_euler])
def test_v_prediction_gives_the_eps_result(schedule, sampler):
    sigmas = StepSchedule(15)(schedule.alphas_cumprod)
    x = start_from_marginal(sigmas, n=64)
    out_eps = sampler(denoiser_for(schedule, "eps"), x, sigmas, disable=True)
    out_v = sampler(denoiser_for(schedule, "v"), x, sigmas, disable=True)
    torch.testing.assert_close(out_v, out_eps, rtol=1e-4, atol=1e-4)


def test_zero_terminal_snr_v_model_samples_from_pure_noise():
    schedule = NoiseSchedule(zero_terminal_snr=True)
    sigmas = StepSchedule(50, "trailing")(schedule.alphas_cumprod)
    assert 4000 < sigmas[0] < 4200  # a_T = 0 is sampled at a_T = 2^-24
    noise = torch.randn(1024, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    x = start_x(noise, sigmas[0])  # pure noise: the exact prior when the terminal SNR is 0
    for sampler, max_rms in ((sample_ddim, 0.05), (sample_dpmpp_2m, 0.03)):
        out = sampler(denoiser_for(schedule, "v"), x, sigmas, disable=True)
        rms = (out - exact_ode(x, float(sigmas[0]), 0.0)).pow(2).mean().sqrt()
        assert rms < max_rms, (sampler.__name__, rms)
        assert_data_distribution(out, atol_std=0.04)


def test_ddim_with_eta_is_euler_ancestral(schedule):
    sigmas = StepSchedule(10)(schedule.alphas_cumprod)
    x = start_from_marginal(sigmas, n=8)
    a = sample_ddim(
        denoiser_for(schedule), x, sigmas, eta=1.0, generator=torch.Generator().manual_seed(3), disable=True
    )
    b = sample_euler_ancestral(
        denoiser_for(schedule), x, sigmas, generator=torch.Generator().manual_seed(3), disable=True
    )
    c = sample_ddpm(
        denoiser_for(schedule), x, sigmas, generator=torch.Generator().manual_seed(3), disable=True
    )
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert torch.equal(a, c)


@pytest.mark.parametrize(
    "sampler, opts",
    [
        (sample_ddpm, {}),
        (sample_euler_ancestral, {}),
        (sample_ddim, {"eta": 0.7}),
        (sample_euler, {"s_churn": 5.0}),
        (sample_dpmpp_2m, {"eta": 1.0}),
    ],
)
def test_per_image_generators_make_samples_batch_size_independent(schedule, sampler, opts):
    sigmas = StepSchedule(8)(schedule.alphas_cumprod)
    seeds = [11, 22, 33, 44]
    gens = generators_from_seeds(seeds)
    x = start_x(randn((4, 4, 2, 2), gens), sigmas[0])
    batch = sampler(denoiser_for(schedule), x, sigmas, generator=gens, disable=True, **opts)
    for k, seed in enumerate(seeds):
        gen = generators_from_seeds([seed])
        xk = start_x(randn((1, 4, 2, 2), gen), sigmas[0])
        assert torch.equal(xk, x[k : k + 1])
        single = sampler(denoiser_for(schedule), xk, sigmas, generator=gen, disable=True, **opts)
        torch.testing.assert_close(single, batch[k : k + 1], rtol=1e-6, atol=1e-6)
    # and a different seed gives a different sample
    other = sampler(
        denoiser_for(schedule), x, sigmas, generator=generators_from_seeds([5, 6, 7, 8]), disable=True, **opts
    )
    assert (other - batch).abs().max() > 1e-2
    with pytest.raises(UserError):
        randn((3, 4), gens)


def test_guidance_combines_cond_and_uncond_in_one_call(schedule):
    model = GaussianModel(schedule.alphas_cumprod)
    den = DiscreteDenoiser(model, schedule)
    x, sigma = torch.randn(2, 4, 2, 2), torch.tensor(3.0)
    cond, uncond = {"shift": torch.tensor([1.0, -1.0])}, {"shift": torch.zeros(1)}
    d_c, d_u = den(x, sigma, **cond), den(x, sigma, shift=torch.zeros(2))
    model.calls = 0
    guided = ClassifierFreeGuidance(den, scale=4.0, uncond=uncond)(x, sigma, **cond)
    assert model.calls == 1  # cond and uncond batched into a single forward
    torch.testing.assert_close(guided, d_u + 4.0 * (d_c - d_u), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ClassifierFreeGuidance(den, 1.0, uncond)(x, sigma, **cond), d_c)
    with pytest.raises(UserError):
        ClassifierFreeGuidance(den, 2.0, {"other": torch.zeros(1)})(x, sigma, **cond)
    # Guiding a mean shift of 0.2 with scale 2 gives the Gaussian denoiser of mean mu + 0.4: sampling
    # follows that Gaussian's exact ODE.
    sigmas = StepSchedule(20, "karras")(schedule.alphas_cumprod)
    xs = start_from_marginal(sigmas, n=256)
    guided = ClassifierFreeGuidance(den, 2.0, {"shift": torch.zeros(1)})
    out = sample_dpmpp_2m(guided, xs, sigmas, extra_args={"shift": torch.full((256,), 0.2)}, disable=True)
    exact = exact_ode(xs, float(sigmas[0]), 0.0, mu=MU + 0.4)
    assert (out - exact).pow(2).mean().sqrt() < 0.02


def test_callback_sees_every_step_and_can_replace_x(schedule):
    sigmas = StepSchedule(6)(schedule.alphas_cumprod)
    x = start_from_marginal(sigmas, n=4)
    seen = []
    sample_dpmpp_2m(denoiser_for(schedule), x, sigmas, callback=lambda info: seen.append(info), disable=True)
    assert [info["i"] for info in seen] == list(range(6))
    assert torch.equal(torch.stack([info["sigma_next"] for info in seen]), sigmas[1:])
    assert seen[-1]["x"].shape == x.shape and seen[-1]["denoised"].shape == x.shape
    # inpainting: the kept region (mask 0) ends exactly at the known latents, the rest is generated.
    known = torch.full((4, 4, 2, 2), 3.0)
    mask = torch.zeros(1, 1, 2, 2)
    mask[..., 0, :] = 1
    for sampler in (sample_ddim, sample_plms, sample_euler_ancestral, sample_dpmpp_2m):
        cb = inpaint_callback(known, mask, torch.Generator().manual_seed(0))
        out = sampler(denoiser_for(schedule), x, sigmas, callback=cb, disable=True)
        assert torch.equal(out[..., 1, :], known[..., 1, :])
        assert (out[..., 0, :] - 3.0).abs().min() > 1e-3


def test_img2img_strength_sets_how_much_of_the_input_survives(schedule):
    full = StepSchedule(20)(schedule.alphas_cumprod)
    x0 = MU + S * torch.randn(256, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(256, 4, 2, 2, generator=torch.Generator().manual_seed(1))
    mse = {}
    for strength in (0.15, 0.3, 1.0):
        sigmas = truncate_for_strength(full, strength)
        assert len(sigmas) == int(strength * 20) + 1
        x = start_x(noise, sigmas[0], x0=x0)
        torch.testing.assert_close(x, x0 + float(sigmas[0]) * noise)
        out = sample_ddim(denoiser_for(schedule), x, sigmas, disable=True)
        # the ODE maps x0 + sigma eps to mu + (x - mu) s / sqrt(s^2 + sigma^2)
        assert (out - exact_ode(x, float(sigmas[0]), 0.0)).pow(2).mean().sqrt() < 0.06
        mse[strength] = (out - x0).pow(2).mean().item()
    assert mse[0.15] < mse[0.3] < mse[1.0], mse
    assert mse[0.15] < 0.3 * mse[1.0], mse


@pytest.mark.parametrize("name", ["ddpm", "ddim", "plms", "dpmpp_2m", "euler", "euler_a"])
def test_sampler_configs_instantiate_to_working_samplers(schedule, name):
    cfg = OmegaConf.load(CONF_DIR / f"{name}.yaml")
    sampler = instantiate(cfg)
    sigmas = StepSchedule(25)(schedule.alphas_cumprod)
    x = start_from_marginal(sigmas)
    out = sampler(denoiser_for(schedule), x, sigmas, generator=torch.Generator().manual_seed(0), disable=True)
    torch.testing.assert_close(out.mean(dim=(0, 2, 3)), MU.flatten(), atol=0.03, rtol=0)
