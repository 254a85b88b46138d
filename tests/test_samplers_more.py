"""Heun, DPM++ 2S ancestral, DPM++ SDE, DPM++ 2M SDE, LMS and UniPC: closed-form checks and cross-checks.

Closed form as in test_samplers.py: for x0 ~ N(mu, s^2) the ideal denoiser and the exact probability-flow
ODE solution are known, so solver errors, sample statistics and exact identities between samplers are
measured against the truth. Cross-checks: each sampler against diffusers' scheduler for the same
algorithm on the tiny SD-v1 UNet of ../shared/reference (classifier-free guidance 3), same noise levels,
same x_T and the same noise, to 1e-4 relative.
"""

import json
import math

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from test_samplers import (
    CONF_DIR,
    MU,
    GaussianModel,
    assert_data_distribution,
    denoiser_for,
    ode_error,
    start_from_marginal,
)

from ldm.diffusion import NoiseSchedule
from ldm.errors import UserError
from ldm.samplers import (
    BrownianNoise,
    ClassifierFreeGuidance,
    DiscreteDenoiser,
    StepSchedule,
    ancestral_step,
    generators_from_seeds,
    inpaint_callback,
    randn,
    sample_ddim,
    sample_dpmpp_2m,
    sample_dpmpp_2m_sde,
    sample_dpmpp_2s_ancestral,
    sample_dpmpp_sde,
    sample_euler,
    sample_heun,
    sample_lms,
    sample_unipc,
    start_x,
    to_variance_preserving,
)
from ldm.samplers.lms import lms_coefficient

NEW = {
    "heun": sample_heun,
    "dpmpp_2s_a": sample_dpmpp_2s_ancestral,
    "dpmpp_sde": sample_dpmpp_sde,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "lms": sample_lms,
    "unipc": sample_unipc,
}


@pytest.fixture(scope="module")
def schedule():
    return NoiseSchedule()  # SD v1 scaled-linear


def test_second_order_samplers_follow_the_exact_ode(schedule):
    s2 = lambda *a, **k: sample_dpmpp_2s_ancestral(*a, eta=0.0, **k)  # noqa: E731
    samplers = {"ddim": sample_ddim, "heun": sample_heun, "lms": sample_lms, "unipc": sample_unipc, "2s": s2}
    err = {(name, n): ode_error(fn, schedule, n, "karras") for name, fn in samplers.items() for n in (10, 20)}
    # RMS error for data std 0.5; measured 10 / 20 Karras steps: ddim 8.6e-2 / 4.3e-2, heun 3.4e-2 / 6.5e-3,
    # lms 3.0e-2 / 3.7e-3, unipc 2.9e-2 / 2.7e-3, 2s 1.6e-2 / 4.6e-3.
    for name in ("heun", "lms", "unipc", "2s"):
        assert err[name, 20] < 8e-3, (name, err)
        assert err[name, 20] < err["ddim", 20] / 5, (name, err)  # higher order than DDIM at equal steps
        assert err[name, 10] / err[name, 20] > 3.0, (name, err)  # 2 x the steps: > 3 x smaller
    assert err["ddim", 10] / err["ddim", 20] < 2.1, err  # first order: about 2 x
    # 200 leading steps: LMS (4th order) is near exact; measured 3.3e-6 (DDIM 7.8e-3).
    assert ode_error(sample_lms, schedule, 200, "leading") < 2e-5


def test_exact_identities_between_samplers(schedule):
    sigmas = StepSchedule(12, "karras")(schedule.alphas_cumprod)
    x = start_from_marginal(sigmas, n=64)
    run = lambda fn, **kw: fn(denoiser_for(schedule), x, sigmas, disable=True, **kw)  # noqa: E731
    ddim = run(sample_ddim)
    # First order: LMS-1 is Euler; UniP-1 without corrector is DPM-Solver++(1); both are DDIM.
    torch.testing.assert_close(run(sample_lms, order=1), run(sample_euler), rtol=0, atol=0)
    torch.testing.assert_close(run(sample_lms, order=1), ddim, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        run(sample_unipc, order=1, disable_corrector=range(12)), ddim, rtol=1e-5, atol=1e-5
    )
    # The corrector changes the result (UniC-1 is second order): measured RMS change 3.5e-2.
    assert (run(sample_unipc, order=1) - ddim).pow(2).mean().sqrt() > 5e-3
    # DPM++ SDE with eta 0 and r = 1/2 is DPM++ 2S (deterministic); 2M SDE with eta 0 is DPM++ 2M.
    s2 = run(sample_dpmpp_2s_ancestral, eta=0.0)
    torch.testing.assert_close(run(sample_dpmpp_sde, eta=0.0), s2, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(run(sample_dpmpp_2m_sde, eta=0.0), run(sample_dpmpp_2m), rtol=1e-6, atol=1e-6)
    # With noise, 2M SDE (midpoint) is the existing sample_dpmpp_2m(eta=1) given the same generator.
    a = run(sample_dpmpp_2m_sde, generator=torch.Generator().manual_seed(4))
    b = run(sample_dpmpp_2m, eta=1.0, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "name, steps, opts",
    [
        ("dpmpp_2s_a", 100, {}),
        ("dpmpp_sde", 50, {}),
        ("dpmpp_2m_sde", 50, {}),
        ("dpmpp_2m_sde", 50, {"solver_type": "heun"}),
        ("heun", 50, {"s_churn": 5.0}),
    ],
)
def test_stochastic_samplers_reach_the_data_distribution(schedule, name, steps, opts):
    sigmas = StepSchedule(steps, "karras")(schedule.alphas_cumprod)
    x = start_from_marginal(sigmas)
    out = NEW[name](
        denoiser_for(schedule), x, sigmas, disable=True, generator=torch.Generator().manual_seed(1), **opts
    )
    assert_data_distribution(out)


@pytest.mark.parametrize("name", ["heun", "lms", "unipc", "dpmpp_2s_a"])
def test_v_prediction_gives_the_eps_result(schedule, name):
    sigmas = StepSchedule(12)(schedule.alphas_cumprod)
    x = start_from_marginal(sigmas, n=64)
    opts = {"eta": 0.0} if name == "dpmpp_2s_a" else {}
    out_eps = NEW[name](denoiser_for(schedule, "eps"), x, sigmas, disable=True, **opts)
    out_v = NEW[name](denoiser_for(schedule, "v"), x, sigmas, disable=True, **opts)
    torch.testing.assert_close(out_v, out_eps, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "name, opts",
    [("dpmpp_2s_a", {}), ("dpmpp_sde", {}), ("dpmpp_2m_sde", {}), ("heun", {"s_churn": 5.0})],
)
def test_per_image_generators_make_samples_batch_size_independent(schedule, name, opts):
    sampler = NEW[name]
    sigmas = StepSchedule(8, "karras")(schedule.alphas_cumprod)
    seeds = [11, 22, 33]
    gens = generators_from_seeds(seeds)
    x = start_x(randn((3, 4, 2, 2), gens), sigmas[0])
    batch = sampler(denoiser_for(schedule), x, sigmas, generator=gens, disable=True, **opts)
    for k, seed in enumerate(seeds):
        gen = generators_from_seeds([seed])
        xk = start_x(randn((1, 4, 2, 2), gen), sigmas[0])  # the same draw as row k of the batch
        assert torch.equal(xk, x[k : k + 1])
        single = sampler(denoiser_for(schedule), xk, sigmas, generator=gen, disable=True, **opts)
        torch.testing.assert_close(single, batch[k : k + 1], rtol=1e-6, atol=1e-6)
    gens = generators_from_seeds(seeds)
    x = start_x(randn((3, 4, 2, 2), gens), sigmas[0])
    again = sampler(denoiser_for(schedule), x, sigmas, generator=gens, disable=True, **opts)
    assert torch.equal(again, batch)  # same seeds: bit-identical
    x = start_x(randn((3, 4, 2, 2), generators_from_seeds(seeds)), sigmas[0])
    other = sampler(
        denoiser_for(schedule), x, sigmas, generator=generators_from_seeds([5, 6, 7]), disable=True, **opts
    )
    assert (other - batch).abs().max() > 1e-2


@pytest.mark.parametrize(
    "name, calls",
    [("heun", 11), ("dpmpp_2s_a", 11), ("dpmpp_sde", 11), ("dpmpp_2m_sde", 6), ("lms", 6), ("unipc", 6)],
)
def test_model_calls_callback_and_inpainting(schedule, name, calls):
    """6 steps: the two-stage samplers evaluate twice per step except the last (to sigma 0), the rest once."""
    model = GaussianModel(schedule.alphas_cumprod)
    den = DiscreteDenoiser(model, schedule)
    sigmas = StepSchedule(6)(schedule.alphas_cumprod)
    x = start_from_marginal(sigmas, n=4)
    seen = []
    NEW[name](den, x, sigmas, callback=seen.append, generator=torch.Generator().manual_seed(0), disable=True)
    assert model.calls == calls
    assert [info["i"] for info in seen] == list(range(6))
    assert torch.equal(torch.stack([info["sigma_next"] for info in seen]), sigmas[1:])
    assert seen[-1]["denoised"].shape == x.shape
    # inpainting through the callback: the kept region (mask 0) ends exactly at the known latents.
    known = torch.full((4, 4, 2, 2), 3.0)
    mask = torch.zeros(1, 1, 2, 2)
    mask[..., 0, :] = 1
    cb = inpaint_callback(known, mask, torch.Generator().manual_seed(0))
    out = NEW[name](den, x, sigmas, callback=cb, generator=torch.Generator().manual_seed(0), disable=True)
    assert torch.equal(out[..., 1, :], known[..., 1, :])
    assert (out[..., 0, :] - 3.0).abs().min() > 1e-3


def test_brownian_noise_has_brownian_increments():
    like = torch.zeros(200_000)
    noise = BrownianNoise(like, torch.Generator().manual_seed(0))
    a = noise(10.0, 2.0)  # stage 2's interval first, then one inside it (a bridge draw)
    b = noise(10.0, 6.0)
    c = noise(2.0, 1.0)  # the next step: independent of the past
    for z in (a, b, c):
        assert abs(z.mean().item()) < 0.01 and abs(z.std().item() - 1) < 0.01
    # corr(W(6)-W(10), W(2)-W(10)) = sqrt(4 / 8): the overlap of the intervals
    assert abs((a * b).mean().item() - math.sqrt(0.5)) < 0.01
    assert abs((a * c).mean().item()) < 0.01
    again = BrownianNoise(like, torch.Generator().manual_seed(0))
    assert torch.equal(again(10.0, 2.0), a) and torch.equal(again(10.0, 6.0), b)
    with pytest.raises(UserError):
        noise(3.0, 3.0)


def test_lms_coefficients_integrate_the_interpolating_polynomial():
    # Order 1: the whole step; order 2 on a uniform grid: Adams-Bashforth 3/2, -1/2 (times the step -1).
    grid = [4.0, 3.0, 2.0, 1.0, 0.0]
    assert lms_coefficient(grid, 0, 0, 1) == pytest.approx(-1.0, abs=1e-12)
    assert [lms_coefficient(grid, 1, j, 2) for j in range(2)] == pytest.approx([-1.5, 0.5], abs=1e-12)
    ab4 = [-55 / 24, 59 / 24, -37 / 24, 9 / 24]  # 4-step Adams-Bashforth
    assert [lms_coefficient(grid, 3, j, 4) for j in range(4)] == pytest.approx(ab4, abs=1e-12)


def test_bad_options_raise_user_errors(schedule):
    sigmas = StepSchedule(4)(schedule.alphas_cumprod)
    x = start_from_marginal(sigmas, n=2)
    den = denoiser_for(schedule)
    for fn, opts, word in [
        (sample_lms, {"order": 0}, "order=0"),
        (sample_unipc, {"order": 4}, "order=4"),
        (sample_unipc, {"variant": "bh3"}, "bh3"),
        (sample_dpmpp_sde, {"r": 0.0}, "r=0.0"),
        (sample_dpmpp_2m_sde, {"solver_type": "euler"}, "euler"),
    ]:
        with pytest.raises(UserError, match=word):
            fn(den, x, sigmas, disable=True, **opts)


@pytest.mark.parametrize("name", sorted(NEW))
def test_sampler_configs_instantiate_and_are_named_in_the_pipeline(schedule, name):
    from ldm.pipeline import SAMPLERS, describe_sampler, sampler_function

    sampler = instantiate(OmegaConf.load(CONF_DIR / f"{name}.yaml"))
    assert sampler.func is NEW[name] and SAMPLERS[name] is NEW[name]
    assert describe_sampler(sampler_function(name))["function"] == NEW[name].__name__
    sigmas = StepSchedule(25, "karras")(schedule.alphas_cumprod)
    x = start_from_marginal(sigmas)
    out = sampler(denoiser_for(schedule), x, sigmas, generator=torch.Generator().manual_seed(0), disable=True)
    torch.testing.assert_close(out.mean(dim=(0, 2, 3)), MU.flatten(), atol=0.03, rtol=0)


# ---- cross-checks against diffusers' schedulers on the tiny SD-v1 UNet --------------------------------

SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
CFG = 3.0
STEPS = 8  # sampler steps of the cross-checks
PREFIX = "model.diffusion_model."


@pytest.fixture(scope="module")
def unet_io(reference_dir):
    from safetensors import safe_open
    from safetensors.torch import load_file

    from ldm.modules.unet import UNetModel

    path = reference_dir / "sd_v1_tiny.safetensors"
    with safe_open(str(path), "pt") as f:
        config = json.loads(f.metadata()["unet"])
    io = load_file(str(path))
    unet = UNetModel.from_compvis_config(config).eval()
    unet.load_state_dict({k[len(PREFIX) :]: v.float() for k, v in io.items() if k.startswith(PREFIX)})
    return unet, io


class Run:
    """Our sampler and a hand-written diffusers loop (scheduler + UNet + batched CFG) on the same inputs.

    The loop hands the UNet the timestep our DiscreteDenoiser uses for the scheduler's current sigma, so
    the comparison isolates the update rules: diffusers maps fractional levels to timesteps linearly in
    log sigma, we in log alpha (sigmas.py); here that alone is small (DPMSolverSDE with its own timesteps:
    5.8e-7), and the single-step runs below carry placeholder timesteps.
    """

    def __init__(self, unet_io):
        self.unet, io = unet_io
        self.ctx, self.unc, self.x_T = (io[f"io.{k}"] for k in ("context", "uncond_context", "x_T"))
        self.den = DiscreteDenoiser(self.unet, NoiseSchedule(), "eps")
        self.guided = ClassifierFreeGuidance(self.den, CFG, {"context": self.unc})

    def ours(self, sampler, sigmas, **opts):
        x = start_x(self.x_T, sigmas[0])
        return sampler(self.guided, x, sigmas, extra_args={"context": self.ctx}, disable=True, **opts)

    @torch.no_grad()
    def diffusers(self, sch, latents, **step_kwargs):
        both = torch.cat([self.unc, self.ctx])
        for t in sch.timesteps:
            idx = sch.step_index or 0
            midpoint = getattr(sch, "mid_point_sigma", None)  # DPMSolverSDE's second stage
            sigma = midpoint if midpoint is not None and not sch.state_in_first_order else sch.sigmas[idx]
            t_model = self.den.sigma_to_t(torch.as_tensor(sigma).float().reshape(1)).expand(len(both))
            inp = sch.scale_model_input(torch.cat([latents, latents]), t)
            eps_u, eps_c = self.unet(inp, t_model, context=both).chunk(2)
            latents = sch.step(eps_u + CFG * (eps_c - eps_u), t, latents, **step_kwargs).prev_sample
        return latents


def rel_diff(ours, theirs):
    assert theirs.abs().max() > 0.5 and torch.isfinite(theirs).all()  # a real sample
    return ((ours - theirs).norm() / theirs.norm()).item()


def ve_levels(sch):
    """The distinct noise levels of a Heun / DPMSolverSDE scheduler (it repeats each for its 2 stages)."""
    return torch.cat([sch.sigmas[0::2], torch.zeros(1)])


def test_heun_and_lms_match_diffusers(unet_io):
    from diffusers import HeunDiscreteScheduler, LMSDiscreteScheduler

    run = Run(unet_io)
    ours_sigmas = StepSchedule(STEPS, "leading")(NoiseSchedule().alphas_cumprod)
    heun = HeunDiscreteScheduler(**SD_BETAS, timestep_spacing="leading", steps_offset=1)
    heun.set_timesteps(STEPS)
    lms = LMSDiscreteScheduler(**SD_BETAS, timestep_spacing="leading", steps_offset=1)
    lms.set_timesteps(STEPS)
    torch.testing.assert_close(ve_levels(heun), ours_sigmas, rtol=1e-6, atol=0)  # the same 10 levels
    torch.testing.assert_close(lms.sigmas, ours_sigmas, rtol=1e-6, atol=0)
    # measured: heun 1.1e-6, lms 1.1e-6
    theirs = run.diffusers(heun, run.x_T * heun.init_noise_sigma)
    assert rel_diff(run.ours(sample_heun, ours_sigmas), theirs) < 1e-4
    theirs = run.diffusers(lms, run.x_T * lms.init_noise_sigma)  # step(order=4) is its default
    assert rel_diff(run.ours(sample_lms, ours_sigmas), theirs) < 1e-4


def test_dpmpp_sde_matches_diffusers_with_the_same_brownian_tree(unet_io):
    pytest.importorskip("torchsde", reason="diffusers' DPMSolverSDEScheduler needs torchsde")
    from diffusers import DPMSolverSDEScheduler
    from diffusers.schedulers.scheduling_dpmsolver_sde import BrownianTreeNoiseSampler

    run = Run(unet_io)
    sch = DPMSolverSDEScheduler(**SD_BETAS, timestep_spacing="leading", steps_offset=1)
    sch.set_timesteps(STEPS)
    sigmas = ve_levels(sch)  # bit-identical levels: the tree's queries must be the same floats
    lo, hi = sigmas[sigmas > 0].min().item(), sigmas.max().item()
    x = start_x(run.x_T, sigmas[0])
    sch.noise_sampler = BrownianTreeNoiseSampler(x, lo, hi, [1, 2])  # one seeded tree per image, both sides
    theirs = run.diffusers(sch, run.x_T * sch.init_noise_sigma)
    ours = run.ours(sample_dpmpp_sde, sigmas, noise_sampler=BrownianTreeNoiseSampler(x, lo, hi, [1, 2]))
    assert rel_diff(ours, theirs) < 1e-4  # measured 4.0e-7
    # and it is stochastic: another tree gives another sample
    other = run.ours(sample_dpmpp_sde, sigmas, noise_sampler=BrownianTreeNoiseSampler(x, lo, hi, [3, 4]))
    assert rel_diff(other, theirs) > 1e-2


@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
def test_dpmpp_2m_sde_matches_diffusers_with_the_same_generator(unet_io, solver_type):
    from diffusers import DPMSolverMultistepScheduler

    run = Run(unet_io)
    sch = DPMSolverMultistepScheduler(
        **SD_BETAS, algorithm_type="sde-dpmsolver++", solver_order=2, solver_type=solver_type
    )
    sch.set_timesteps(15)  # >= 15 steps: diffusers lowers no order but the last (to sigma 0: D either way)
    # diffusers draws torch.randn(shape, generator=g) once per step, as our sampler does with one generator
    theirs = run.diffusers(sch, run.x_T, generator=torch.Generator().manual_seed(5))
    ours = run.ours(
        sample_dpmpp_2m_sde,
        sch.sigmas.clone(),
        solver_type=solver_type,
        generator=torch.Generator().manual_seed(5),
    )
    assert rel_diff(ours, theirs) < 1e-4  # measured 4.8e-7 (midpoint), 4.7e-7 (heun)


@pytest.mark.parametrize(
    "order, variant, final",
    [(2, "bh2", "zero"), (3, "bh2", "zero"), (1, "bh2", "zero"), (2, "bh1", "sigma_min")],
)
def test_unipc_matches_diffusers(unet_io, order, variant, final):
    """bh1 runs to sigma_min: diffusers' bh1 gives NaN on a final step to sigma = 0 (B(h) = -inf times 0)."""
    from diffusers import UniPCMultistepScheduler

    run = Run(unet_io)
    sch = UniPCMultistepScheduler(
        **SD_BETAS, solver_order=order, solver_type=variant, final_sigmas_type=final
    )
    sch.set_timesteps(STEPS)
    sigmas = sch.sigmas.clone()
    theirs = run.diffusers(sch, run.x_T)  # VP latents; at sigma 0 the same as ours
    ours = to_variance_preserving(run.ours(sample_unipc, sigmas, order=order, variant=variant), sigmas[-1])
    assert rel_diff(ours, theirs) < 1e-4  # measured 5.5e-7 .. 6.6e-7


def _singlestep(levels):
    """diffusers' DPM-Solver++(2S) (single-step, order 2, midpoint) through `levels`, orders 1, 2, 1, ..."""
    from diffusers import DPMSolverSinglestepScheduler

    sch = DPMSolverSinglestepScheduler(
        **SD_BETAS,
        algorithm_type="dpmsolver++",
        solver_order=2,
        solver_type="midpoint",
        lower_order_final=False,
    )
    n = len(levels) - 1
    sch.set_timesteps(timesteps=list(range(n, 0, -1)))  # placeholders: the UNet gets our timesteps
    sch.sigmas = torch.stack(levels).float()
    sch.order_list = ([1, 2] * n)[:n]  # (the scheduler's own list would end in 1, 1 for even n)
    return sch


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_dpmpp_2s_ancestral_matches_diffusers_step_by_step(unet_io, eta):
    """diffusers has no DPM++ 2S ancestral (KDPM2Ancestral is DPM2, another method), so each step is built
    from its DPM-Solver++(2S): a singlestep run sigma -> midpoint -> sigma_down, then sigma_up times the
    noise drawn from the same generator.
    """
    run = Run(unet_io)
    sigmas = StepSchedule(STEPS, "leading")(NoiseSchedule().alphas_cumprod)
    gen = torch.Generator().manual_seed(7)
    x = start_x(run.x_T, sigmas[0])
    for i in range(STEPS):
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        if sigma_down > 0:
            t, t_down = -sigmas[i].log(), -sigma_down.log()
            sch = _singlestep([sigmas[i], (-(t + (t_down - t) / 2)).exp(), sigma_down])
        else:  # the last step: D itself
            sch = _singlestep([sigmas[i], sigma_down])
        x = run.diffusers(sch, to_variance_preserving(x, sigmas[i])) * (1 + sigma_down**2).sqrt()
        if sigma_up > 0:
            x = x + torch.randn(x.shape, generator=gen) * sigma_up
    ours = run.ours(sample_dpmpp_2s_ancestral, sigmas, eta=eta, generator=torch.Generator().manual_seed(7))
    assert rel_diff(ours, x) < 1e-4  # measured 2.2e-6 (eta 0), 1.2e-6 (eta 1)


# ---- sample.py --------------------------------------------------------------------------------------


def test_pipeline_samples_with_every_new_sampler_name(sd_base):
    """By name through the Python API, one loaded model: images, the record, seeds reproduce whatever the
    batch size (image k uses seed k's generator for its start and its noise)."""
    from ldm.pipeline import Pipeline

    ckpt, yaml_path, tokenizer = sd_base
    pipe = Pipeline.from_file(ckpt, config=yaml_path, text_encoder=str(tokenizer), device="cpu")
    for name in sorted(NEW):
        kw = dict(n=2, steps=2, sampler=name, spacing="karras", seed=5, cfg_scale=3.0)
        out = pipe.txt2img("a red circle", batch_size=2, **kw)
        assert out.record["parameters"]["sampler_name"] == NEW[name].__name__, name
        assert out.tensors.shape == (2, 3, 64, 64) and out.latents.shape == (2, 4, 8, 8)
        assert (out.latents[0] - out.latents[1]).abs().max() > 1e-3, name  # seeds 5 and 6 differ
        if name not in ("dpmpp_2s_a", "dpmpp_sde", "dpmpp_2m_sde"):
            continue  # the deterministic ones only depend on x_T, which test_sample_tasks.py covers
        alone = pipe.txt2img("a red circle", batch_size=1, **kw)
        # batched vs single UNet arithmetic: measured <= 2.2e-4 on latents of magnitude ~45 (ddim alike)
        torch.testing.assert_close(alone.latents, out.latents, rtol=1e-4, atol=1e-3, msg=name)


@pytest.mark.parametrize(
    "name", ["heun", *(pytest.param(n, marks=pytest.mark.slow) for n in sorted(NEW) if n != "heun")]
)
def test_sample_py_runs_each_new_sampler(sd_base, tmp_path, name):
    import sys
    from pathlib import Path

    import numpy as np
    from hydra import compose, initialize_config_dir
    from PIL import Image

    repo = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(repo))
    from sample import sample

    ckpt, yaml_path, tokenizer = sd_base
    with initialize_config_dir(config_dir=str(repo / "conf"), version_base="1.3"):
        cfg = compose(
            "sample",
            overrides=[
                f"ckpt={ckpt}",
                f"config={yaml_path}",
                f"text_encoder={tokenizer}",
                f"out_dir={tmp_path}",
                f"sampler={name}",
                "prompt=a red circle",
                "n=2",
                "steps=3",
                "spacing=karras",
                "progress=false",
                "device=cpu",
            ],
        )
    record = sample(cfg)
    run = record["parameters"]
    assert run["sampler_name"] == NEW[name].__name__ and run["steps"] == 3
    images = [np.asarray(Image.open(tmp_path / entry["file"])) for entry in record["images"]]
    assert len(images) == 2 and all(im.shape == (64, 64, 3) for im in images)
    assert np.abs(images[0].astype(int) - images[1].astype(int)).max() > 0  # two seeds, two images
