"""Load a stage-2 model for sampling from any supported file.

- a Lightning `.ckpt` written by train.py (`state_dict` with unet.*, ema.*, first_stage.*, conditioner.*;
  the run config under `ldm_config`),
- an exported `model.safetensors` (CompVis names, EMA weights in place, the run config in its metadata),
- an original CompVis / Stable Diffusion v1 checkpoint (`.ckpt` or `.safetensors`) with its yaml
  (`config=v1-inference.yaml`), see `ldm.interop.compvis`.

Stage-1 (autoencoder) files are recognised and refused with what they are and what they can be used for.
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from torch import Tensor

from ldm.conditioning import FrozenTextEncoder
from ldm.errors import UserError
from ldm.interop import compvis, recognise
from ldm.interop.checkpoint import load_state_dict
from ldm.models.first_stage import codec_from_config
from ldm.models.latent_diffusion import LatentDiffusion

log = logging.getLogger(__name__)
STAGE2_TARGET = "LatentDiffusionModule"
SAMPLING_TASKS = "txt2img, img2img, inpaint, outpaint, superres, semantic, class, uncond"


@dataclass
class LoadedModel:
    """A stage-2 model ready to sample from, and where it came from (recorded with every run)."""

    model: LatentDiffusion  # eval mode, frozen: first stage, conditioner, UNet, schedule
    path: Path
    format: str  # lightning | export | compvis | diffusers
    used_ema: bool  # whether the UNet holds EMA weights
    image_size: int | tuple[int, int] | None = None  # (H, W) or side in pixels the model was trained at
    config: dict | None = field(default=None, repr=False)

    @property
    def input_keys(self) -> tuple[str, ...]:
        """Conditioning inputs the model reads (caption, masked_image + mask, lowres, segmap, label)."""
        return self.model.input_keys

    @property
    def tasks(self) -> tuple[str, ...]:
        """The sample.py tasks this model supports."""
        from ldm.sampling.job import supported_tasks  # ldm.sampling imports this module

        return supported_tasks(self.input_keys)

    def describe(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "format": self.format,
            "used_ema": self.used_ema,
            "input_keys": list(self.input_keys),
            "tasks": list(self.tasks),
            "image_size": self.image_size,
        }


def load_model(
    path: str | os.PathLike,
    *,
    config: str | os.PathLike | None = None,  # original yaml (CompVis/SD), or a train.py run's config.yaml
    use_ema: bool = True,  # EMA weights when the file has them (exports only hold EMA weights)
    text_encoder: str | None = None,  # local text-encoder/tokenizer folder (required for CLIP checkpoints)
) -> LoadedModel:
    """Build the model a checkpoint file describes and load its weights (never unpickles code)."""
    path = Path(path)
    if path.is_dir() and (path / "model.safetensors").is_file():  # a train.py run folder: its export
        path = path / "model.safetensors"
    if path.is_dir() and (path / "model_index.json").is_file():  # a diffusers StableDiffusionPipeline folder
        from ldm.interop.diffusers_io import load_diffusers_folder

        model, summary = load_diffusers_folder(path, text_encoder=text_encoder)
        return _ready(LoadedModel(model, path, "diffusers", False, summary["image_size"], summary))
    state, run_config = load_state_dict(path, what="checkpoint (ckpt)")
    _refuse_adapter(path, state)
    sibling = path.with_suffix(".yaml")  # AUTOMATIC1111's convention: <name>.yaml beside <name>.safetensors
    if (
        config is None
        and recognise.is_original(state)
        and sibling.is_file()
        and compvis.is_compvis_yaml(sibling)
    ):
        config = sibling  # e.g. our export's model.original.yaml, before a run's config.yaml in the folder
    if config is not None:
        if compvis.is_compvis_yaml(config):
            model, summary = compvis.load_compvis(state, config, use_ema=use_ema, text_encoder=text_encoder)
            return _ready(
                LoadedModel(model, path, "compvis", summary["used_ema"], summary["image_size"], summary)
            )
        run_config = _read_run_config(config)
    model_cfg = (run_config or {}).get("model") if isinstance(run_config, dict) else None
    if not isinstance(model_cfg, dict) and recognise.is_original(state):
        # an original CompVis/Stability file without config=: its family's built-in yaml, from keys and shapes
        family = recognise.recognised_family(state, path)  # UserError when ambiguous or unknown
        model, summary = compvis.load_compvis(state, family.yaml, use_ema=use_ema, text_encoder=text_encoder)
        summary = {**summary, "family": family.name, "config": str(family.yaml)}
        return _ready(
            LoadedModel(model, path, "compvis", summary["used_ema"], summary["image_size"], summary)
        )
    if not isinstance(model_cfg, dict):
        raise _no_config(path, state)
    if str(model_cfg.get("_target_", "")).endswith("finetune.module_from_base"):
        return _load_finetune(path, state, run_config, model_cfg, use_ema, text_encoder)
    if STAGE2_TARGET not in str(model_cfg.get("_target_", "")) and "unet" not in model_cfg:
        raise _not_stage2(path, model_cfg)
    fmt = "export" if compvis.is_compvis_state(state) else "lightning"
    model = _build_ours(path, run_config, model_cfg, text_encoder)
    used_ema = _load_ours(model, state, path, fmt, use_ema)
    return _ready(LoadedModel(model, path, fmt, used_ema, _native_size(run_config), run_config))


def _load_finetune(
    path: Path, state: dict, run_config: dict, model_cfg: dict, use_ema: bool, text_encoder: str | None
) -> LoadedModel:
    """A fine-tune run (experiment=finetune): the model its base file describes, with the run's weights."""
    base = Path(str(model_cfg.get("base_model") or ""))
    if not base.exists():
        original = path.parent / "model.original.safetensors"
        hint = f" or load {original}, which is self-contained" if original.is_file() else ""
        raise UserError(
            f"{path} was fine-tuned from {base}, which the model is rebuilt from, but that file is not there "
            f"any more: put it back{hint} (`python -m ldm.interop.export {path.parent} OUT.safetensors` "
            "writes such a file)."
        )
    loaded = load_model(
        base,
        config=model_cfg.get("base_config"),
        text_encoder=text_encoder or model_cfg.get("text_encoder"),
        use_ema=False,  # the run's own weights replace them
    )
    fmt = "export" if compvis.is_compvis_state(state) else "lightning"
    used = _load_ours(loaded.model, state, path, fmt, use_ema)
    size = _native_size(run_config) or loaded.image_size
    return _ready(LoadedModel(loaded.model, path, fmt, used, size, run_config))


def _native_size(run_config: dict) -> int | tuple[int, int] | None:
    """The pixel size training saw (recorded by the trainer; older runs: data.resolution)."""
    seen = run_config.get("sample_size")
    if seen:
        return (int(seen[0]), int(seen[1]))
    size = (run_config.get("data") or {}).get("resolution")
    return int(size) if size else None


def _read_run_config(config: str | os.PathLike) -> dict:
    from omegaconf import OmegaConf

    try:
        raw = OmegaConf.to_container(OmegaConf.load(Path(config)), resolve=True)
    except Exception as e:  # noqa: BLE001 - any YAML failure is the user's file
        raise UserError(f"config={config} is not readable YAML ({type(e).__name__}: {e}).") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("model"), dict):
        raise UserError(
            f"config={config} is neither an original CompVis/Stability inference yaml (model.params with "
            "unet_config) nor a train.py run config (config.yaml of a run folder)."
        )
    return raw


def _refuse_adapter(path: Path, state: dict[str, Tensor]) -> None:
    """A LoRA or textual-inversion file given as the model: say how to use it with its base model."""
    keys = list(state)
    if any(k.startswith(("lora_unet_", "lora_te")) or ".lora_A." in k or ".lora_down." in k for k in keys):
        raise UserError(
            f"{path} is a LoRA adapter, not a whole model: load its base model and add the adapter, e.g. "
            f"sample.py ckpt=<base model> 'lora=[{path}:1.0]' (or merge it: python -m ldm.interop.merge_lora "
            f"<base> {path} OUT.safetensors)."
        )
    if keys and set(keys) <= {"emb_params", "string_to_param", "string_to_token", "name", "step"}:
        raise UserError(
            f"{path} is a textual-inversion embedding, not a model: sample.py ckpt=<base model> "
            f"'embeddings=[{path}]' adds its token."
        )


def _no_config(path: Path, state: dict[str, Tensor]) -> UserError:
    ours = any(k.startswith(("conditioner.", "loss.")) for k in state)
    if compvis.is_compvis_state(state) and (ours or "alphas_cumprod" not in state):
        # original LatentDiffusion files carry their schedule buffers (alphas_cumprod, betas); exports do not
        return UserError(
            f"{path} looks like a train.py export whose config metadata was removed ("
            + ("it has our conditioner.*/loss.* keys" if ours else "no original schedule buffers")
            + "): put the run's config.yaml beside it or pass config=<that run's config.yaml>; if it is an "
            "original checkpoint, pass config=<its inference yaml>."
        )
    if compvis.is_compvis_state(state):
        return UserError(compvis.describe_unknown(state, path))
    if any(k.startswith(("encoder.", "decoder.", "first_stage_model.")) for k in state) and not any(
        "diffusion_model" in k or k.startswith(("unet.", "model.unet.")) for k in state
    ):
        return UserError(
            f"{path} holds only autoencoder weights (encoder.*/decoder.*), not a diffusion model: every "
            f"sampling task ({SAMPLING_TASKS}) needs a stage-2 model."
        )
    return UserError(
        f"{path} carries no run config (metadata 'config', config.yaml beside it, or 'ldm_config' in a "
        "Lightning .ckpt) and is no original CompVis/Stability checkpoint, so the model cannot be rebuilt. "
        "Pass a model.safetensors or .ckpt written by train.py, or an original checkpoint (+ config=<yaml>)."
    )


def _not_stage2(path: Path, model_cfg: dict) -> UserError:
    ae = model_cfg.get("autoencoder") or {}
    kind = str(ae.get("_target_", model_cfg.get("_target_", "autoencoder"))).rsplit(".", 1)[-1]
    return UserError(
        f"{path} is a stage-1 autoencoder ({kind}): it encodes and decodes images but cannot generate them. "
        f"Every sampling task ({SAMPLING_TASKS}) needs a stage-2 model: train one on top of it with "
        f"`python train.py experiment=txt2img first_stage_ckpt={path}` and sample from that run's "
        "model.safetensors."
    )


def _build_ours(path: Path, run_config: dict, model_cfg: dict, text_encoder: str | None) -> LatentDiffusion:
    """The plain model from a run config's pieces; the first stage from the stored autoencoder config."""
    ae_config = run_config.get("first_stage_autoencoder")
    if not isinstance(ae_config, dict):
        raise UserError(
            f"{path}: its config has no first_stage_autoencoder (the autoencoder's own config), so the first "
            "stage cannot be rebuilt without the stage-1 file; re-export it with the current train.py."
        )
    cfg = copy.deepcopy(model_cfg)
    if text_encoder is not None:
        for entry in ((cfg.get("conditioner") or {}).get("conditioners") or {}).values():
            if isinstance(entry, dict) and str(entry.get("_target_", "")).endswith("FrozenTextEncoder"):
                entry["model"] = text_encoder
    return LatentDiffusion(
        unet=instantiate_or_user_error(cfg["unet"]),
        conditioner=instantiate_or_user_error(cfg["conditioner"]),
        first_stage=codec_from_config(ae_config),
        loss=instantiate_or_user_error(cfg["loss"]),
        sample_posterior=bool(cfg.get("sample_posterior", True)),
        residual_over=cfg.get("residual_over"),
    )


def instantiate_or_user_error(config: Any, **kwargs: Any) -> Any:
    """Hydra instantiate; a UserError raised inside a constructor comes out as itself (not wrapped)."""
    try:
        return instantiate(config, **kwargs)
    except InstantiationException as e:
        err: BaseException | None = e
        while err is not None and not isinstance(err, UserError):
            err = err.__cause__ or err.__context__
        raise (err or e) from None


def _load_ours(model: LatentDiffusion, state: dict[str, Tensor], path: Path, fmt: str, use_ema: bool) -> bool:
    """Load train.py weights (Lightning names or export names); returns whether EMA weights are in use."""
    where = f"the run config stored in {path}"
    if fmt == "export":
        weights = {name: v for k, v in state.items() if (name := compvis.to_our_names(k))}
        compvis.load_into(model, weights, where)
        if not use_ema:
            log.warning(
                "%s is an export, which stores only the EMA weights: use_ema=false has no effect", path
            )
        return True
    # Lightning: model.<name> (earlier versions: <name>), EMA shadows as ema.<name without dots>
    weights = {(k[len("model.") :] if k.startswith("model.") else k): v for k, v in state.items()}
    ema = {k[len("ema.") :]: v for k, v in weights.items() if k.startswith("ema.")}
    weights = {k: v for k, v in weights.items() if not k.startswith("ema.")}
    used = False
    if use_ema and ema:
        for name, _ in model.named_parameters():
            if name.replace(".", "") in ema:
                weights[name] = ema[name.replace(".", "")]
                used = True
    elif use_ema:
        log.warning("%s has no EMA weights (trained with ema_decay=0): using the raw weights", path)
    compvis.load_into(model, weights, where)
    return used


def _ready(loaded: LoadedModel) -> LoadedModel:
    """Eval mode, frozen, text encoders' cached null context matching the loaded weights."""
    model = loaded.model
    model.eval().requires_grad_(False)
    for c in model.conditioner.conditioners.values():
        if isinstance(c, FrozenTextEncoder):
            compvis.refresh_null_context(c)
    if not model.first_stage.scale_known:
        raise UserError(
            f"{loaded.path} has no latent scale_factor; was training stopped before the first step?"
        )
    log.info(
        "loaded %s (%s, %s weights); tasks it supports: %s",
        loaded.path,
        loaded.format,
        "EMA" if loaded.used_ema else "raw",
        ", ".join(loaded.tasks),
    )
    return loaded
