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
from ldm.interop import compvis
from ldm.interop.checkpoint import load_state_dict

log = logging.getLogger(__name__)
STAGE2_TARGET = "LatentDiffusionModule"
SAMPLING_TASKS = "txt2img, img2img, inpaint, outpaint, superres, semantic, class, uncond"


@dataclass
class LoadedModel:
    """A stage-2 model ready to sample from, and where it came from (recorded with every run)."""

    module: Any  # LatentDiffusionModule in eval mode (unet, conditioner, first_stage, loss, net)
    path: Path
    format: str  # lightning | export | compvis
    used_ema: bool  # whether the UNet holds EMA weights
    image_size: int | None = None  # side in pixels the model was trained at (default sample size)
    config: dict | None = field(default=None, repr=False)

    @property
    def input_keys(self) -> tuple[str, ...]:
        """Conditioning inputs the model reads (caption, masked_image + mask, lowres, segmap, label)."""
        return tuple(self.module.conditioner.input_keys)

    def describe(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "format": self.format,
            "used_ema": self.used_ema,
            "input_keys": list(self.input_keys),
            "image_size": self.image_size,
        }


def load_model(
    path: str | os.PathLike,
    *,
    config: str | os.PathLike | None = None,  # CompVis yaml for original Stable Diffusion checkpoints
    use_ema: bool = True,  # EMA weights when the file has them (exports only hold EMA weights)
    text_encoder: str | None = None,  # local text-encoder/tokenizer folder (required for CompVis CLIP)
) -> LoadedModel:
    """Build the model a checkpoint file describes and load its weights (never unpickles code)."""
    path = Path(path)
    state, run_config = load_state_dict(path, what="checkpoint (ckpt)")
    if config is not None:
        module, summary = compvis.load_compvis(state, config, use_ema=use_ema, text_encoder=text_encoder)
        return _ready(
            LoadedModel(module, path, "compvis", summary["used_ema"], summary["image_size"], summary)
        )
    model_cfg = (run_config or {}).get("model") if isinstance(run_config, dict) else None
    if not isinstance(model_cfg, dict):
        if compvis.is_compvis_state(state):
            raise UserError(
                f"{path} looks like an original CompVis / Stable Diffusion checkpoint "
                "(model.diffusion_model.* without a run config): pass its yaml too, "
                "e.g. config=v1-inference.yaml."
            )
        raise UserError(
            f"{path} carries no run config (metadata 'config', config.yaml beside it, or 'ldm_config' in a "
            "Lightning .ckpt), so the model cannot be rebuilt. Pass a model.safetensors or .ckpt written by "
            "train.py, or a CompVis checkpoint with config=<its yaml>."
        )
    if STAGE2_TARGET not in str(model_cfg.get("_target_", "")) and "unet" not in model_cfg:
        raise _not_stage2(path, model_cfg)
    fmt = "lightning" if any(k.startswith("unet.") for k in state) else "export"
    module = _instantiate(path, run_config, model_cfg, text_encoder, keep_ema=fmt == "lightning")
    used_ema = _load_ours(module, state, path, fmt, use_ema)
    size = (run_config.get("data") or {}).get("resolution")
    return _ready(LoadedModel(module, path, fmt, used_ema, int(size) if size else None, run_config))


def _not_stage2(path: Path, model_cfg: dict) -> UserError:
    ae = model_cfg.get("autoencoder") or {}
    kind = str(ae.get("_target_", model_cfg.get("_target_", "autoencoder"))).rsplit(".", 1)[-1]
    return UserError(
        f"{path} is a stage-1 autoencoder ({kind}): it encodes and decodes images but cannot generate them. "
        f"Every sampling task ({SAMPLING_TASKS}) needs a stage-2 model: train one on top of it with "
        f"`python train.py experiment=txt2img first_stage_ckpt={path}` and sample from that run's "
        "model.safetensors."
    )


def _instantiate(
    path: Path, run_config: dict, model_cfg: dict, text_encoder: str | None, keep_ema: bool
) -> Any:
    """The run config's LatentDiffusionModule, its first stage rebuilt from the stored autoencoder config."""
    ae_config = run_config.get("first_stage_autoencoder")
    if not isinstance(ae_config, dict):
        raise UserError(
            f"{path}: its config has no first_stage_autoencoder (the autoencoder's own config), so the first "
            "stage cannot be rebuilt without the stage-1 file; re-export it with the current train.py."
        )
    cfg = copy.deepcopy(model_cfg)
    # _recursive_ false: codec_from_config builds the autoencoder from its config itself.
    cfg["first_stage"] = {
        "_target_": "ldm.models.first_stage.codec_from_config",
        "_recursive_": False,
        "autoencoder": ae_config,
    }
    cfg["sampler"] = None  # sample.py picks the sampler
    if not keep_ema:
        cfg["ema_decay"] = 0.0  # an export already holds the EMA weights: no second copy
    if text_encoder is not None:
        for entry in ((cfg.get("conditioner") or {}).get("conditioners") or {}).values():
            if isinstance(entry, dict) and str(entry.get("_target_", "")).endswith("FrozenTextEncoder"):
                entry["model"] = text_encoder
    return instantiate_or_user_error(cfg)


def instantiate_or_user_error(config: Any, **kwargs: Any) -> Any:
    """Hydra instantiate; a UserError raised inside a constructor comes out as itself (not wrapped)."""
    try:
        return instantiate(config, **kwargs)
    except InstantiationException as e:
        err: BaseException | None = e
        while err is not None and not isinstance(err, UserError):
            err = err.__cause__ or err.__context__
        raise (err or e) from None


def _load_ours(module: Any, state: dict[str, Tensor], path: Path, fmt: str, use_ema: bool) -> bool:
    """Load train.py weights (Lightning names or export names); returns whether EMA weights are in use."""
    if fmt == "export":
        weights = {name: v for k, v in state.items() if (name := compvis.to_our_names(k))}
        compvis.load_into(module, weights, f"the run config stored in {path}")
        if not use_ema:
            log.warning(
                "%s is an export, which stores only the EMA weights: use_ema=false has no effect", path
            )
        return True
    ema = getattr(module, "ema", None)
    compvis.load_into(module, state, f"the run config stored in {path}")
    used = False
    if use_ema and ema is not None:
        ema.copy_to(module)
        used = True
    elif use_ema:
        log.warning("%s has no EMA weights (trained with ema_decay=0): using the raw weights", path)
    module.ema = None  # sampling never updates it; frees a copy of the UNet
    return used


def _ready(loaded: LoadedModel) -> LoadedModel:
    """Eval mode, frozen, text encoders' cached null context matching the loaded weights."""
    module = loaded.module
    module.eval().requires_grad_(False)
    for c in module.conditioner.conditioners.values():
        if isinstance(c, FrozenTextEncoder):
            compvis.refresh_null_context(c)
    if not module.first_stage.scale_known:
        raise UserError(
            f"{loaded.path} has no latent scale_factor; was training stopped before the first step?"
        )
    log.info("loaded %s (%s, %s weights)", loaded.path, loaded.format, "EMA" if loaded.used_ema else "raw")
    return loaded
