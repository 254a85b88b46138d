"""LoRA (Hu et al. 2022, "Low-Rank Adaptation of Large Language Models"): W' = W + s * (alpha/r) * B A.

The adapter layers themselves come from `peft` (`inject_adapter_in_model`); this module decides *where* they
go in our UNet and text encoders (by module class, so any model built here — released or trained from scratch
— gets the same targets), reads trained adapters back as plain tensors (`LoraWeights`), and merges adapters
into a model's weights (what sampling with `lora=` and `merge_lora` do).

Module paths are relative to the plain `LatentDiffusion`: `unet.input_blocks.1.1.transformer_blocks.0.attn1
.to_q` (CompVis names), `conditioner.conditioners.text.transformer.encoder.layers.0.self_attn.q_proj`
(transformers' CLIP names). `ldm.adapters.lora_files` converts them to the AUTOMATIC1111 / kohya and diffusers
key conventions.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ldm.errors import UserError

log = logging.getLogger(__name__)

# lora.targets groups. UNet: by the class of the block that owns the layer (CompVis module layout);
# text encoders (transformers' CLIP / our BERT): by the layer's own name.
TARGET_GROUPS = ("attn", "proj", "ff", "conv")
UNET_TARGETS: dict[str, dict[str, tuple[str, ...]]] = {
    # block class -> group -> the block's child layers
    "CrossAttention": {"attn": ("to_q", "to_k", "to_v", "to_out.0")},
    "AttentionBlock": {"attn": ("qkv", "proj_out")},  # the LDM paper's unconditional / class models
    "SpatialTransformer": {"proj": ("proj_in", "proj_out")},
    "FeedForward": {"ff": ("net.0.proj", "net.2")},
    # LoCon: every convolution and the time-embedding projection of the ResBlocks, and the resamplers
    "ResBlock": {"conv": ("in_layers.2", "emb_layers.1", "out_layers.3", "skip_connection")},
    "Downsample": {"conv": ("op",)},
    "Upsample": {"conv": ("conv",)},
}
TEXT_TARGETS: dict[str, tuple[str, ...]] = {
    "attn": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"),
    "ff": ("mlp.fc1", "mlp.fc2"),
}
ADAPTABLE = (nn.Linear, nn.Conv2d, nn.Conv1d)


@dataclass
class LoraWeights:
    """One adapted layer: delta W = (alpha / rank) * up @ down.

    down: (r, in) for a linear layer, (r, in, kh, kw) / (r, in, k) for a convolution (peft's lora_A).
    up: (out, r), or (out, r, 1, 1) / (out, r, 1) for a convolution (peft's lora_B)."""

    down: Tensor
    up: Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def delta(self, shape: torch.Size | tuple[int, ...], scale: float = 1.0) -> Tensor:
        """scale * (alpha/r) * up @ down, shaped like the target weight `shape` (float32)."""
        down, up = self.down.float(), self.up.float()
        if up.shape[0] != shape[0] or down[0].numel() != int(torch.Size(shape[1:]).numel()):
            raise ValueError(
                f"LoRA down {tuple(down.shape)} / up {tuple(up.shape)} do not fit a {tuple(shape)}"
            )
        product = up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)
        return (scale * self.alpha / self.rank) * product.reshape(shape)


def unet_targets(unet: nn.Module, groups: Iterable[str]) -> list[str]:
    """Names (relative to `unet`) of the layers `lora.targets` groups select, in module order."""
    groups = check_groups(groups)
    modules = dict(unet.named_modules())
    names: list[str] = []
    for name, module in unet.named_modules():
        for group, children in UNET_TARGETS.get(type(module).__name__, {}).items():
            if group not in groups:
                continue
            for child in children:
                full = f"{name}.{child}" if name else child
                if isinstance(modules.get(full), ADAPTABLE):
                    names.append(full)
    return names


def text_targets(transformer: nn.Module, groups: Iterable[str]) -> list[str]:
    """Names (relative to a text transformer) of its attention (and MLP with `ff`) projections."""
    groups = check_groups(groups)
    suffixes = tuple(s for g in groups for s in TEXT_TARGETS.get(g, ()))
    return [n for n, m in transformer.named_modules() if isinstance(m, ADAPTABLE) and n.endswith(suffixes)]


def check_groups(groups: Iterable[str]) -> tuple[str, ...]:
    groups = tuple(groups)
    bad = [g for g in groups if g not in TARGET_GROUPS]
    if bad or not groups:
        raise UserError(
            f"lora.targets={list(groups)}: choose from {list(TARGET_GROUPS)} (attn: attention projections; "
            "proj: the transformer blocks' proj_in/proj_out; ff: feed-forward; conv: LoCon, ResBlock "
            "convolutions and resamplers)."
        )
    return groups


def add_lora(
    module: nn.Module,
    names: list[str],
    rank: int,
    alpha: float | None = None,
    dropout: float = 0.0,
    conv_rank: int | None = None,
    conv_alpha: float | None = None,
    adapter: str = "default",
) -> int:
    """Wrap the layers `names` (relative to `module`) with peft LoRA layers; returns how many were wrapped.

    `alpha` defaults to `rank` (scale 1). peft initialises down (A) randomly and up (B) to zero, so the
    output is unchanged until the first update. `conv_rank`/`conv_alpha`: other values for 3x3 convolutions
    (kohya's conv_dim / conv_alpha). Raises UserError for a rank < 1 or no matching layer."""
    from peft import LoraConfig, inject_adapter_in_model

    if int(rank) < 1:
        raise UserError(f"lora.rank={rank}: the rank must be a whole number >= 1 (4..128 is usual).")
    if not names:
        raise UserError("lora.targets selects no layer of this model: add a group (attn, proj, ff, conv).")
    alpha = float(rank if alpha is None else alpha)
    rank_pattern, alpha_pattern = {}, {}
    if conv_rank is not None or conv_alpha is not None:
        modules = dict(module.named_modules())
        for name in names:
            layer = modules[name]
            if isinstance(layer, nn.Conv2d) and layer.kernel_size != (1, 1):
                rank_pattern[f"^{name}$"] = int(conv_rank or rank)
                alpha_pattern[f"^{name}$"] = float(
                    conv_alpha if conv_alpha is not None else (conv_rank or rank)
                )
    config = LoraConfig(
        r=int(rank),
        lora_alpha=alpha,
        lora_dropout=float(dropout),
        target_modules=list(names),  # exact paths (peft matches a name or a ".name" suffix)
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        init_lora_weights=True,
    )
    inject_adapter_in_model(config, module, adapter_name=adapter)
    return len(names)


def lora_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(path, peft LoRA layer) for every adapted layer of `model`."""
    from peft.tuners.lora import LoraLayer

    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


def lora_state(model: nn.Module, adapter: str = "default") -> dict[str, LoraWeights]:
    """The trained adapters of a peft-wrapped model as plain tensors: {layer path: LoraWeights}."""
    out = {}
    for name, layer in lora_layers(model):
        if adapter not in layer.lora_A:
            continue
        out[name] = LoraWeights(
            down=layer.lora_A[adapter].weight.detach(),
            up=layer.lora_B[adapter].weight.detach(),
            alpha=float(layer.lora_alpha[adapter]),
        )
    return out


def base_layer(module: nn.Module) -> nn.Module:
    """The plain layer under a peft wrapper (the layer itself when not wrapped)."""
    return getattr(module, "base_layer", module)


@torch.no_grad()
def merge_lora(model: nn.Module, adapters: Mapping[str, LoraWeights], scale: float = 1.0) -> int:
    """W += scale * (alpha/r) * up @ down for every adapted layer (in place); returns the number merged.

    Raises UserError naming the first layer path the model does not have or whose shape does not fit."""
    modules = dict(model.named_modules())
    for name, weights in adapters.items():
        layer = modules.get(name)
        if layer is None or not hasattr(base_layer(layer), "weight"):
            raise UserError(f"LoRA layer {name} is not a layer of this model (is it for another base model?)")
        weight = base_layer(layer).weight
        try:
            delta = weights.delta(weight.shape, scale)
        except ValueError as e:
            raise UserError(f"LoRA layer {name}: {e} (is it for another base model?)") from None
        weight.add_(delta.to(weight.device, weight.dtype))
    return len(adapters)


def trainable_count(model: nn.Module) -> int:
    """Number of parameters that require grad."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
