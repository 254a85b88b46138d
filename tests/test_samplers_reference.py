"""Golden trajectories of the original CompVis samplers (../shared/reference, see its README).

From io.x_T with the tiny SD-v1-structured UNet, cond io.context, uncond io.uncond_context, guidance 3,
10 steps. CompVis returns the DDPM-scaled x at timestep 0 (sigma(0), not 0), hence final="min" and
`to_variance_preserving` below.
"""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ldm.diffusion import NoiseSchedule
from ldm.samplers import (
    ClassifierFreeGuidance,
    DiscreteDenoiser,
    StepSchedule,
    sample_ddim,
    sample_dpmpp_2m,
    sample_plms,
    start_x,
    to_variance_preserving,
)

PREFIX = "model.diffusion_model."


@pytest.fixture(scope="module")
def reference(reference_dir):
    unet_module = pytest.importorskip(
        "ldm.modules.unet", reason="ldm.modules.unet (the UNet) is not written yet"
    )
    path = reference_dir / "sd_v1_tiny.safetensors"
    with safe_open(str(path), "pt") as f:
        config = json.loads(f.metadata()["unet"])
    tensors = load_file(str(path))
    unet = unet_module.UNetModel.from_compvis_config(config).eval()
    unet.load_state_dict({k[len(PREFIX) :]: v.float() for k, v in tensors.items() if k.startswith(PREFIX)})
    return unet, tensors


def test_our_schedule_is_the_reference_table(reference):
    _, io = reference
    torch.testing.assert_close(NoiseSchedule().alphas_cumprod, io["io.alphas_cumprod"], rtol=0, atol=0)


@pytest.mark.parametrize(
    "key, sampler, spacing",
    [
        ("io.ddim10_cfg3", sample_ddim, "leading"),  # timesteps 901, 801, ..., 1, then alphas_cumprod[0]
        ("io.plms10_cfg3", sample_plms, "leading"),
        ("io.dpmsolver2m10_cfg3", sample_dpmpp_2m, "time_uniform"),  # t uniform in [1, 1/1000]
    ],
)
def test_sampler_matches_compvis_trajectory(reference, key, sampler, spacing):
    unet, io = reference
    schedule = NoiseSchedule()  # equal to io.alphas_cumprod (test above)
    denoiser = ClassifierFreeGuidance(
        DiscreteDenoiser(unet, schedule, "eps"), scale=3.0, uncond={"context": io["io.uncond_context"]}
    )
    sigmas = StepSchedule(10, spacing, offset=1, final="min")(schedule.alphas_cumprod)
    x = start_x(io["io.x_T"], sigmas[0])
    with torch.no_grad():
        out = sampler(denoiser, x, sigmas, extra_args={"context": io["io.context"]}, disable=True)
    out = to_variance_preserving(out, sigmas[-1])
    ref = io[key]
    assert ref.abs().max() > 0.5  # a real sample
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < 1e-4, f"{key}: relative error {rel:.2e}"
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-3 * ref.abs().max().item())
