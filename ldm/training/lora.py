"""LoRA fine-tuning (`experiment=lora`): low-rank adapters (peft) on a frozen base model.

    python train.py experiment=lora base_model=<file or run> [base_config=<yaml>] [text_encoder=<tokenizer>] \
        data=custom 'data.train_shards=...' [lora.rank=16 lora.alpha=16 'lora.targets=[attn,ff]']

The base model loads exactly as for `experiment=finetune` (every original SD 1.x/2.x / LDM file, a diffusers
folder, or a train.py run); then every weight is frozen and peft LoRA layers wrap the chosen UNet layers
(`lora.targets`: attn, proj, ff, conv = LoCon) and, with `lora.text_encoder=true`, the text encoder's
attention and MLP projections (own learning rate: `lora.text_encoder_lr`). Only the adapters train, are
EMA'd (`model.ema_decay`, off by default), checkpointed, and exported: `lora.safetensors` in the
AUTOMATIC1111 / ComfyUI / kohya convention and `pytorch_lora_weights.safetensors` in diffusers' (so
`pipe.load_lora_weights(run_folder)` finds it).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ldm.adapters import lora as L
from ldm.errors import UserError
from ldm.models.first_stage import state_identity
from ldm.training.adapter_module import AdapterModule
from ldm.training.finetune import base_record, load_base

log = logging.getLogger(__name__)
KOHYA_FILE = "lora.safetensors"
DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"  # the name diffusers' load_lora_weights(folder) reads


class LoraModule(AdapterModule):
    """Adapter-only training of peft LoRA layers; exports the adapter in both conventions."""

    lora: dict[str, Any]

    def adapter_summary(self) -> dict[str, Any]:
        return dict(self.lora)

    def adapters(self) -> dict[str, L.LoraWeights]:
        """The trained adapters ({layer path: LoraWeights}, copies), EMA weights when EMA is on."""
        if self.ema is not None:
            with self.ema.swapped_in(self.model):
                state = L.lora_state(self.model)
        else:
            state = L.lora_state(self.model)
        return {
            k: L.LoraWeights(v.down.detach().cpu().clone(), v.up.detach().cpu().clone(), v.alpha)
            for k, v in state.items()
        }

    def export_adapter(self, folder: Path, run_config: dict | None) -> list[Path]:
        from ldm.adapters.lora_files import save_lora

        adapters = self.adapters()
        if self._trainer is not None and not self.trainer.is_global_zero:
            return []
        metadata = {**self.lora, "base_model": Path(self.base["path"]).name, "base": self.base}
        folder = Path(folder)
        return [
            save_lora(folder / KOHYA_FILE, adapters, convention="kohya", metadata=metadata, model=self.model),
            save_lora(
                folder / DIFFUSERS_FILE, adapters, convention="diffusers", metadata=metadata, model=self.model
            ),
        ]


def add_lora_to_model(
    model: Any,
    text: Sequence[str],
    rank: int = 4,
    alpha: float | None = None,
    dropout: float = 0.0,
    targets: Sequence[str] = ("attn",),
    conv_rank: int | None = None,
    conv_alpha: float | None = None,
    text_encoder: bool = False,
) -> dict[str, Any]:
    """Freeze `model` (a LatentDiffusion) and wrap its UNet (+ text encoders `text`) with LoRA layers.

    Returns the summary recorded with the run: rank, alpha, dropout, targets, layer counts, parameters."""
    model.requires_grad_(False)
    unet_names = L.unet_targets(model.unet, targets)
    L.add_lora(model.unet, unet_names, rank, alpha, dropout, conv_rank, conv_alpha)
    text_layers = 0
    if text_encoder:
        for name in text:
            transformer = model.conditioner.conditioners[name].transformer
            names = L.text_targets(transformer, targets)
            text_layers += L.add_lora(transformer, names, rank, alpha, dropout)
    model.first_stage.requires_grad_(False)
    unet_params = sum(p.numel() for n, p in model.unet.named_parameters() if "lora_" not in n)
    trainable = L.trainable_count(model)
    return {
        "kind": "lora",
        "rank": int(rank),
        "alpha": float(rank if alpha is None else alpha),
        "dropout": float(dropout),
        "targets": list(targets),
        "conv_rank": None if conv_rank is None else int(conv_rank),
        "conv_alpha": None if conv_alpha is None else float(conv_alpha),
        "text_encoder": bool(text_encoder),
        "unet_layers": len(unet_names),
        "text_layers": text_layers,
        "trainable_parameters": int(trainable),
        "unet_parameters": int(unet_params),
    }


def lora_module_from_base(
    base_model: str | None,
    optim: Mapping[str, Any],
    lora: Mapping[str, Any],  # rank alpha dropout targets conv_rank conv_alpha text_encoder text_encoder_lr
    base_config: str | None = None,
    text_encoder: str | None = None,
    use_ema: bool = True,
    gradient_checkpointing: bool = False,
    cond_dropout: float | None = 0.1,
    resolution: int | None = None,
    sampler: Callable[..., Tensor] | None = None,
    **options: Any,  # LatentDiffusionModule: ema_decay, ema_warmup, preview_steps, preview_cfg_scale
) -> LoraModule:
    """The LoRA training module for `base_model` (see the module docstring); UserError on bad input."""
    lora = dict(lora)
    te_lr = lora.pop("text_encoder_lr", None)
    on_text = bool(lora.get("text_encoder", False))
    if te_lr is not None and not on_text:
        raise UserError(
            f"lora.text_encoder_lr={te_lr} but the text encoder gets no LoRA: add lora.text_encoder=true, "
            "or drop lora.text_encoder_lr."
        )
    loaded, model, text = load_base(
        base_model,
        base_config,
        text_encoder,
        use_ema,
        train_text_encoder=on_text,
        gradient_checkpointing=gradient_checkpointing,
        cond_dropout=cond_dropout,
        resolution=resolution,
    )
    check_trained(model, base_model)
    summary = add_lora_to_model(model, text, **lora)
    lr = float(te_lr if te_lr is not None else optim["lr"])
    module = LoraModule.from_model(
        model,
        optim=optim,
        sampler=sampler,
        conditioner_lr={name: lr for name in text} if on_text else None,
        **options,
    )
    module.base = base_record(loaded, base_model, base_config, text_encoder)
    module.base["unet_identity"] = base_unet_identity(model)
    module.lora = summary
    log.info(
        "LoRA rank %d (alpha %g) on %d UNet layers%s: %d trainable parameters, %.2f%% of the UNet's %d",
        summary["rank"],
        summary["alpha"],
        summary["unet_layers"],
        f" + {summary['text_layers']} text-encoder layers" if on_text else "",
        summary["trainable_parameters"],
        100.0 * summary["trainable_parameters"] / max(1, summary["unet_parameters"]),
        summary["unet_parameters"],
    )
    return module


def check_trained(model: Any, base_model: str | None) -> None:
    """UserError for an untrained base: a freshly initialised UNet's output convolution is all zeros (as are
    its blocks' last layers), so no gradient reaches adapters inside it and LoRA would learn nothing."""
    out = getattr(model.unet, "out", None)
    last = out[-1] if isinstance(out, torch.nn.Sequential) and len(out) else None
    weight = getattr(last, "weight", None)
    if weight is not None and not bool(weight.detach().abs().sum()):
        raise UserError(
            f"base_model={base_model} is untrained: its UNet's output layer is all zeros, so LoRA adapters "
            "get no gradient and would learn nothing. Train or fine-tune the whole model first "
            "(experiment=finetune), then put LoRA on the result."
        )


def base_unet_identity(model: Any) -> str:
    """`state_identity` of the UNet's base weights (LoRA layers left out): recorded with the adapter."""
    state = model.unet.state_dict()
    return state_identity({k.replace(".base_layer", ""): v for k, v in state.items() if "lora_" not in k})
