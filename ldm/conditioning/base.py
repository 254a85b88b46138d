"""The one interface every conditioner follows: the batch key it reads, what it outputs, its null value.

A conditioner is a plain `nn.Module` that turns raw batch fields into one of three UNet inputs:

- `"crossattn"`: a context sequence (B, L, D) for the UNet's cross-attention,
- `"concat"`:    channels (B, C, h, w) at latent resolution, concatenated to the noisy latent,
- `"class"`:     `y` for the UNet's label embedding: ids (B,) or vectors (B, D).

Each one also knows its *null* value (what classifier-free guidance uses for "no condition", Ho &
Salimans 2022) and its `dropout` rate: during training a sample's condition is replaced by the null
value with that probability, so the same network learns the unconditional model too.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ldm.errors import UserError

Output = Literal["crossattn", "concat", "class"]
OUTPUTS: tuple[str, ...] = ("crossattn", "concat", "class")

# pixels in [-1, 1] (B, 3, H, W) -> scaled latents (B, C, H/f, W/f): the frozen autoencoder's encoder.
EncodeFn = Callable[[Tensor], Tensor]


class BaseConditioner(nn.Module):
    """Base class: subclasses set `input_keys` and `output` and implement `forward` and `null`.

    `forward(batch)` and `null(batch)` both return a tensor shaped by `output` with one row per sample;
    `null` depends only on the batch's size and shapes, never on its content.
    """

    input_keys: tuple[str, ...] = ()
    output: Output = "crossattn"

    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= float(dropout) <= 1.0:
            raise UserError(
                f"{type(self).__name__}: dropout={dropout} is not a probability; use a value in [0, 1] "
                "(0.1 is the usual rate for classifier-free guidance)."
            )
        self.dropout = float(dropout)

    @property
    def trainable(self) -> bool:
        """Whether the optimizer should see this conditioner (frozen encoders and parameter-free ones: no)."""
        return any(p.requires_grad for p in self.parameters())

    @property
    def out_dim(self) -> int | None:
        """D of a cross-attention context, C of a concat condition, or None for class ids."""
        raise NotImplementedError

    def freeze(self) -> BaseConditioner:
        """Stop training this conditioner (e.g. a BERTEmbedder during a later fine-tuning stage)."""
        self.requires_grad_(False)
        return self

    def prepare(self, inputs: Mapping[str, Any]) -> dict[str, Any]:
        """Raw user inputs for sampling (a prompt string, an int label, a (3,H,W) image) in batch form."""
        return {key: get_input(inputs, key, self) for key in self.input_keys}

    def forward(
        self,
        batch: Mapping[str, Any],
        *,
        encode_fn: EncodeFn | None = None,
        latent_size: tuple[int, int] | None = None,
    ) -> Tensor:
        raise NotImplementedError

    def null(
        self,
        batch: Mapping[str, Any],
        *,
        encode_fn: EncodeFn | None = None,
        latent_size: tuple[int, int] | None = None,
    ) -> Tensor:
        """The unconditional value for every sample of `batch` (same shape as `forward(batch)`)."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"input_keys={self.input_keys}, output={self.output!r}, dropout={self.dropout}"


def get_input(batch: Mapping[str, Any], key: str, owner: nn.Module) -> Any:
    """`batch[key]`, or a UserError naming the key, the conditioner and the keys the batch does have."""
    if key not in batch:
        raise UserError(
            f"{type(owner).__name__} reads batch key '{key}', but the batch only has {sorted(batch)}. "
            f"Add a data transform that provides '{key}' (see conf/data and conf/task) or set the "
            "conditioner's input_key to one of the keys above."
        )
    return batch[key]


def batch_size_of(value: Any) -> int:
    """Number of samples in a batch field (list of strings or tensor with a leading batch dim)."""
    return int(value.shape[0]) if isinstance(value, Tensor) else len(value)


def drop_mask(batch_size: int, p: float, generator: torch.Generator | None, device: torch.device) -> Tensor:
    """Bernoulli(p) per sample, True = use the null value; drawn on the generator's device, then moved."""
    rng_device = generator.device if generator is not None else torch.device("cpu")
    return (torch.rand(batch_size, generator=generator, device=rng_device) < p).to(device)


def as_image_batch(value: Any, name: str) -> Tensor:
    """A (C,H,W) or (B,C,H,W) tensor as (B,C,H,W) float."""
    if not isinstance(value, Tensor):
        raise UserError(f"'{name}' must be a tensor (C,H,W) or (B,C,H,W), got {type(value).__name__}.")
    if value.ndim == 3:
        value = value[None]
    if value.ndim != 4:
        raise UserError(f"'{name}' must have shape (C,H,W) or (B,C,H,W), got {tuple(value.shape)}.")
    return value.float()
