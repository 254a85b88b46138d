"""Stable Diffusion models to and from a diffusers folder (`StableDiffusionPipeline.save_pretrained` layout).

    OUT_DIR/model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/

Writing goes through the original layout (`ldm.interop.export.original_state`) and diffusers' own maintained
single-file converters (`diffusers.loaders.single_file_utils`: `create_unet_diffusers_config_from_ldm`,
`convert_ldm_unet_checkpoint`, `create_vae_diffusers_config_from_ldm`, `convert_ldm_vae_checkpoint`), so the
folder is what diffusers itself makes of the single-file export. The text encoder is already a transformers
`CLIPTextModel` and is saved as it is (SD 2's `penultimate` layer: without its last layer, as Stability's
diffusers folders ship it).

Reading (`load_diffusers_folder`, used by `load_model(<folder with model_index.json>)`) needs the inverse,
which diffusers does not ship as a library function: it is derived from the same converters by running them
once on placeholder tensors of the original shapes and following each tensor to its new name, so the two
directions cannot drift apart. diffusers is an optional dependency: `pip install 'ldm[diffusers]'`.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ldm.errors import UserError

log = logging.getLogger(__name__)

CLIP_TARGET = "ldm.modules.encoders.modules.FrozenCLIPEmbedder"
OPENCLIP_TARGET = "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder"
# our NoiseSchedule kind -> CompVis beta_schedule (CompVis "linear" is linear in sqrt(beta))
BETA_SCHEDULES = {"scaled_linear": "linear", "linear": "sqrt_linear", "cosine": "cosine"}
DIFFUSERS_BETAS = {"linear": "scaled_linear", "sqrt_linear": "linear"}  # CompVis -> diffusers names


def _diffusers() -> Any:
    try:
        import diffusers
    except ImportError:
        raise UserError(
            "the diffusers format needs the optional dependency diffusers: pip install 'ldm[diffusers]'."
        ) from None
    return diffusers


def original_config_of_run(run_config: Mapping[str, Any], model: Any) -> dict:
    """An original inference yaml (as a dict) for a train.py run with a CLIP text encoder (SD 1.x/2.x shape).

    Raises UserError for a run no original family describes (e.g. a MiniLM text encoder)."""
    model_cfg = dict(run_config.get("model") or {})
    unet = {k: v for k, v in dict(model_cfg.get("unet") or {}).items() if not k.startswith("_")}
    unet["use_spatial_transformer"] = unet.get("context_dim") is not None
    unet.setdefault("transformer_depth", 1)  # the original's default, which diffusers' converter reads
    unet.pop("pooled_context", None)  # our option (false here: original_state refuses a UNet using it)
    ae = dict(run_config.get("first_stage_autoencoder") or {})
    if not str(ae.get("_target_", "")).endswith("AutoencoderKL"):
        raise UserError("only a KL first stage (AutoencoderKL) has an SD-style original yaml here.")
    text = [c for c in model.conditioner.conditioners.values() if getattr(c, "is_clip", False)]
    if len(model.conditioner.conditioners) != 1 or len(text) != 1:
        names = ", ".join(f"{k} ({type(c).__name__})" for k, c in model.conditioner.conditioners.items())
        raise UserError(
            f"the run's conditioner ({names or 'none'}) is not one CLIP text encoder, so it has no Stable "
            "Diffusion counterpart (original yaml / diffusers folder)."
        )
    encoder = text[0]
    openclip = encoder.transformer.config.hidden_act == "gelu"
    schedule_cfg = dict((model_cfg.get("loss") or {}).get("schedule") or {})
    kind = schedule_cfg.get("kind", "scaled_linear")
    if kind not in BETA_SCHEDULES:
        raise UserError(f"model.loss.schedule kind={kind!r} has no CompVis equivalent.")
    factor = model.first_stage.downsample_factor
    size = run_config.get("sample_size") or [(run_config.get("data") or {}).get("resolution") or 512] * 2
    params = {
        "linear_start": float(schedule_cfg.get("beta_start", 0.00085)),
        "linear_end": float(schedule_cfg.get("beta_end", 0.012)),
        "beta_schedule": BETA_SCHEDULES[kind],
        "timesteps": int(schedule_cfg.get("num_timesteps", 1000)),
        "parameterization": model.parameterization,
        "image_size": int(size[0]) // factor,
        "channels": int(model.first_stage.latent_channels),
        "conditioning_key": "crossattn",
        "scale_factor": float(model.first_stage.scale_factor),
        "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": unet},
        "first_stage_config": {
            "target": "ldm.models.autoencoder.AutoencoderKL",
            "params": {"embed_dim": int(ae["embed_dim"]), "ddconfig": dict(ae["ddconfig"])},
        },
        "cond_stage_config": {
            "target": OPENCLIP_TARGET if openclip else CLIP_TARGET,
            "params": {"layer": encoder.layer, "max_length": encoder.max_length},
        },
    }
    if schedule_cfg.get("zero_terminal_snr"):  # not a named schedule: the original DDPM's given_betas
        ac = model.schedule.alphas_cumprod.double().cpu()
        params["given_betas"] = (1 - ac / torch.cat([ac.new_ones(1), ac[:-1]])).tolist()
    return {"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": params}}


def _read_yaml(path: Path) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)


def sd_text_encoder(model: Any) -> Any:
    """The model's one CLIP text encoder (FrozenTextEncoder) or a UserError saying why it is not SD-shaped."""
    conditioners = model.conditioner.conditioners
    if set(conditioners) != {"text"} or not getattr(conditioners["text"], "is_clip", False):
        names = ", ".join(f"{k} ({type(c).__name__})" for k, c in conditioners.items())
        raise UserError(
            f"the diffusers folder is written for Stable Diffusion text-to-image models (one CLIP / OpenCLIP "
            f"text encoder); this model's conditioners are {names or 'none'}. Use the original layout "
            "(--format original) instead."
        )
    return conditioners["text"]


def scheduler_config(params: Mapping[str, Any], alphas_cumprod: Tensor) -> dict:
    """diffusers scheduler kwargs for the yaml's schedule; explicit trained_betas when the names do not
    reproduce our alphas_cumprod within 1e-6."""
    kind = params.get("beta_schedule", "linear")
    config: dict[str, Any] = {
        "num_train_timesteps": int(params.get("timesteps", 1000)),
        "beta_start": float(params.get("linear_start", 1e-4)),
        "beta_end": float(params.get("linear_end", 2e-2)),
        "beta_schedule": DIFFUSERS_BETAS.get(kind, "scaled_linear"),
        "prediction_type": "v_prediction" if params.get("parameterization") == "v" else "epsilon",
        "set_alpha_to_one": False,
        "steps_offset": 1,
        "skip_prk_steps": True,
    }
    diffusers = _diffusers()
    made = diffusers.DDIMScheduler(**{k: v for k, v in config.items() if k != "skip_prk_steps"})
    if kind not in DIFFUSERS_BETAS or not torch.allclose(
        made.alphas_cumprod.float(), alphas_cumprod.float().cpu(), rtol=1e-6, atol=1e-7
    ):
        ac = alphas_cumprod.double().cpu()
        prev = torch.cat([ac.new_ones(1), ac[:-1]])
        config["trained_betas"] = (1 - ac / prev).tolist()
    return config


def export_diffusers(
    source: Any, out_dir: str | os.PathLike, *, dtype: str = "fp32", ema: str = "only"
) -> Path:
    """Write `source` (an `ldm.interop.export.Source`) as a StableDiffusionPipeline folder at `out_dir`.

    `ema`: only (EMA weights when the source has them) | none (raw weights). Written into a temp folder beside
    `out_dir` and renamed over it at the end, so a failure leaves no half folder."""
    from ldm.interop.export import DTYPES, original_state, with_conditioner_ema

    diffusers = _diffusers()
    from diffusers.loaders import single_file_utils as sfu

    out_dir = Path(out_dir)
    model = source.model
    encoder = sd_text_encoder(model)
    if source.yaml is not None:
        config = _read_yaml(source.yaml)
    elif getattr(source, "original_config", None) is not None:
        config = source.original_config
    else:
        config = original_config_of_run(source.run_config or {}, model)
    params = config["model"]["params"]
    if params.get("conditioning_key", "crossattn") != "crossattn":
        raise UserError(
            "only text-to-image Stable Diffusion models (conditioning_key crossattn) are supported."
        )
    weights = source.ema if ema != "none" else None
    state = original_state(model, weights, ema_only=True, betas=source.betas)
    torch_dtype = DTYPES[dtype]
    unet_cfg = sfu.create_unet_diffusers_config_from_ldm(config, state)
    unet_cfg["sample_size"] = int(params.get("image_size", 64))  # latent side it was trained at
    unet_params = params["unet_config"]["params"]
    if unet_cfg.get("attention_head_dim") is None and int(unet_params.get("num_head_channels", -1)) > 0:
        # The helper reads num_head_channels only with linear projections (SD 2); our runs may use it with
        # 1x1-conv ones. diffusers' attention_head_dim is the number of heads per level (its SD 1.x naming).
        width = int(unet_params["num_head_channels"])
        unet_cfg["attention_head_dim"] = [int(c) // width for c in unet_cfg["block_out_channels"]]
    unet = diffusers.UNet2DConditionModel(**unet_cfg)
    unet.load_state_dict(sfu.convert_ldm_unet_checkpoint(state, unet_cfg), strict=True)
    image_size = int(params.get("image_size", 64)) * model.first_stage.downsample_factor
    vae_cfg = sfu.create_vae_diffusers_config_from_ldm(
        config, state, scaling_factor=float(model.first_stage.scale_factor)
    )
    vae_cfg["sample_size"] = image_size  # the pixel size it was trained at (only used for tiling)
    vae = diffusers.AutoencoderKL(**vae_cfg)
    vae.load_state_dict(sfu.convert_ldm_vae_checkpoint(state, vae_cfg), strict=True)
    undo = with_conditioner_ema(model, weights)  # a trainable text encoder's EMA weights, if any
    try:
        text_encoder = _text_model_for_diffusers(encoder)
    finally:
        undo()
    scheduler = diffusers.PNDMScheduler(**scheduler_config(params, model.schedule.alphas_cumprod))
    if torch_dtype != torch.float32:
        vae, text_encoder, unet = (m.to(torch_dtype) for m in (vae, text_encoder, unet))
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=encoder.tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote the diffusers folder %s (unet, vae, text_encoder, tokenizer, scheduler)", out_dir)
    return out_dir


def _text_model_for_diffusers(encoder: Any) -> Any:
    """A copy of the CLIPTextModel whose last_hidden_state is what the UNet was trained on: SD 2's
    `penultimate` layer (+ final LayerNorm) is the model without its last layer."""
    import copy

    text_model = copy.deepcopy(encoder.transformer)
    if encoder.layer == "penultimate":
        inner = getattr(text_model, "text_model", text_model)
        inner.encoder.layers = inner.encoder.layers[:-1]
        text_model.config.num_hidden_layers -= 1
    elif encoder.layer != "last":
        raise UserError(
            f"text encoder layer={encoder.layer!r}: only last / penultimate have a diffusers form."
        )
    return text_model


# -- reading a diffusers folder ---------------------------------------------------------------------------


def _inverse(convert: Any, shapes: Mapping[str, tuple[int, ...]], config: dict) -> dict[str, str]:
    """{diffusers name: original name} for one of diffusers' ldm -> diffusers converters.

    The converter is run once on placeholder tensors of the original names and shapes (`torch.empty`: no
    memory is touched); it only renames and takes views (`[:, :, 0, 0]` of 1x1 convs), so every output
    tensor shares its storage with exactly one input, which names it."""
    placeholders = {name: torch.empty(shape) for name, shape in shapes.items()}
    owner = {t.untyped_storage().data_ptr(): name for name, t in placeholders.items()}
    converted = convert(placeholders, config)
    out = {}
    for name, tensor in converted.items():
        source = owner.get(tensor.untyped_storage().data_ptr())
        if source is None:
            raise UserError(
                f"diffusers' converter made {name} from no single original tensor; cannot invert."
            )
        out[name] = source
    return out


def _original_config_of_folder(unet: Mapping, vae: Mapping, scheduler: Mapping, text: Any) -> dict:
    """The original inference yaml (dict) a StableDiffusionPipeline folder's configs describe."""
    widths = list(unet["block_out_channels"])
    heads = unet["attention_head_dim"]
    attention, factor = [], 1
    for kind in unet["down_block_types"]:
        if kind.startswith("CrossAttn"):
            attention.append(factor)
        factor *= 2
    unet_params: dict[str, Any] = {
        "in_channels": int(unet["in_channels"]),
        "out_channels": int(unet["out_channels"]),
        "model_channels": int(widths[0]),
        "attention_resolutions": attention,
        "num_res_blocks": int(unet["layers_per_block"]),
        "channel_mult": [int(w) // int(widths[0]) for w in widths],
        "use_spatial_transformer": True,
        "transformer_depth": int(unet.get("transformer_layers_per_block") or 1),
        "context_dim": int(unet["cross_attention_dim"]),
        "use_linear_in_transformer": bool(unet.get("use_linear_projection")),
        "legacy": False,
    }
    if isinstance(heads, (list, tuple)):  # SD 2.x: heads per level, 64 channels each
        unet_params["num_head_channels"] = int(widths[0]) // int(heads[0])
    else:  # SD 1.x: diffusers' attention_head_dim is the number of heads
        unet_params["num_heads"] = int(heads)
    ae = list(vae["block_out_channels"])
    ddconfig = {
        "double_z": True,
        "z_channels": int(vae["latent_channels"]),
        "resolution": int(vae.get("sample_size") or 512),
        "in_channels": int(vae["in_channels"]),
        "out_ch": int(vae["out_channels"]),
        "ch": int(ae[0]),
        "ch_mult": [int(c) // int(ae[0]) for c in ae],
        "num_res_blocks": int(vae["layers_per_block"]),
        "attn_resolutions": [],
        "dropout": 0.0,
    }
    schedule = {v: k for k, v in DIFFUSERS_BETAS.items()}
    openclip = text.config.hidden_act == "gelu"
    params = {
        "linear_start": float(scheduler.get("beta_start", 0.00085)),
        "linear_end": float(scheduler.get("beta_end", 0.012)),
        "beta_schedule": schedule.get(scheduler.get("beta_schedule", "scaled_linear"), "linear"),
        "timesteps": int(scheduler.get("num_train_timesteps", 1000)),
        "parameterization": "v" if scheduler.get("prediction_type") == "v_prediction" else "eps",
        "image_size": int(unet.get("sample_size") or 64),
        "channels": int(vae["latent_channels"]),
        "conditioning_key": "crossattn",
        "scale_factor": float(vae.get("scaling_factor", 0.18215)),
        "unet_config": {
            "target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
            "params": unet_params,
        },
        "first_stage_config": {
            "target": "ldm.models.autoencoder.AutoencoderKL",
            "params": {"embed_dim": int(vae["latent_channels"]), "ddconfig": ddconfig},
        },
        # diffusers' SD 2 text encoder already ends at the penultimate layer: its last states are what SD uses
        "cond_stage_config": {
            "target": OPENCLIP_TARGET if openclip else CLIP_TARGET,
            "params": {"layer": "last"},
        },
    }
    return {"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": params}}


def load_diffusers_folder(folder: str | os.PathLike, text_encoder: str | None = None) -> tuple[Any, dict]:
    """(LatentDiffusion, summary) from a StableDiffusionPipeline folder (unet/, vae/, text_encoder/,
    tokenizer/, scheduler/), through the original layout and `compvis.load_compvis` (one loading path).

    `text_encoder`: a tokenizer folder to use instead of the folder's tokenizer/."""
    import json

    from omegaconf import OmegaConf
    from transformers import CLIPTextModel

    from ldm.interop import compvis
    from ldm.interop.export import schedule_buffers
    from ldm.interop.families.sd1 import clip_export
    from ldm.interop.openclip import OPENCLIP, openclip_state

    diffusers = _diffusers()
    from diffusers.loaders import single_file_utils as sfu

    folder = Path(folder)
    index = json.loads((folder / "model_index.json").read_text())
    missing = [
        p for p in ("unet", "vae", "text_encoder", "tokenizer", "scheduler") if not (folder / p).is_dir()
    ]
    if missing or "StableDiffusion" not in str(index.get("_class_name", "")):
        raise UserError(
            f"{folder}: a diffusers folder of {index.get('_class_name')} (missing {missing or 'nothing'}); "
            "only Stable Diffusion text-to-image folders (unet/, vae/, text_encoder/, tokenizer/, "
            "scheduler/) load."
        )
    unet = diffusers.UNet2DConditionModel.from_pretrained(folder / "unet", local_files_only=True)
    vae = diffusers.AutoencoderKL.from_pretrained(folder / "vae", local_files_only=True)
    text = CLIPTextModel.from_pretrained(folder / "text_encoder", local_files_only=True)
    scheduler_cfg = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    config = _original_config_of_folder(unet.config, vae.config, scheduler_cfg, text)
    with torch.device("meta"):
        our_unet = compvis.build_unet(config["model"]["params"])
        our_ae, _ = compvis.build_autoencoder(config["model"]["params"])
    state: dict[str, Tensor] = {}
    for prefix, ours, theirs, convert, cfg in (
        (compvis.UNET, our_unet, unet, sfu.convert_ldm_unet_checkpoint, dict(unet.config)),
        (compvis.FIRST_STAGE, our_ae, vae, sfu.convert_ldm_vae_checkpoint, dict(vae.config)),
    ):
        shapes = {prefix + k: tuple(v.shape) for k, v in ours.state_dict().items()}
        names = _inverse(convert, shapes, cfg)
        for name, value in theirs.state_dict().items():
            if name not in names:
                raise UserError(
                    f"{folder}: {type(theirs).__name__} weight {name} has no original counterpart."
                )
            state[names[name]] = value.reshape(shapes[names[name]])
    if text.config.hidden_act == "gelu":
        state.update(openclip_state(text.state_dict(), OPENCLIP))
    else:
        holder = type("Encoder", (), {"transformer": text, "is_clip": True})()
        state.update(clip_export(holder, None) or {})
    made = diffusers.DDIMScheduler.from_config(scheduler_cfg)
    state.update(schedule_buffers(made.alphas_cumprod))
    state["scale_factor"] = torch.tensor(float(vae.config.scaling_factor))
    tokenizer = text_encoder or str(folder / "tokenizer")
    with tempfile.TemporaryDirectory(prefix="ldm_diffusers_") as tmp:
        yaml = Path(tmp) / "inference.yaml"
        OmegaConf.save(OmegaConf.create(config), yaml)
        model, summary = compvis.load_compvis(state, yaml, use_ema=False, text_encoder=tokenizer)
    summary = {**summary, "diffusers_folder": str(folder), "original_config": config}
    return model, summary


__all__ = [
    "export_diffusers",
    "load_diffusers_folder",
    "original_config_of_run",
    "scheduler_config",
    "sd_text_encoder",
]
