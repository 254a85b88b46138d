"""Stable Diffusion 1.x: KL autoencoder first stage, CLIP ViT-L/14 text encoder (`FrozenCLIPEmbedder`)."""

from __future__ import annotations

from typing import Any

from ldm.interop.registry import BuildContext, cond_stage, first_stage
from ldm.models.autoencoder import AutoencoderKL


@first_stage("AutoencoderKL")
def autoencoder_kl(params: dict[str, Any]) -> tuple[AutoencoderKL, dict]:
    """AutoencoderKL from `first_stage_config.params` (monitor, lossconfig, ckpt_path: training-only)."""
    config = {
        "_target_": "ldm.models.autoencoder.AutoencoderKL",
        "embed_dim": int(params["embed_dim"]),
        "ddconfig": dict(params["ddconfig"]),
    }
    return AutoencoderKL(config["ddconfig"], config["embed_dim"]), config


@cond_stage("FrozenCLIPEmbedder")
def clip_embedder(ctx: BuildContext) -> dict[str, Any]:
    """The checkpoint's CLIP text model; the tokenizer comes from `text_encoder=<folder>`."""
    from ldm.interop.compvis import TEXT_NAME, clip_state, clip_text_encoder

    cp = ctx.cond_params
    encoder = clip_text_encoder(
        ctx.text_encoder,
        clip_state(ctx.state),
        max_length=int(cp.get("max_length", 77)),
        layer=cp.get("layer", "last"),
    )
    return {TEXT_NAME: encoder}
