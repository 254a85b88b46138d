"""Stable Diffusion 1.x: KL autoencoder first stage, CLIP ViT-L/14 text encoder (`FrozenCLIPEmbedder`)."""

from __future__ import annotations

from typing import Any

import torch

from ldm.interop.registry import BuildContext, cond_export, cond_stage, first_stage
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


@cond_export("FrozenTextEncoder")
def clip_export(encoder: torch.nn.Module, model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """A CLIP text model (OpenAI's quick_gelu, SD 1.x) -> `cond_stage_model.transformer.text_model.*`, with
    the `embeddings.position_ids` (1, 77) int64 buffer SD 1.x files carry. None for any other text model."""
    from ldm.interop.compvis import CLIP_TEXT

    config = encoder.transformer.config
    if not getattr(encoder, "is_clip", False) or getattr(config, "hidden_act", "") != "quick_gelu":
        return None
    out = {}
    for key, value in encoder.transformer.state_dict().items():
        name = key[len("text_model.") :] if key.startswith("text_model.") else key  # transformers 4.x level
        out[CLIP_TEXT + name] = value
    positions = int(config.max_position_embeddings)
    out[CLIP_TEXT + "embeddings.position_ids"] = torch.arange(positions, dtype=torch.int64)[None]
    return out
