"""Fine-tune released (or our own) weights: the whole training module from one file (`experiment=finetune`).

    python train.py experiment=finetune base_model=<file> [base_config=<yaml>] \
        [text_encoder=<tokenizer folder>] data=custom 'data.train_shards=...'

`load_model` builds the plain `LatentDiffusion` the file describes (every original SD 1.x/2.x and LDM family,
or a train.py export): UNet (trainable, from the file's EMA weights when it has them), first stage (frozen,
with the file's `scale_factor`, never re-fitted), conditioner (text encoders frozen unless
`train_text_encoder`; other conditioners with weights, e.g. cin256's class embedding, train with the UNet),
noise schedule and parameterization (eps: SD 1.x / 2-base; v: SD 2-768). EMA starts from these weights.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from ldm.conditioning.text import FrozenTextEncoder
from ldm.errors import UserError
from ldm.models.latent_diffusion import LatentDiffusion
from ldm.training.diffusion_module import LatentDiffusionModule

log = logging.getLogger(__name__)
TEXT_KEY = "caption"

# Batch keys a base conditioner may read -> what makes the data deliver them (conf/data, conf/data/task).
DATA_FOR_KEY = {
    "caption": "add caption to data.keys ('data.keys=[image,caption]'; shards with a txt member)",
    "label": "add label to data.keys ('data.keys=[image,label]'; shards with a cls member, data.label_key)",
    "segmap": "add segmap to data.keys and pick data/task=semantic ('data.keys=[image,segmap]')",
    "lowres": "pick the super-resolution task: data/task=superres (data.task.scale = the base's factor)",
    "masked_image": "pick a masking task: data/task=inpaint (or outpaint)",
    "mask": "pick a masking task: data/task=inpaint (or outpaint)",
}
# Keys task transforms add to every sample (by the transform's class name).
TASK_KEYS = {
    "SuperResolution": ("lowres",),
    "InpaintingMask": ("mask", "masked_image"),
    "OutpaintingMask": ("mask", "masked_image"),
}


class TunedTextEncoder(FrozenTextEncoder):
    """A FrozenTextEncoder whose transformer trains (`model.train_text_encoder=true`).

    Prompts are encoded with gradients, and the null context ("" for classifier-free guidance) is encoded
    with the current weights each time instead of the value cached at load time."""

    def encode_prompts(self, prompts: list[str]) -> Tensor:
        """Prompts -> (B, max_length, D), differentiable w.r.t. the transformer's weights."""
        return FrozenTextEncoder.encode_prompts.__wrapped__(self, prompts)

    def null(self, batch: Mapping[str, Any], **kw: Any) -> Tensor:
        n = int(FrozenTextEncoder.null(self, batch, **kw).shape[0])
        return self.encode_prompts([""]).expand(n, -1, -1)


class FineTuneModule(LatentDiffusionModule):
    """LatentDiffusionModule around a base file's model: checks that the data feeds the base conditioner."""

    base: dict[str, Any]

    def setup(self, stage: str) -> None:
        """Before any work: the data module must deliver every batch key the base conditioner reads."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer else None
        if datamodule is not None and hasattr(datamodule, "options"):
            check_data_keys(self.model.input_keys, datamodule.options, datamodule.task, self.base["path"])
            tuned = any(isinstance(c, TunedTextEncoder) for c in self.conditioner.conditioners.values())
            if tuned and "caption_emb" in (datamodule.options.keys or ()):
                raise UserError(
                    "the text encoder trains (model.train_text_encoder / model.lora.text_encoder), but "
                    "data.keys holds cached caption_emb (states of the frozen encoder): drop caption_emb "
                    "from data.keys so captions are encoded as it trains."
                )

    def export_config(self, config: dict) -> dict:
        """The run config + the base file this fine-tune started from."""
        return {**super().export_config(config), "finetuned_from": dict(self.base)}


def provided_keys(options: Any, task: Any) -> set[str]:
    """Batch keys a ShardDataModule with these options (data.keys, data.latents) and task delivers."""
    keys = set(getattr(options, "keys", None) or ())
    if "caption_emb" in keys:
        keys.add("caption")
    tasks = getattr(task, "transforms", None) or ([task] if task is not None else [])
    for t in tasks:
        keys.update(TASK_KEYS.get(type(t).__name__, ()))
    return keys


def check_data_keys(needed: tuple[str, ...], options: Any, task: Any, base: str) -> None:
    """UserError naming the first key the base model reads that the data does not deliver, and the fix."""
    have = provided_keys(options, task)
    for key in needed:
        if key in have:
            continue
        fix = DATA_FOR_KEY.get(key)
        if fix is None:
            raise UserError(
                f"base_model={base} reads batch key '{key}', which no data option delivers (data.keys, "
                "conf/data/task); this base model cannot be fine-tuned on shard data."
            )
        raise UserError(
            f"base_model={base} reads batch key '{key}', but the data delivers only {sorted(have)}: {fix}."
        )


def prepare_base(
    model: LatentDiffusion,
    *,
    train_text_encoder: bool = False,
    gradient_checkpointing: bool = False,
    cond_dropout: float | None = None,
) -> list[str]:
    """Make a loaded (frozen, eval) model trainable in place; returns the names of its text conditioners.

    UNet: trainable; first stage: frozen; conditioners reading `caption`: frozen unless `train_text_encoder`;
    other conditioners with weights: trainable (the base trained them with its UNet). `cond_dropout` sets
    the classifier-free-guidance dropout of caption/label conditioners that have a null value."""
    model.train()
    model.unet.requires_grad_(True)
    model.first_stage.requires_grad_(False)
    text = []
    for name, c in model.conditioner.conditioners.items():
        if TEXT_KEY in c.input_keys:
            text.append(name)
            if train_text_encoder and isinstance(c, FrozenTextEncoder):
                c.__class__ = TunedTextEncoder  # same weights and buffers; encodes with gradients
                c.transformer.requires_grad_(True)
            else:
                c.requires_grad_(bool(train_text_encoder))
        else:
            c.requires_grad_(True)
        has_null = getattr(c, "null_id", 0) is not None
        if cond_dropout is not None and has_null and c.output in ("crossattn", "class") and c.input_keys:
            if set(c.input_keys) & {TEXT_KEY, "label"}:
                c.dropout = float(cond_dropout)
    for module in model.unet.modules():  # ResBlocks, SpatialTransformers, AttentionBlocks
        if hasattr(module, "use_checkpoint"):
            module.use_checkpoint = bool(gradient_checkpointing)
    return text


def load_base(
    base_model: str | None,
    base_config: str | None = None,
    text_encoder: str | None = None,
    use_ema: bool = True,
    train_text_encoder: bool = False,
    text_encoder_lr: float | None = None,
    gradient_checkpointing: bool = False,
    cond_dropout: float | None = 0.1,
    resolution: int | None = None,
) -> tuple[Any, LatentDiffusion, list[str]]:
    """(LoadedModel, its model made trainable by `prepare_base`, names of its text conditioners).

    Raises UserError for a missing base_model, an unloadable file (messages name base_config=), a text
    encoder lr without a trainable text encoder, or train_text_encoder on a base without one."""
    from ldm.interop.load import load_model

    if not base_model:
        raise UserError(
            "base_model is not set: pass the file to fine-tune, e.g. base_model=v1-5-pruned-emaonly."
            "safetensors (+ text_encoder=<CLIP tokenizer folder> for SD 1.x)."
        )
    if text_encoder_lr is not None and not train_text_encoder:
        raise UserError(
            f"model.text_encoder_lr={text_encoder_lr} but the text encoder is frozen: add "
            "model.train_text_encoder=true, or drop model.text_encoder_lr."
        )
    try:
        loaded = load_model(base_model, config=base_config, text_encoder=text_encoder, use_ema=use_ema)
    except UserError as e:  # the loader's messages name sample.py's `config=`; here the key is base_config=
        raise UserError(re.sub(r"(?<![\w.])config=", "base_config=", str(e))) from None
    model = loaded.model
    _warn_resolution(loaded.image_size, resolution, base_model)
    text = prepare_base(
        model,
        train_text_encoder=train_text_encoder,
        gradient_checkpointing=gradient_checkpointing,
        cond_dropout=cond_dropout,
    )
    if train_text_encoder and not text:
        raise UserError(
            f"model.train_text_encoder=true, but base_model={base_model} has no text encoder "
            f"(it reads {list(model.input_keys)}); drop the option."
        )
    return loaded, model, text


def base_record(loaded: Any, base_model: str, base_config: str | None, text_encoder: str | None) -> dict:
    """What a fine-tune records of its base file (run config `finetuned_from`, adapter metadata)."""
    model = loaded.model
    return {
        "path": str(base_model),
        "config": None if base_config is None else str(base_config),
        "text_encoder": None if text_encoder is None else str(text_encoder),
        "format": loaded.format,
        "family": (loaded.config or {}).get("family") if loaded.format == "compvis" else None,
        "image_size": loaded.image_size,
        "scale_factor": float(model.first_stage.scale_factor),
        "parameterization": model.parameterization,
    }


def module_from_base(
    base_model: str | None,
    optim: Mapping[str, Any],
    base_config: str | None = None,  # the original inference yaml (default: recognised from the keys)
    text_encoder: str | None = None,  # CLIP tokenizer folder (SD 1.x); text weights come from the file
    use_ema: bool = True,  # start from the file's EMA UNet when it has one
    train_text_encoder: bool = False,
    text_encoder_lr: float | None = None,  # its own param group; null: optim.lr
    gradient_checkpointing: bool = False,  # recompute UNet blocks in backward: less memory, ~30% slower
    cond_dropout: float | None = 0.1,  # caption/label dropout for classifier-free guidance; null: the base's
    resolution: int | None = None,  # data.resolution, compared with the base's native size
    sampler: Callable[..., Tensor] | None = None,
    **options: Any,  # LatentDiffusionModule: ema_decay, ema_warmup, preview_steps, preview_cfg_scale
) -> FineTuneModule:
    """The training module for fine-tuning `base_model` (see the module docstring); UserError on bad input."""
    loaded, model, text = load_base(
        base_model,
        base_config,
        text_encoder,
        use_ema,
        train_text_encoder,
        text_encoder_lr,
        gradient_checkpointing,
        cond_dropout,
        resolution,
    )
    lr = float(text_encoder_lr if text_encoder_lr is not None else optim["lr"])
    module = FineTuneModule.from_model(
        model,
        optim=optim,
        sampler=sampler,
        conditioner_lr={name: lr for name in text} if train_text_encoder else None,
        **options,
    )
    module.base = base_record(loaded, base_model, base_config, text_encoder)
    log.info(
        "fine-tuning %s (%s): scale_factor %.5f, %s-prediction, text encoder %s",
        base_model,
        module.base["family"] or loaded.format,
        module.base["scale_factor"],
        model.parameterization,
        "trained" if train_text_encoder else ("frozen" if text else "none"),
    )
    return module


def _warn_resolution(native: Any, resolution: int | None, base: str) -> None:
    if native is None or resolution is None:
        return
    sides = {int(native)} if isinstance(native, int) else {int(s) for s in native}
    if int(resolution) not in sides:
        shown = next(iter(sides)) if len(sides) == 1 else "x".join(str(int(s)) for s in native)
        log.warning(
            "data.resolution=%s but %s was trained at %s px: expect worse images until it adapts; "
            "data.resolution=%s keeps its native size",
            resolution,
            Path(base).name,
            shown,
            shown,
        )
