"""ldm.samplers: one function per algorithm with one signature (see `ldm.samplers.base`).

Typical use (text-to-image with guidance):

    denoiser = DiscreteDenoiser(unet, schedule, parameterization="eps")
    guided = ClassifierFreeGuidance(denoiser, scale=7.5, uncond={"context": empty_context})
    sigmas = StepSchedule(steps=50)(schedule.alphas_cumprod)
    gens = generators_from_seeds(seeds)
    x = start_x(randn((B, 4, 64, 64), gens), sigmas[0])
    latents = sample_ddim(guided, x, sigmas, extra_args={"context": context}, generator=gens)
"""

from ldm.samplers.base import ancestral_step, generators_from_seeds, randn, randn_like
from ldm.samplers.ddim import sample_ddim
from ldm.samplers.ddpm import sample_ddpm
from ldm.samplers.denoiser import DiscreteDenoiser
from ldm.samplers.dpm_solver import sample_dpmpp_2m
from ldm.samplers.dpmpp_sde import (
    BrownianNoise,
    sample_dpmpp_2m_sde,
    sample_dpmpp_2s_ancestral,
    sample_dpmpp_sde,
)
from ldm.samplers.euler import sample_euler, sample_euler_ancestral
from ldm.samplers.guidance import ClassifierFreeGuidance
from ldm.samplers.heun import sample_heun
from ldm.samplers.hooks import inpaint_callback
from ldm.samplers.lms import sample_lms
from ldm.samplers.plms import sample_plms
from ldm.samplers.sigmas import (
    StepSchedule,
    get_sigmas_karras,
    sigma_at,
    sigma_to_timestep,
    start_x,
    to_variance_preserving,
    truncate_for_strength,
)
from ldm.samplers.unipc import sample_unipc

__all__ = [
    "BrownianNoise",
    "ClassifierFreeGuidance",
    "DiscreteDenoiser",
    "StepSchedule",
    "ancestral_step",
    "generators_from_seeds",
    "get_sigmas_karras",
    "inpaint_callback",
    "randn",
    "randn_like",
    "sample_ddim",
    "sample_ddpm",
    "sample_dpmpp_2m",
    "sample_dpmpp_2m_sde",
    "sample_dpmpp_2s_ancestral",
    "sample_dpmpp_sde",
    "sample_euler",
    "sample_euler_ancestral",
    "sample_heun",
    "sample_lms",
    "sample_plms",
    "sample_unipc",
    "sigma_at",
    "sigma_to_timestep",
    "start_x",
    "to_variance_preserving",
    "truncate_for_strength",
]
