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
from ldm.interop import registry
from ldm.interop.registry import BuildContext, class_name, load_families
from ldm.models.first_stage import LatentCodec
from ldm.models.latent_diffusion import LatentDiffusion
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


def is_compvis_yaml(path: str | os.PathLike) -> bool:
    """Whether a yaml is an original inference config (model.params.unet_config), not a train.py config."""
    try:
        raw = OmegaConf.to_container(OmegaConf.load(Path(path)), resolve=False)
    except Exception:  # noqa: BLE001 - read_yaml reports unreadable files with their error
        return True
    model = raw.get("model") if isinstance(raw, dict) else None
    return not (
        isinstance(model, dict) and "params" not in model and ("unet" in model or "_target_" in model)
    )


def state_summary(state: Mapping[str, Tensor]) -> str:
    """What a state dict holds, for messages: key prefixes, UNet in/out channels, cross-attention width."""
    prefixes = sorted(
        {".".join(k.split(".")[:2]) if k.startswith("model.") else k.split(".")[0] for k in state}
    )
    parts = [f"key prefixes {', '.join(prefixes[:8])}{' ...' if len(prefixes) > 8 else ''}"]
    first = state.get(UNET + "input_blocks.0.0.weight")
    last = state.get(UNET + "out.2.weight")
    if first is not None and last is not None:
        parts.append(f"UNet in/out channels {first.shape[1]}/{last.shape[0]}")
    context = next(
        (v for k, v in state.items() if k.startswith(UNET) and k.endswith("attn2.to_k.weight")), None
    )
    parts.append(f"context width {context.shape[1]}" if context is not None else "no cross-attention")
    return "; ".join(parts)


def describe_unknown(state: Mapping[str, Tensor], path: str | os.PathLike) -> str:
    """The message for an original-layout file no family recognises without its yaml."""
    return (
        f"{path} is an original CompVis/Stability checkpoint ({state_summary(state)}) that no supported "
        "family matches without its yaml: pass config=<its inference yaml> (e.g. v1-inference.yaml, "
        "v2-inference-v.yaml, x4-upscaling.yaml, or the config.yaml of an LDM model folder)."
    )


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


# Where the original code (and tools that re-saved its files) put the EMA shadows of the UNet: LitEma's
# dot-less names under model_ema. (CompVis, Stability), the same with the dots kept, or under ema./ema_model.
EMA_PREFIXES = ("model_ema.", "ema_model.", "ema.")
_EMA_LEVELS = ("module", "model", "diffusion_model")  # levels between the prefix and the UNet's names


def find_ema(state: Mapping[str, Tensor], param_names: list[str]) -> dict[str, Tensor]:
    """EMA shadows of the UNet parameters `param_names` by our names, in any layout the originals wrote."""
    dotless: dict[str, str] = {}
    for key in state:
        for prefix in EMA_PREFIXES:
            if key.startswith(prefix):
                rest = key[len(prefix) :]
                for level in _EMA_LEVELS:
                    rest = rest[len(level) :].lstrip(".") if rest.startswith(level) else rest
                dotless.setdefault(rest.replace(".", ""), key)
    return {n: state[dotless[n.replace(".", "")]] for n in param_names if n.replace(".", "") in dotless}


def unet_weights(
    state: Mapping[str, Tensor], param_names: list[str], use_ema: bool
) -> tuple[dict[str, Tensor], bool]:
    """(UNet weights by our names, whether they are EMA shadows): the shadows when asked and present."""
    raw = {k[len(UNET) :]: v for k, v in state.items() if k.startswith(UNET)}
    if not use_ema:
        return raw, False
    found = find_ema(state, param_names)
    if not found:
        has_ema_keys = any(k.startswith(EMA_PREFIXES) for k in state)
        log.warning(
            "%s: the UNet's model.diffusion_model.* weights are used",
            "EMA keys found but none matches a UNet parameter"
            if has_ema_keys
            else "no EMA weights (model_ema.*) in the checkpoint",
        )
        return raw, False
    if len(found) != len(param_names):
        missing = next(n for n in param_names if n not in found)
        raise UserError(
            f"the checkpoint's EMA weights (model_ema.*) are incomplete: {len(param_names) - len(found)} of "
            f"{len(param_names)} UNet parameters missing (e.g. {ema_key(missing)}); pass use_ema=false."
        )
    return {**raw, **found}, True  # buffers (none in our UNet today) stay raw


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


def read_model_target(path: str | os.PathLike) -> str:
    """`model.target` of a CompVis yaml (LatentDiffusion, LatentUpscaleDiffusion, LatentInpaintDiffusion)."""
    raw = OmegaConf.to_container(OmegaConf.load(Path(path)), resolve=True)
    return str(((raw or {}).get("model") or {}).get("target", ""))


def build_unet(params: Mapping[str, Any]) -> UNetModel:
    """Our UNetModel from `unet_config` (`params` of it)."""
    unet_params = dict(params["unet_config"].get("params") or {})
    unet_params["use_checkpoint"] = False  # gradient checkpointing only helps training
    return UNetModel.from_compvis_config(unet_params)


def build_autoencoder(params: Mapping[str, Any]) -> tuple[torch.nn.Module, dict]:
    """The first stage (+ its `_target_` config) from `first_stage_config`, by the builder of its target."""
    load_families()
    first = params["first_stage_config"]
    target = str(first.get("target", ""))
    builder = registry.FIRST_STAGE.get(class_name(target))
    if builder is None:
        raise UserError(
            f"first_stage_config.target={target} is not a first stage we can build; supported: "
            f"{', '.join(sorted(registry.FIRST_STAGE))}."
        )
    return builder(dict(first.get("params") or {}))


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


def build_conditioner(ctx: BuildContext) -> Conditioner:
    """cond_stage_config + conditioning_key (+ the model class's extras) -> our Conditioner."""
    load_families()
    key, target = ctx.conditioning_key, ctx.cond_target
    conditioners: dict[str, Any] = {}
    if key is not None:
        builder = registry.COND_STAGE.get(class_name(target))
        if builder is None:
            raise UserError(
                f"{ctx.where('cond_stage_config.target')}={target} is not supported; supported: "
                f"{', '.join(sorted(registry.COND_STAGE))} and __is_unconditional__."
            )
        conditioners.update(builder(ctx))
    extras = registry.MODEL_KIND.get(class_name(ctx.extra.get("model_target") or ""))
    if extras is not None:
        conditioners.update(extras(ctx))
    if key == "hybrid":  # SD-inpainting: cat([z_t, mask, E(masked image)]) + CLIP cross-attention
        conditioners = {"inpaint": InpaintingConditioner(latent_channels=ctx.latent_channels), **conditioners}
    elif key not in (None, "crossattn", "concat", "hybrid-adm"):  # hybrid-adm: x4's concat + class (extras)
        raise UserError(
            f"{ctx.where('conditioning_key')}={key!r} is not supported; supported: crossattn, concat, "
            "hybrid, none."
        )
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
    """(LatentDiffusion, summary) from a CompVis state dict and its inference yaml."""

    params = read_yaml(yaml_path)
    latent_channels = int((params["first_stage_config"].get("params") or {}).get("embed_dim", 4))
    ctx = BuildContext(
        params=params,
        state=state,
        yaml_path=Path(yaml_path),
        text_encoder=text_encoder,
        latent_channels=latent_channels,
        extra={"model_target": read_model_target(yaml_path)},
    )
    conditioner = build_conditioner(ctx)  # cheap checks (tokenizer folders, cond-stage keys) first
    with torch.device("meta"):  # no random init of ~1B parameters that are overwritten right away
        unet = build_unet(params)
        autoencoder, ae_config = build_autoencoder(params)
    names = [n for n, _ in unet.named_parameters()]
    weights, used_ema = unet_weights(state, names, use_ema)
    load_into(unet, weights, f"{yaml_path} (unet_config)", assign=True)
    first = {k[len(FIRST_STAGE) :]: v for k, v in state.items() if k.startswith(FIRST_STAGE)}
    load_into(autoencoder, first, f"{yaml_path} (first_stage_config)", assign=True)
    autoencoder.eval().requires_grad_(False)
    scale = (
        state["scale_factor"].item() if "scale_factor" in state else float(params.get("scale_factor", 1.0))
    )
    model = LatentDiffusion(
        unet=unet,
        conditioner=conditioner,
        first_stage=LatentCodec(autoencoder, scale, ae_config),
        loss=build_loss(params, state),
        unet_key=f"{yaml_path}: model.params.unet_config.params",
    )
    summary = {
        "unet_config": params["unet_config"].get("params"),
        "scale_factor": scale,
        "image_size": int(params.get("image_size", 64)) * autoencoder.downsample_factor,
        "used_ema": used_ema,
    }
    return model, summary


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
