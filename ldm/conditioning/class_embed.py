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

    Cross-attention mode is the LDM paper's cin256 model (Rombach et al. 2022, Sec. 4.1): the context is
    one token, `embedding.weight[id]` (the original's parameter name). Its first release
    (models/ldm/cin256) had no null row (1000 rows: `null_class=False`, guidance impossible); cin256-v2
    trained 1001 rows and its sampling notebook used id 1000 as the unconditional class, as here.
    """

    def __init__(
        self,
        n_classes: int,  # real classes; id n_classes is the null class
        embed_dim: int | None = None,  # = the UNet's context_dim (cross-attention mode only)
        output: Literal["crossattn", "class"] = "crossattn",  # LDM cin256 used cross-attention
        input_key: str = "label",
        dropout: float = 0.0,
        null_class: bool = True,  # False: no row for id n_classes (original cin256 v1): no guidance
    ) -> None:
        super().__init__(dropout)
        if output not in ("crossattn", "class"):
            raise UserError(f"ClassEmbedder: output={output!r}; use 'crossattn' or 'class'.")
        if output == "crossattn" and embed_dim is None:
            raise UserError("ClassEmbedder(output='crossattn') needs embed_dim (= the UNet's context_dim).")
        if not null_class and (output != "crossattn" or dropout > 0):
            raise UserError(
                "ClassEmbedder(null_class=False) is for original checkpoints trained without a null class "
                "(cross-attention, no condition dropout); keep null_class=true to train with dropout."
            )
        self.output = output
        self.input_keys = (input_key,)
        self.n_classes = int(n_classes)
        self.null_id: int | None = self.n_classes if null_class else None
        rows = self.n_classes + (1 if null_class else 0)
        self.embedding = nn.Embedding(rows, embed_dim) if output == "crossattn" else None

    @property
    def out_dim(self) -> int | None:
        return self.embedding.embedding_dim if self.embedding is not None else None

    def labels(self, batch: Mapping[str, Any]) -> Tensor:
        """The batch's ids as int64 (B,), checked to lie in [0, n_classes] (n_classes = null)."""
        key = self.input_keys[0]
        labels = as_labels(get_input(batch, key, self), key)
        top = self.n_classes if self.null_id is not None else self.n_classes - 1
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) > top):
            null = f", {self.null_id} = null" if self.null_id is not None else ", no null class"
            raise UserError(
                f"'{key}' holds ids from {int(labels.min())} to {int(labels.max())}, but ClassEmbedder has "
                f"n_classes={self.n_classes} (valid ids 0..{self.n_classes - 1}{null}); "
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
        if self.null_id is None:
            raise UserError(
                f"this ClassEmbedder has no null class ({self.n_classes} embedding rows, one per class: the "
                "original cin256 model), so classifier-free guidance is impossible; sample with cfg_scale=1."
            )
        labels = as_labels(get_input(batch, self.input_keys[0], self), self.input_keys[0])
        device = self.embedding.weight.device if self.embedding is not None else labels.device
        return self.embed(torch.full((batch_size_of(labels),), self.null_id, dtype=torch.long, device=device))

    def extra_repr(self) -> str:
        return f"n_classes={self.n_classes}, " + super().extra_repr()
