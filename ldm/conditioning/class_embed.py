"""Class labels as conditioning: a learned cross-attention token, or ids for the UNet's label embedding."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ldm.conditioning.base import BaseConditioner, EncodeFn, batch_size_of, get_input
from ldm.errors import UserError


def as_labels(value: Any, key: str) -> Tensor:
    """An int, a list of ints or an integer tensor as int64 (B,)."""
    labels = value if isinstance(value, Tensor) else torch.as_tensor(value)
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise UserError(f"'{key}' must hold integer class ids, got dtype {labels.dtype}.")
    return labels.reshape(-1).long()


class ClassEmbedder(BaseConditioner):
    """Class-conditional LDM (ImageNet): ids -> (B, 1, D) context, or ids -> the UNet's `y`.

    Both modes reserve one extra id, `n_classes`, for the null class of classifier-free guidance.
    In `output="class"` mode the UNet embeds the ids itself (CompVis `num_classes`), so it must be
    built with num_classes = n_classes + 1; `Conditioner.num_classes` reports that number.
    """

    def __init__(
        self,
        n_classes: int,  # real classes; id n_classes is the null class
        embed_dim: int | None = None,  # = the UNet's context_dim (cross-attention mode only)
        output: Literal["crossattn", "class"] = "crossattn",  # LDM cin256 used cross-attention
        input_key: str = "label",
        dropout: float = 0.0,
    ) -> None:
        super().__init__(dropout)
        if output not in ("crossattn", "class"):
            raise UserError(f"ClassEmbedder: output={output!r}; use 'crossattn' or 'class'.")
        if output == "crossattn" and embed_dim is None:
            raise UserError("ClassEmbedder(output='crossattn') needs embed_dim (= the UNet's context_dim).")
        self.output = output
        self.input_keys = (input_key,)
        self.n_classes = int(n_classes)
        self.null_id = self.n_classes
        self.embedding = nn.Embedding(self.n_classes + 1, embed_dim) if output == "crossattn" else None

    @property
    def out_dim(self) -> int | None:
        return self.embedding.embedding_dim if self.embedding is not None else None

    def labels(self, batch: Mapping[str, Any]) -> Tensor:
        """The batch's ids as int64 (B,), checked to lie in [0, n_classes] (n_classes = null)."""
        key = self.input_keys[0]
        labels = as_labels(get_input(batch, key, self), key)
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) > self.n_classes):
            raise UserError(
                f"'{key}' holds ids from {int(labels.min())} to {int(labels.max())}, but ClassEmbedder has "
                f"n_classes={self.n_classes} (valid ids 0..{self.n_classes - 1}, {self.null_id} = null); "
                "set n_classes to the number of classes in the data."
            )
        if self.embedding is not None:
            labels = labels.to(self.embedding.weight.device)
        return labels

    def prepare(self, inputs: Mapping[str, Any]) -> dict[str, Any]:
        return {self.input_keys[0]: self.labels(inputs)}

    def embed(self, labels: Tensor) -> Tensor:
        """(B,) ids -> (B, 1, D) context in cross-attention mode, the ids themselves in class mode."""
        return labels if self.embedding is None else self.embedding(labels)[:, None]

    def forward(
        self,
        batch: Mapping[str, Any],
        *,
        encode_fn: EncodeFn | None = None,
        latent_size: tuple[int, int] | None = None,
    ) -> Tensor:
        return self.embed(self.labels(batch))

    def null(
        self,
        batch: Mapping[str, Any],
        *,
        encode_fn: EncodeFn | None = None,
        latent_size: tuple[int, int] | None = None,
    ) -> Tensor:
        labels = as_labels(get_input(batch, self.input_keys[0], self), self.input_keys[0])
        device = self.embedding.weight.device if self.embedding is not None else labels.device
        return self.embed(torch.full((batch_size_of(labels),), self.null_id, dtype=torch.long, device=device))

    def extra_repr(self) -> str:
        return f"n_classes={self.n_classes}, " + super().extra_repr()
