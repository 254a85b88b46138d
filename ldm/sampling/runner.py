"""The sampling loop of sample.py: batches of a Job -> conditioning -> latents -> decoded images.

Image i always uses seed + i and its own noise generator (edm2 `StackedRandomGenerator`), so the same
seed gives the same image whatever the batch size.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from ldm.errors import UserError
from ldm.interop.load import LoadedModel
from ldm.samplers.generate import generate_latents
from ldm.samplers.sigmas import StepSchedule, truncate_for_strength
from ldm.sampling.job import Job

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Settings:
    """How to sample (the same for every task)."""

    sampler: Callable[..., Tensor]  # a sample_xxx function with its options bound (conf/sampler)
    steps: StepSchedule
    cfg_scale: float = 5.0
    batch_size: int = 4
    seed: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    precision: str = "fp32"
    progress: bool = True

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise UserError(f"precision={self.precision}: use one of {', '.join(PRECISIONS)}.")
        if not _whole(self.batch_size) or self.batch_size < 1:
            raise UserError(f"batch_size={self.batch_size}: must be a whole number >= 1.")
        if not _whole(self.seed):
            raise UserError(f"seed={self.seed}: must be a whole number (image i uses seed + i).")
        if not _number(self.cfg_scale) or not self.cfg_scale >= 0:  # `not >=` also catches NaN
            raise UserError(f"cfg_scale={self.cfg_scale}: must be a number >= 0 (1 = no guidance).")


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class Result:
    images: Tensor  # (N, 3, H, W) in [-1, 1], float32 on the CPU
    latents: Tensor  # (N, C, h, w) scaled latents, float32 on the CPU
    seeds: list[int]
    timings: dict[str, float]
    guided: bool  # whether classifier-free guidance ran (False when there is nothing to guide)


def resolve_device(device: str = "auto") -> torch.device:
    """`auto` -> cuda when available, else mps, else cpu; anything else as given (checked)."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        return torch.device("mps" if mps is not None and mps.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device={device} but no CUDA device is available; pass device=cpu or device=auto.")
    try:
        return torch.device(device)
    except RuntimeError:
        raise UserError(f"device={device} is not a torch device; use auto, cpu, cuda or cuda:N.") from None


def prepare(loaded: LoadedModel, device: torch.device, compile_unet: bool = False) -> None:
    """Move the model to `device`; optionally torch.compile the UNet (first batch then compiles)."""
    loaded.model.to(device)
    if compile_unet:
        loaded.model.unet = torch.compile(loaded.model.unet)


def has_guidance(module: Any) -> bool:
    """Whether the unconditional branch differs from the conditional one (else CFG only doubles the cost)."""
    conditioner = module.conditioner
    return any(
        c.output != "concat" or not conditioner.uncond_keeps_concat for c in conditioner.conditioners.values()
    )


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def batches(n: int, batch_size: int) -> Iterator[list[int]]:
    for start in range(0, n, batch_size):
        yield list(range(start, min(n, start + batch_size)))


@torch.no_grad()
def run_job(loaded: LoadedModel, job: Job, settings: Settings) -> Result:
    """Sample every image of `job`; returns decoded images, latents, seeds and timings."""
    module, device = loaded.model, settings.device
    f = module.first_stage.downsample_factor
    latent_hw = (job.size[0] // f, job.size[1] // f)
    timings = {"encode_s": 0.0, "sample_s": 0.0, "decode_s": 0.0}
    seeds = [settings.seed + i for i in range(len(job))]
    guided = settings.cfg_scale != 1.0 and has_guidance(module)

    start = time.perf_counter()
    init = blend = None
    if job.init_image is not None:
        init = module.first_stage.encode_pixels(
            job.init_image.to(device), sample=False
        ).float()  # (1, C, h, w)
    if job.blend_mask is not None:
        # A latent cell is regenerated if any of its pixels is: the whole masked area is covered.
        blend = F.max_pool2d(job.blend_mask.to(device).float(), kernel_size=f)  # (1, 1, h, w)
    _sync(device)
    timings["encode_s"] += time.perf_counter() - start

    sigmas = settings.steps(module.loss.schedule.alphas_cumprod)
    if init is not None and job.strength < 1.0:
        sigmas = truncate_for_strength(sigmas, job.strength)
    total = (len(sigmas) - 1) * len(list(batches(len(job), settings.batch_size)))
    bar = tqdm(total=total, desc=f"sampling {len(job)} image(s)", disable=not settings.progress, unit="step")
    images, latents = [], []
    try:
        for idx in batches(len(job), settings.batch_size):
            b = len(idx)
            start = time.perf_counter()
            cond, uncond = _conditioning(module, job, idx, seeds, latent_hw, device, guided)
            timings["encode_s"] += time.perf_counter() - start

            start = time.perf_counter()
            with _autocast(device, settings.precision):
                z = generate_latents(
                    module.net,
                    module.loss.schedule.alphas_cumprod,
                    sampler=settings.sampler,
                    steps=settings.steps,
                    shape=(module.first_stage.latent_channels, *latent_hw),
                    seeds=[seeds[i] for i in idx],
                    cond=cond,
                    uncond=uncond,
                    cfg_scale=settings.cfg_scale,
                    parameterization=module.loss.parameterization,
                    init_latents=None if init is None else init.expand(b, -1, -1, -1),
                    strength=job.strength,
                    blend_mask=None if blend is None else blend.expand(b, -1, -1, -1),
                    callback=_advance(bar),
                    device=device,
                )
            z = module.add_residual_base(z.float(), job.inputs(idx))  # + E(bicubic upscale): residual SR
            _sync(device)
            timings["sample_s"] += time.perf_counter() - start

            start = time.perf_counter()
            # One image at a time, in fp32: the same pixels whatever the batch size (conv kernels pick
            # batch-dependent algorithms), one image's activation memory, no fp16 overflow in SD's VAE.
            x = torch.cat([module.first_stage.decode(z[i : i + 1]) for i in range(b)]).float().clamp(-1, 1)
            if (
                job.paste_mask is not None
            ):  # the input's own pixels outside the mask, not their reconstruction
                m = job.paste_mask.to(x)
                x = job.init_image.to(x) * (1 - m) + x * m
            _sync(device)
            timings["decode_s"] += time.perf_counter() - start
            images.append(x.cpu())
            latents.append(z.cpu())
    finally:
        bar.close()
    return Result(torch.cat(images), torch.cat(latents), seeds, timings, guided)


def _advance(bar: tqdm) -> Callable[[dict[str, Any]], None]:
    """Sampler callback moving the progress bar; returns None (a returned tensor would replace x)."""

    def callback(info: dict[str, Any]) -> None:
        bar.update(1)

    return callback


def _conditioning(
    module: Any,
    job: Job,
    idx: list[int],
    seeds: list[int],
    latent_hw: tuple[int, int],
    device: torch.device,
    guided: bool,
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(cond, uncond) UNet kwargs for images `idx`; a negative prompt replaces the null text context."""
    conditioner, inputs = module.conditioner, job.inputs(idx)
    inputs.update(seeded_noise(conditioner, job, idx, seeds, latent_hw, device))
    kw = {"batch_size": len(idx), "device": device, "encode_fn": module.encode_fn, "latent_size": latent_hw}
    cond, uncond = conditioner.encode_with_null(inputs, null=guided, **kw)
    if guided and job.negative_prompt and "caption" in conditioner.input_keys:
        negative, _ = conditioner.encode_with_null(
            {**inputs, "caption": [job.negative_prompt] * len(idx)}, null=False, **kw
        )
        uncond["context"] = negative["context"]
    return cond, uncond


NOISE_SEED_OFFSET = 0x5EED  # a conditioner's noise must not repeat the image's initial latent noise


def seeded_noise(
    conditioner: Any,
    job: Job,
    idx: list[int],
    seeds: list[int],
    latent_hw: tuple[int, int],
    device: torch.device,
) -> dict[str, Tensor]:
    """Per-image noise for conditioners that draw some (`noise_key`, e.g. the x4 upscaler's low-res
    augmentation), from each image's seed: the same image whatever the batch size."""
    out: dict[str, Tensor] = {}
    for c in conditioner.conditioners.values():
        key = getattr(c, "noise_key", None)
        if key is None or key in job.shared:
            continue
        shape = (int(c.out_dim), *latent_hw)
        gens = [torch.Generator().manual_seed(seeds[i] + NOISE_SEED_OFFSET) for i in idx]
        out[key] = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device)
    return out
