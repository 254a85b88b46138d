"""Stable Diffusion 2.x and the SD x4 upscaler (Stability-AI/stablediffusion configs).

- `FrozenOpenCLIPEmbedder` (v2-inference(-v).yaml, v2-inpainting-inference.yaml, x4-upscaling.yaml): the
  checkpoint's OpenCLIP text tower as a CLIPTextModel (`ldm.interop.openclip`), tokenizer from
  `text_encoder=<folder>`; conditioner name `text`, batch key `caption`.
- `LatentUpscaleDiffusion` (x4-upscaling.yaml, conditioning_key hybrid-adm): the noise-augmented low-res image
  (`lowres`, concatenated at latent size) and its noise level as the UNet's class label (`noise_level`), both
  from `low_scale_config` (`ImageConcatWithNoiseAugmentation`).

The UNet (num_head_channels, use_linear_in_transformer, disable_self_attentions, num_classes) and the KL
autoencoder need nothing family-specific: `compvis.build_unet` and `sd1`'s `AutoencoderKL` builder cover them.
"""

from __future__ import annotations

from typing import Any

from ldm.conditioning.noise_augment import NoiseAugmentedLowRes, NoiseLevel
from ldm.errors import UserError
from ldm.interop.openclip import OPENCLIP, openclip_state, openclip_text_encoder
from ldm.interop.registry import BuildContext, class_name, cond_export, cond_stage, model_kind

TEXT_NAME = "text"  # as compvis.TEXT_NAME: the conditioner entry of a text encoder
LOWRES_NAME, LEVEL_NAME = "lowres", "noise_level"
DEFAULT_NOISE_LEVEL = 20  # Stability's scripts/gradio/superresolution.py and the diffusers pipeline
NOISE_AUGMENTATION = "ImageConcatWithNoiseAugmentation"


@cond_stage("FrozenOpenCLIPEmbedder")
def openclip_embedder(ctx: BuildContext) -> dict[str, Any]:
    """The checkpoint's OpenCLIP text tower (`cond_stage_model.model.*`).

    `arch`, `version`, `device`, `freeze` are not read; nor is `max_length`, which the original ignores too
    (`open_clip.tokenize` pads every prompt to the model's 77 positions).
    """
    layer = str(ctx.cond_params.get("layer", "last"))
    encoder = openclip_text_encoder(ctx.text_encoder, ctx.state, layer=layer)
    return {TEXT_NAME: encoder}


@model_kind("LatentUpscaleDiffusion")
def upscale_conditioners(ctx: BuildContext) -> dict[str, Any]:
    """`low_scale_config` -> the augmented low-res image (concat) and its level (the UNet's y)."""
    low = ctx.params.get("low_scale_config")
    target = class_name((low or {}).get("target") if isinstance(low, dict) else None)
    if target != NOISE_AUGMENTATION:
        raise UserError(
            f"{ctx.where('low_scale_config.target')}={target or None} is not supported; "
            f"LatentUpscaleDiffusion needs ldm.modules.diffusionmodules.upscaling.{NOISE_AUGMENTATION} "
            "(as in x4-upscaling.yaml)."
        )
    params = dict(low.get("params") or {})
    schedule = dict(params.get("noise_schedule_config") or {})
    kind = schedule.get("beta_schedule", "linear")
    if kind != "linear":
        raise UserError(
            f"{ctx.where('low_scale_config.params.noise_schedule_config.beta_schedule')}={kind!r} is not "
            "supported; the x4 upscaler uses linear (remove the key)."
        )
    num_classes = (ctx.params.get("unet_config") or {}).get("params", {}).get("num_classes")
    if not isinstance(num_classes, int):
        raise UserError(
            f"{ctx.where('unet_config.params.num_classes')}={num_classes!r}: LatentUpscaleDiffusion feeds "
            "the noise level to the UNet as a class label, so num_classes must be an integer "
            "(x4-upscaling.yaml: 1000)."
        )
    timesteps = int(schedule.get("timesteps", 1000))
    level = min(DEFAULT_NOISE_LEVEL, timesteps - 1, num_classes - 1)
    lowres = NoiseAugmentedLowRes(
        noise_level=level,
        max_noise_level=int(params.get("max_noise_level", 1000)),
        num_timesteps=timesteps,
        linear_start=float(schedule.get("linear_start", 1e-4)),
        linear_end=float(schedule.get("linear_end", 2e-2)),
        input_key=LOWRES_NAME,
    )
    return {LOWRES_NAME: lowres, LEVEL_NAME: NoiseLevel(level, num_classes, input_key=LOWRES_NAME)}


# -- export back (ldm.interop.export) ---------------------------------------------------------------------


@cond_export("FrozenTextEncoder")
def openclip_export(encoder: Any, model: Any) -> dict[str, Any] | None:
    """A CLIP-architecture text model with exact GELU (what `openclip_embedder` builds) -> OpenCLIP names
    under `cond_stage_model.model.*`. None for OpenAI CLIP (quick_gelu: sd1's exporter) or non-CLIP models."""
    config = encoder.transformer.config
    if not getattr(encoder, "is_clip", False) or getattr(config, "hidden_act", "") != "gelu":
        return None
    return openclip_state(encoder.transformer.state_dict(), OPENCLIP)


@cond_export("NoiseAugmentedLowRes")
def low_scale_export(lowres: Any, model: Any) -> dict[str, Any]:
    """The x4 upscaler's `low_scale_model.*` schedule buffers (AbstractLowScaleModel.register_schedule)."""
    from ldm.interop.export import schedule_buffers

    buffers = schedule_buffers(lowres.schedule.alphas_cumprod, posterior=False)
    return {"low_scale_model." + k: v for k, v in buffers.items()}


@cond_export("NoiseLevel")
def noise_level_export(level: Any, model: Any) -> dict[str, Any]:
    """The noise level is the UNet's class label: no weights of its own."""
    return {}
