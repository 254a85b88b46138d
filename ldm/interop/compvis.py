"""Original CompVis / Stable Diffusion v1 checkpoints (+ their inference yaml) as our modules.

CompVis keeps everything in one `LatentDiffusion` state dict:

    model.diffusion_model.*            UNet                  -> unet.*  (same names below the prefix)
    first_stage_model.*                AutoencoderKL         -> first_stage.autoencoder.*
    scale_factor                       latent scale          -> first_stage.scale_factor
    cond_stage_model.transformer.*     CLIP text model       -> conditioner.conditioners.text.transformer.*
    model_ema.<name without dots>      LitEma shadow weights of model.diffusion_model.* (+ decay, num_updates)
    betas, alphas_cumprod, ...         schedule buffers      -> rebuilt from the yaml (checked against these)

The yaml (e.g. `configs/stable-diffusion/v1-inference.yaml`) gives `model.params.unet_config.params`,
`first_stage_config.params`, `cond_stage_config`, `scale_factor`, `linear_start/linear_end` and
`parameterization`; our modules are built from those and the weights load as they are.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file
from torch import Tensor

from ldm.conditioning import Conditioner, FrozenTextEncoder, InpaintingConditioner
from ldm.diffusion.loss import DiffusionLoss
from ldm.diffusion.schedules import NoiseSchedule
from ldm.errors import UserError
from ldm.models.autoencoder import AutoencoderKL
from ldm.models.first_stage import LatentCodec
from ldm.modules.unet import UNetModel

log = logging.getLogger(__name__)

UNET, FIRST_STAGE, EMA = "model.diffusion_model.", "first_stage_model.", "model_ema."
CLIP_TEXT = "cond_stage_model.transformer.text_model."
TEXT_NAME = "text"  # our conditioner entry for the CLIP text encoder (what conf/experiment/txt2img uses)
# CompVis beta_schedule names -> ours. CompVis "linear" is linear in sqrt(beta) (diffusers scaled_linear).
SCHEDULES = {"linear": "scaled_linear", "sqrt_linear": "linear", "cosine": "cosine"}
CLIP_TARGETS = ("FrozenCLIPEmbedder",)
TOKENIZER_FILES = ("tokenizer.json", "vocab.json")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def is_compvis_state(state: Mapping[str, Tensor]) -> bool:
    """Whether a state dict has the CompVis LatentDiffusion layout (UNet under model.diffusion_model.)."""
    return any(k.startswith(UNET) for k in state)


def to_our_names(key: str, text_prefix: str = "") -> str | None:
    """CompVis/export name -> our LatentDiffusionModule name (None for keys we rebuild or do not use).

    `text_prefix` is "text_model." for transformers 4.x, whose CLIPTextModel keeps that level; 5.x has none.
    """
    if key.startswith(UNET):
        return "unet." + key[len(UNET) :]
    if key.startswith(FIRST_STAGE):
        return "first_stage.autoencoder." + key[len(FIRST_STAGE) :]
    if key == "scale_factor":
        return "first_stage.scale_factor"
    if key.startswith(CLIP_TEXT):
        rest = key[len(CLIP_TEXT) :]
        if rest == "embeddings.position_ids":  # a constant arange; newer transformers reject it
            return None
        return f"conditioner.conditioners.{TEXT_NAME}.transformer.{text_prefix}{rest}"
    if key.startswith(("conditioner.", "loss.")):  # our own exports keep these names
        return key
    return None


def ema_key(unet_param: str) -> str:
    """LitEma buffer of UNet parameter `unet_param`: 'model_ema.' + 'diffusion_model.<name>' without dots."""
    return EMA + ("diffusion_model." + unet_param).replace(".", "")


def unet_weights(state: Mapping[str, Tensor], param_names: list[str], use_ema: bool) -> dict[str, Tensor]:
    """UNet weights by our names: the LitEma shadows when asked and present, else model.diffusion_model.*."""
    raw = {k[len(UNET) :]: v for k, v in state.items() if k.startswith(UNET)}
    if not use_ema:
        return raw
    found = {n: state[ema_key(n)] for n in param_names if ema_key(n) in state}
    if not found:
        log.info("no model_ema.* weights in the checkpoint: its model.diffusion_model.* weights are used")
        return raw
    if len(found) != len(param_names):
        missing = next(n for n in param_names if n not in found)
        raise UserError(
            f"the checkpoint's EMA weights (model_ema.*) are incomplete: {len(param_names) - len(found)} of "
            f"{len(param_names)} UNet parameters missing (e.g. {ema_key(missing)}); pass use_ema=false."
        )
    return {**raw, **found}  # buffers (none in our UNet today) stay raw


# -- the yaml --------------------------------------------------------------------------------------------


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """`model.params` of a CompVis inference yaml, with a clear error for anything else."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config={path}: no such file. Pass the CompVis yaml, e.g. v1-inference.yaml.")
    try:
        raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception as e:  # noqa: BLE001 - any YAML/OmegaConf failure is the user's file
        raise UserError(f"config={path} is not readable YAML ({type(e).__name__}: {e}).") from None
    params = ((raw or {}).get("model") or {}).get("params") if isinstance(raw, dict) else None
    if not isinstance(params, dict) or "unet_config" not in params or "first_stage_config" not in params:
        raise UserError(
            f"config={path} is not a CompVis LatentDiffusion yaml: expected model.params with unet_config "
            "and first_stage_config (as in configs/stable-diffusion/v1-inference.yaml)."
        )
    return params


def build_unet(params: Mapping[str, Any]) -> UNetModel:
    """Our UNetModel from `unet_config` (`params` of it)."""
    unet_params = dict(params["unet_config"].get("params") or {})
    unet_params["use_checkpoint"] = False  # gradient checkpointing only helps training
    return UNetModel.from_compvis_config(unet_params)


def build_autoencoder(params: Mapping[str, Any]) -> tuple[AutoencoderKL, dict]:
    """AutoencoderKL (+ its `_target_` config) from `first_stage_config`; only KL autoencoders (SD's)."""
    first = params["first_stage_config"]
    target = str(first.get("target", ""))
    if not target.endswith("AutoencoderKL"):
        raise UserError(
            f"first_stage_config.target={target}: only AutoencoderKL first stages (Stable Diffusion's) load "
            "from CompVis checkpoints."
        )
    p = first.get("params") or {}
    config = {
        "_target_": "ldm.models.autoencoder.AutoencoderKL",
        "embed_dim": int(p["embed_dim"]),
        "ddconfig": dict(p["ddconfig"]),
    }  # monitor, lossconfig, ckpt_path: training-only
    return AutoencoderKL(config["ddconfig"], config["embed_dim"]), config


def build_loss(params: Mapping[str, Any], state: Mapping[str, Tensor]) -> DiffusionLoss:
    """Schedule and parameterisation; a checkpoint's stored alphas_cumprod wins if it disagrees."""
    kind = params.get("beta_schedule", "linear")
    if kind not in SCHEDULES:
        raise UserError(f"beta_schedule={kind!r} is not supported; supported: {sorted(SCHEDULES)}.")
    schedule = NoiseSchedule(
        kind=SCHEDULES[kind],
        num_timesteps=int(params.get("timesteps", 1000)),
        beta_start=float(params.get("linear_start", 1e-4)),  # CompVis defaults
        beta_end=float(params.get("linear_end", 2e-2)),
        cosine_s=float(params.get("cosine_s", 8e-3)),
    )
    stored = state.get("alphas_cumprod")
    if stored is not None and not torch.allclose(
        stored.float(), schedule.alphas_cumprod, rtol=1e-4, atol=1e-6
    ):
        log.warning(
            "the yaml's noise schedule differs from the checkpoint's alphas_cumprod: using the checkpoint's"
        )
        schedule = NoiseSchedule.from_alphas_cumprod(stored.float())
    return DiffusionLoss(schedule, parameterization=params.get("parameterization", "eps"))


def build_conditioner(
    params: Mapping[str, Any], state: Mapping[str, Tensor], text_encoder: str | None, latent_channels: int
) -> Conditioner:
    """cond_stage_config + conditioning_key -> our Conditioner (CLIP text, SD-inpainting concat, or none)."""
    cond_cfg = params.get("cond_stage_config")
    key = params.get("conditioning_key")
    target = cond_cfg if isinstance(cond_cfg, str) else str((cond_cfg or {}).get("target", ""))
    conditioners: dict[str, Any] = {}
    if target == "__is_unconditional__" or cond_cfg is None:
        pass
    elif target.rsplit(".", 1)[-1] in CLIP_TARGETS:
        cp = (cond_cfg or {}).get("params") or {}
        conditioners[TEXT_NAME] = clip_text_encoder(
            text_encoder,
            clip_state(state),
            max_length=int(cp.get("max_length", 77)),
            layer=cp.get("layer", "last"),
        )
    else:
        raise UserError(
            f"cond_stage_config.target={target} is not supported for CompVis checkpoints; supported: "
            "FrozenCLIPEmbedder (Stable Diffusion v1) and __is_unconditional__."
        )
    if key == "hybrid":  # SD-inpainting: cat([z_t, mask, E(masked image)]) + CLIP cross-attention
        conditioners = {"inpaint": InpaintingConditioner(latent_channels=latent_channels), **conditioners}
    elif key not in (None, "crossattn"):
        raise UserError(f"conditioning_key={key!r} is not supported; supported: crossattn, hybrid, none.")
    return Conditioner(conditioners)


# -- the CLIP text encoder -------------------------------------------------------------------------------


def clip_state(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The checkpoint's CLIP text weights by transformers-5 CLIPTextModel names (no `text_model.` level)."""
    out = {k[len(CLIP_TEXT) :]: v for k, v in state.items() if k.startswith(CLIP_TEXT)}
    out.pop("embeddings.position_ids", None)
    if not out:
        raise UserError(
            "the checkpoint has no CLIP text weights (cond_stage_model.transformer.text_model.*), but "
            "its yaml uses FrozenCLIPEmbedder; is it a UNet-only or pruned file?"
        )
    return out


def _clip_config(weights: Mapping[str, Tensor], tokenizer: Any) -> Any:
    """A CLIPTextConfig read off the weights' shapes (heads: CLIP's 64-wide convention)."""
    from transformers import CLIPTextConfig

    vocab, hidden = weights["embeddings.token_embedding.weight"].shape
    layers = 1 + max(int(k.split(".")[2]) for k in weights if k.startswith("encoder.layers."))
    return CLIPTextConfig(
        vocab_size=int(vocab),
        hidden_size=int(hidden),
        intermediate_size=int(weights["encoder.layers.0.mlp.fc1.weight"].shape[0]),
        num_hidden_layers=layers,
        num_attention_heads=max(1, int(hidden) // 64),
        max_position_embeddings=int(weights["embeddings.position_embedding.weight"].shape[0]),
        hidden_act="quick_gelu",  # OpenAI CLIP (SD v1's ViT-L/14)
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def clip_text_encoder(
    folder: str | None, weights: Mapping[str, Tensor], max_length: int = 77, layer: str = "last"
) -> FrozenTextEncoder:
    """FrozenTextEncoder over the checkpoint's own CLIP weights; `folder` supplies the tokenizer files.

    A full `save_pretrained` folder (config.json + weights) is used as is (its weights then replaced by the
    checkpoint's). For a tokenizer-only folder the text model's config is read off the weight shapes and a
    temporary folder is assembled, so FrozenTextEncoder loads through its one, offline path.
    """
    if not folder:
        raise UserError(
            "this CompVis checkpoint encodes prompts with CLIP, whose tokenizer is not stored in the "
            "checkpoint: pass text_encoder=<local folder with the CLIP tokenizer files (tokenizer.json, or "
            "vocab.json + merges.txt)>, e.g. a download of openai/clip-vit-large-patch14."
        )
    path = Path(folder).expanduser()
    if not path.is_dir() or not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise UserError(
            f"text_encoder={folder}: not a folder with CLIP tokenizer files (tokenizer.json, or vocab.json + "
            "merges.txt). Pass the folder of openai/clip-vit-large-patch14 (or any CLIP tokenizer)."
        )
    complete = (path / "config.json").is_file() and any((path / f).is_file() for f in WEIGHT_FILES)
    if complete:
        encoder = FrozenTextEncoder(model=str(path), max_length=max_length, layer=layer)
    else:
        with tempfile.TemporaryDirectory(prefix="ldm_clip_") as tmp:
            from transformers import AutoTokenizer

            try:
                tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            except (OSError, ValueError) as e:
                raise UserError(f"text_encoder={folder}: could not read the CLIP tokenizer ({e}).") from None
            tokenizer.save_pretrained(tmp)
            config = _clip_config(weights, tokenizer)
            config.save_pretrained(tmp)
            save_file({k: v.contiguous() for k, v in weights.items()}, os.path.join(tmp, "model.safetensors"))
            encoder = FrozenTextEncoder(model=tmp, max_length=max_length, layer=layer)
        encoder.model_name = str(path)
    load_text_weights(encoder, weights)
    return encoder


def load_text_weights(encoder: FrozenTextEncoder, weights: Mapping[str, Tensor]) -> None:
    """Load CLIPTextModel weights (5.x names) into the encoder; refresh its cached null context."""
    model = encoder.transformer
    own = model.state_dict()
    prefix = "text_model." if any(k.startswith("text_model.") for k in own) else ""  # transformers 4.x
    mapped = {prefix + k: v.to(own[prefix + k].dtype) for k, v in weights.items() if prefix + k in own}
    missing = sorted(set(own) - set(mapped))
    unexpected = sorted(k for k in weights if prefix + k not in own)
    if missing or unexpected:
        raise UserError(
            f"the checkpoint's CLIP text weights do not fit the text encoder from {encoder.model_name}: "
            f"missing {missing[:3]}, unexpected {unexpected[:3]}. Pass the tokenizer folder of the CLIP "
            "model the checkpoint was trained with (SD v1: openai/clip-vit-large-patch14)."
        )
    model.load_state_dict(mapped, strict=True)
    refresh_null_context(encoder)


def refresh_null_context(encoder: FrozenTextEncoder) -> None:
    """Recompute the cached encoding of "" after the encoder's weights changed."""
    with torch.no_grad():
        encoder.null_context.copy_(encoder.encode_prompts([""]).to(encoder.null_context))


# -- the whole model -------------------------------------------------------------------------------------


def load_compvis(
    state: Mapping[str, Tensor],
    yaml_path: str | os.PathLike,
    *,
    use_ema: bool = True,
    text_encoder: str | None = None,
) -> tuple[Any, dict]:
    """(LatentDiffusionModule, summary) from a CompVis state dict and its inference yaml."""
    from ldm.training.diffusion_module import LatentDiffusionModule

    params = read_yaml(yaml_path)
    latent_channels = int((params["first_stage_config"].get("params") or {}).get("embed_dim", 4))
    conditioner = build_conditioner(params, state, text_encoder, latent_channels)  # cheap checks first
    with torch.device("meta"):  # no random init of ~1B parameters that are overwritten right away
        unet = build_unet(params)
        autoencoder, ae_config = build_autoencoder(params)
    names = [n for n, _ in unet.named_parameters()]
    load_into(unet, unet_weights(state, names, use_ema), f"{yaml_path} (unet_config)", assign=True)
    first = {k[len(FIRST_STAGE) :]: v for k, v in state.items() if k.startswith(FIRST_STAGE)}
    load_into(autoencoder, first, f"{yaml_path} (first_stage_config)", assign=True)
    autoencoder.eval().requires_grad_(False)
    scale = (
        state["scale_factor"].item() if "scale_factor" in state else float(params.get("scale_factor", 1.0))
    )
    module = LatentDiffusionModule(
        unet=unet,
        conditioner=conditioner,
        first_stage=LatentCodec(autoencoder, scale, ae_config),
        loss=build_loss(params, state),
        optim={},
        ema_decay=0.0,  # sampling only: the EMA weights (if wanted) are already in the UNet
    )
    summary = {
        "unet_config": params["unet_config"].get("params"),
        "scale_factor": scale,
        "image_size": int(params.get("image_size", 64)) * autoencoder.downsample_factor,
        "used_ema": use_ema and any(k.startswith(EMA) for k in state),
    }
    return module, summary


def load_into(
    module: torch.nn.Module,
    weights: Mapping[str, Tensor],
    config_name: str,
    skip: tuple[str, ...] = (),  # prefixes loaded elsewhere (e.g. a pretrained text encoder)
    assign: bool = False,  # take the tensors themselves (for modules built on the meta device)
) -> None:
    """Load weights cast to each tensor's dtype; every tensor not under `skip` covered, none left over."""
    own = module.state_dict()
    missing = sorted(k for k in own if k not in weights and not k.startswith(skip))
    unexpected = sorted(k for k in weights if k not in own)
    bad_shape = sorted(k for k in weights if k in own and tuple(weights[k].shape) != tuple(own[k].shape))
    if missing or unexpected or bad_shape:
        detail = []
        if missing:
            detail.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            detail.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if bad_shape:
            k = bad_shape[0]
            theirs, ours = tuple(weights[k].shape), tuple(own[k].shape)
            detail.append(f"{len(bad_shape)} with another shape (e.g. {k}: {theirs} vs {ours})")
        raise UserError(
            f"the checkpoint's weights do not match the model built from {config_name}: {'; '.join(detail)}. "
            "Is it the config this checkpoint was trained with?"
        )
    cast = {k: v.to(own[k].dtype) for k, v in weights.items()}
    module.load_state_dict(cast, strict=False, assign=assign)


__all__ = [
    "build_autoencoder",
    "build_conditioner",
    "build_loss",
    "build_unet",
    "clip_state",
    "clip_text_encoder",
    "ema_key",
    "is_compvis_state",
    "load_compvis",
    "load_into",
    "read_yaml",
    "refresh_null_context",
    "to_our_names",
    "unet_weights",
]
