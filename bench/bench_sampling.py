"""Sampling speed: our samplers + UNet against diffusers' schedulers + UNet2DConditionModel.

Same UNet size and weights (the tiny SD-v1-structured reference model, converted to diffusers' layout
when the reference file is present), same sampler and steps, classifier-free guidance, same x_T and
conditioning, hand-written diffusers loop (scheduler + UNet, no text encoder / VAE). A second variant
runs both samplers on OUR UNet, a third on a near-free stand-in network, to isolate the sampler
overhead. Also prints how far the two results
are apart (they should agree to ~1e-5: same algorithm, same noise levels).

    python bench/bench_sampling.py                      # ~1-2 minutes on a (shared) 2-core CPU
    python bench/bench_sampling.py --latent 64 --steps 50 --device cuda
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial
from pathlib import Path

import torch

from ldm.diffusion import NoiseSchedule
from ldm.modules.unet import UNetModel
from ldm.samplers import (
    ClassifierFreeGuidance,
    DiscreteDenoiser,
    StepSchedule,
    sample_ddim,
    sample_dpmpp_2m,
    start_x,
    to_variance_preserving,
)

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "sd_v1_tiny.safetensors"
# The reference model's structure (CompVis UNet config; the same numbers as its metadata).
UNET_CONFIG = dict(
    in_channels=4,
    out_channels=4,
    model_channels=32,
    attention_resolutions=[4, 2, 1],
    num_res_blocks=2,
    channel_mult=[1, 1, 2, 2],
    num_heads=4,
    transformer_depth=1,
    context_dim=64,
    legacy=False,
)
# diffusers' name for the same network (SD v1 layout; attention_head_dim is the head count there).
DIFFUSERS_CONFIG = dict(
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(32, 32, 64, 64),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=64,
    attention_head_dim=4,
)


def build_unets(device: torch.device, latent: int) -> tuple[torch.nn.Module, torch.nn.Module, str]:
    """Our UNetModel and diffusers' UNet2DConditionModel with identical weights (random if no reference)."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    ours = UNetModel(**UNET_CONFIG)
    if REFERENCE.is_file():
        from safetensors.torch import load_file

        state = {
            k: v.float()
            for k, v in load_file(str(REFERENCE)).items()
            if k.startswith("model.diffusion_model.")
        }
        source = "reference weights"
    else:
        gen = torch.Generator().manual_seed(0)
        state = {
            f"model.diffusion_model.{k}": torch.randn(v.shape, generator=gen) * 0.05
            for k, v in ours.state_dict().items()
        }
        source = "random weights"
    ours.load_state_dict({k.removeprefix("model.diffusion_model."): v for k, v in state.items()})
    theirs = UNet2DConditionModel(sample_size=latent, **DIFFUSERS_CONFIG)
    theirs.load_state_dict(convert_ldm_unet_checkpoint(state, dict(theirs.config)))
    return ours.to(device).eval(), theirs.to(device).eval(), source


class EpsFromDiffusers(torch.nn.Module):
    """diffusers' UNet behind our model(x_t, t, context=...) call."""

    def __init__(self, unet: torch.nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t, encoder_hidden_states=context).sample


class TrivialEps(torch.nn.Module):
    """A near-free stand-in network: timing it measures the sampler's own per-step overhead."""

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return 0.1 * x


def diffusers_loop(scheduler, eps_model, x_T, context, uncond, scale, steps) -> torch.Tensor:
    """The StableDiffusionPipeline denoising loop, by hand: batched CFG, scheduler.step."""
    scheduler.set_timesteps(steps, device=x_T.device)
    latents = x_T * scheduler.init_noise_sigma
    ctx = torch.cat([uncond, context])
    for t in scheduler.timesteps:
        inp = scheduler.scale_model_input(torch.cat([latents, latents]), t)
        eps_u, eps_c = eps_model(inp, t.expand(inp.shape[0]), ctx).chunk(2)
        latents = scheduler.step(eps_u + scale * (eps_c - eps_u), t, latents).prev_sample
    return latents


def our_loop(sampler, eps_model, sigmas, final_vp, x_T, context, uncond, scale) -> torch.Tensor:
    denoiser = ClassifierFreeGuidance(
        DiscreteDenoiser(eps_model, NoiseSchedule()), scale, {"context": uncond}
    )
    out = sampler(denoiser, start_x(x_T, sigmas[0]), sigmas, extra_args={"context": context}, disable=True)
    return to_variance_preserving(out, sigmas[-1]) if final_vp else out


def timed_pair(
    run_a, run_b, repeats: int, device: torch.device
) -> tuple[float, float, torch.Tensor, torch.Tensor]:
    """Best-of-`repeats` wall times of two runs, alternated so both see the same machine load."""

    def once(fn):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start, out

    run_a(), run_b()  # warm-up
    best_a = best_b = float("inf")
    for _ in range(repeats):
        (t_a, out_a), (t_b, out_b) = once(run_a), once(run_b)
        best_a, best_b = min(best_a, t_a), min(best_b, t_b)
    return best_a, best_b, out_a, out_b


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--latent", type=int, default=16, help="latent height = width (64: a 512 px image)")
    parser.add_argument("--batch", type=int, default=1, help="images per sampling run")
    parser.add_argument("--scale", type=float, default=7.5, help="guidance scale")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (best is kept)")
    # 1 thread by default: on a CPU shared with other jobs, 2 OpenMP threads ran ~10x slower, not faster.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    ours, theirs, source = build_unets(device, args.latent)
    gen = torch.Generator().manual_seed(0)
    x_T = torch.randn(args.batch, 4, args.latent, args.latent, generator=gen).to(device)
    context = torch.randn(args.batch, 7, 64, generator=gen).to(device)
    uncond = torch.randn(args.batch, 7, 64, generator=gen).to(device)
    sd = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    ac = NoiseSchedule().alphas_cumprod
    samplers = {
        # diffusers' SD defaults: leading spacing + offset 1, last step to alphas_cumprod[0]
        "DDIM": (
            sample_ddim,
            DDIMScheduler(**sd, set_alpha_to_one=False, steps_offset=1, clip_sample=False),
            lambda sch: StepSchedule(args.steps, "leading", offset=1, final="min")(ac),
            True,
        ),
        # DPM-Solver++(2M): our sampler runs on the scheduler's own noise levels
        "DPM++2M": (
            sample_dpmpp_2m,
            DPMSolverMultistepScheduler(**sd, algorithm_type="dpmsolver++", solver_order=2),
            lambda sch: (sch.set_timesteps(args.steps), sch.sigmas.float().clone())[1],
            False,
        ),
    }
    print(
        f"device={device} threads={args.threads} UNet: tiny SD-v1 structure ({source}), "
        f"latent {args.latent}x{args.latent}, batch {args.batch}, {args.steps} steps, CFG {args.scale}"
    )
    results = []
    for name, (sampler, scheduler, make_sigmas, final_vp) in samplers.items():
        sigmas = make_sigmas(scheduler).to(device)
        for variant, our_unet, their_unet in (
            ("ours vs diffusers (own UNets)", ours, EpsFromDiffusers(theirs)),
            ("same UNet (ours) for both", ours, ours),
            ("no UNet (sampler overhead)", TrivialEps(), TrivialEps()),
        ):
            run_ours = partial(
                our_loop, sampler, our_unet, sigmas, final_vp, x_T, context, uncond, args.scale
            )
            run_diffusers = partial(
                diffusers_loop, scheduler, their_unet, x_T, context, uncond, args.scale, args.steps
            )
            t_ours, t_diff, out_ours, out_diff = timed_pair(run_ours, run_diffusers, args.repeats, device)
            rel = ((out_ours - out_diff).norm() / out_diff.norm()).item()
            row = dict(
                sampler=name,
                variant=variant,
                ours_s_per_image=t_ours / args.batch,
                diffusers_s_per_image=t_diff / args.batch,
                ratio=t_ours / t_diff,
                rel_diff=rel,
            )
            results.append(row)
            print(
                f"{name:8s} {variant:30s} ours {row['ours_s_per_image'] * 1e3:8.1f} ms/img   "
                f"diffusers {row['diffusers_s_per_image'] * 1e3:8.1f} ms/img   "
                f"ours/diffusers {row['ratio']:.3f}   |out diff|/|out| {rel:.1e}",
                flush=True,
            )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
