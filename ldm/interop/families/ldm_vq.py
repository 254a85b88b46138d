"""The LDM paper's VQ / unconditional / concat checkpoints (Rombach et al. 2022, `models/ldm/*/config.yaml`).

- first stage `VQModelInterface` (celeba256, bsr_sr, semantic_synthesis256, inpainting_big): a VQGAN whose
  diffusion latent is the pre-quantisation h = quant_conv(encoder(x)); decoding quantises first, as the
  original `LatentDiffusion.decode_first_stage` does. `scale_factor` is 1 (not stored in these files).
- `cond_stage_config: __is_unconditional__` (celeba256, lsun_churches256): no conditioner; the registry's
  `BuildContext.conditioning_key` is None, so nothing here is called.
- `torch.nn.Identity` with `cond_stage_key: LR_image` (bsr_sr): the low-res image in [-1, 1], already at
  latent resolution, concatenated to z_t -> our `SuperResConditioner` reading `lowres`.
- `SpatialRescaler` (semantic_synthesis256): one-hot segmentation, bilinear halvings, 1x1 conv -> our
  `SpatialRescaler` reading `segmap` (integer class ids), weights from `cond_stage_model.channel_mapper.*`.
- `__is_first_stage__` with `cond_stage_key: masked_image` (inpainting_big): cat([E(masked image), mask]) as
  `scripts/inpaint.py` builds it -> our `InpaintingConditioner` in its LDM layout, reading `masked_image`
  (or `image`) and `mask`.
"""

from __future__ import annotations

from typing import Any

from ldm.conditioning.spatial import InpaintingConditioner, SpatialRescaler, SuperResConditioner
from ldm.errors import UserError
from ldm.interop.registry import BuildContext, cond_export, cond_stage, first_stage
from ldm.models.autoencoder import VQModel

COND = "cond_stage_model."
# keys of the original VQModel(Interface) that only matter for training or logging
VQ_TRAINING_KEYS = (
    "lossconfig",
    "monitor",
    "ckpt_path",
    "ignore_keys",
    "image_key",
    "scheduler_config",
    "lr_g_factor",
    "batch_resize_range",
    "sane_index_shape",  # the shape of returned indices only
    "remap",  # renumbers returned indices only; the quantised latent is the same
)
RESCALER_KEYS = ("n_stages", "method", "multiplier", "in_channels", "out_channels", "bias")


@first_stage("VQModelInterface", "VQModel")
def vq_model(params: dict[str, Any]) -> tuple[VQModel, dict]:
    """Our VQModel from `first_stage_config.params` (taming `VectorQuantizer2` names: quantize.embedding)."""
    where = "first_stage_config.params"
    for key in ("embed_dim", "n_embed", "ddconfig"):
        if key not in params:
            raise UserError(
                f"{where}.{key} is missing; a VQModelInterface needs embed_dim, n_embed, ddconfig."
            )
    unknown = sorted(set(params) - {"embed_dim", "n_embed", "ddconfig", *VQ_TRAINING_KEYS})
    if params.get("colorize_nlabels") is None:
        unknown = [k for k in unknown if k != "colorize_nlabels"]
    if params.get("use_ema") in (None, False):  # True would add first_stage_model.model_ema.* keys
        unknown = [k for k in unknown if k != "use_ema"]
    if unknown:
        raise UserError(
            f"{where}.{unknown[0]} is not supported for a VQ first stage; remove it (supported: embed_dim, "
            f"n_embed, ddconfig and the training-only {', '.join(VQ_TRAINING_KEYS)})."
        )
    config = {
        "_target_": "ldm.models.autoencoder.VQModel",
        "ddconfig": dict(params["ddconfig"]),
        "n_embed": int(params["n_embed"]),
        "embed_dim": int(params["embed_dim"]),
    }
    model = VQModel(config["ddconfig"], n_embed=config["n_embed"], embed_dim=config["embed_dim"])
    return model, config


def _require_concat(ctx: BuildContext, what: str) -> None:
    if ctx.conditioning_key != "concat":
        raise UserError(
            f"{ctx.where('conditioning_key')}={ctx.conditioning_key!r}: {what} is a spatial condition joined "
            "to the latent by channels; set conditioning_key: concat (or concat_mode: true)."
        )


def _cond_key(ctx: BuildContext, expected: str, target: str) -> None:
    key = ctx.params.get("cond_stage_key")
    if key != expected:
        raise UserError(
            f"{ctx.where('cond_stage_key')}={key!r} with cond_stage_config {target} is not a model we can "
            f"build; supported: cond_stage_key: {expected}."
        )


@cond_stage("Identity")
def low_res_image(ctx: BuildContext) -> dict[str, Any]:
    """bsr_sr: the low-res image itself (pixels in [-1, 1] at latent size) concatenated to z_t."""
    _cond_key(ctx, "LR_image", "torch.nn.Identity")
    _require_concat(ctx, "the low-res image")
    return {"lowres": SuperResConditioner(upscale=1.0, encode=False, input_key="lowres")}


@cond_stage("SpatialRescaler")
def spatial_rescaler(ctx: BuildContext) -> dict[str, Any]:
    """semantic_synthesis: one-hot segmap -> n_stages resizings -> channel_mapper (weights in the file)."""
    from ldm.interop.compvis import load_into

    _require_concat(ctx, "the segmentation map")
    params = ctx.cond_params
    unknown = sorted(set(params) - set(RESCALER_KEYS))
    if unknown:
        raise UserError(
            f"{ctx.where('cond_stage_config.params.' + unknown[0])} is not a SpatialRescaler option; "
            f"supported: {', '.join(RESCALER_KEYS)}."
        )
    rescaler = SpatialRescaler(**params, input_key="segmap")
    weights = {k[len(COND) :]: v for k, v in ctx.state.items() if k.startswith(COND)}
    for name, own in rescaler.state_dict().items():
        theirs = weights.get(name)
        if theirs is not None and tuple(theirs.shape) != tuple(own.shape):
            raise UserError(
                f"{COND}{name} is {tuple(theirs.shape)} in the checkpoint but "
                f"{ctx.where('cond_stage_config.params')} (in/out_channels) give {tuple(own.shape)}; "
                f"set out_channels: {theirs.shape[0]} and in_channels: {theirs.shape[1]}."
            )
    load_into(rescaler, weights, f"{ctx.where('cond_stage_config')} (SpatialRescaler)")
    return {"segmap": rescaler.eval().requires_grad_(False)}


@cond_stage("__is_first_stage__")
def masked_image(ctx: BuildContext) -> dict[str, Any]:
    """inpainting_big: cat([E(masked image), mask in {-1, 1} at latent size]), masked pixels black."""
    _cond_key(ctx, "masked_image", "__is_first_stage__")
    _require_concat(ctx, "the masked image")
    scale = ctx.state.get("scale_factor")
    scale = float(scale) if scale is not None else float(ctx.params.get("scale_factor", 1.0))
    if scale != 1.0 or ctx.params.get("scale_by_std"):
        # The original conditions on the unscaled encoding, ours on the scaled one: equal only for 1.
        raise UserError(
            f"{ctx.where('scale_factor')}={scale} (or scale_by_std) with cond_stage_config "
            "__is_first_stage__ is not supported: the masked image's latents must be unscaled "
            "(scale_factor 1, as in inpainting_big)."
        )
    conditioner = InpaintingConditioner(
        latent_channels=ctx.latent_channels,
        order="image_first",  # scripts/inpaint.py: torch.cat((c, cc), dim=1)
        mask_range="pm1",  # its mask went through x * 2 - 1 with the images
        masked_fill=-1.0,  # masked_image = (1 - mask) * image in [0, 1], then mapped to [-1, 1]
    )
    return {"inpaint": conditioner}


# -- export back (ldm.interop.export) ---------------------------------------------------------------------


@cond_export("SpatialRescaler")
def rescaler_export(rescaler: SpatialRescaler, model: Any) -> dict[str, Any]:
    """`cond_stage_model.channel_mapper.*` (our names below the prefix are the original's)."""
    return {COND + k: v for k, v in rescaler.state_dict().items()}


@cond_export("SuperResConditioner")
def low_res_export(conditioner: SuperResConditioner, model: Any) -> dict[str, Any]:
    """bsr_sr's torch.nn.Identity: no weights."""
    return {}


@cond_export("InpaintingConditioner")
def masked_image_export(conditioner: InpaintingConditioner, model: Any) -> dict[str, Any]:
    """inpainting_big (`__is_first_stage__`) holds the first stage again under `cond_stage_model.*`; SD's
    hybrid inpainting (mask first) encodes with the first stage itself and stores nothing."""
    if conditioner.order != "image_first":
        return {}
    return {COND + k: v.clone() for k, v in model.first_stage.autoencoder.state_dict().items()}
