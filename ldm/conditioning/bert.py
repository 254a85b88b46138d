"""A BERT-style transformer text encoder trained from scratch with the UNet (LDM paper's BERTEmbedder)."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ldm.conditioning.base import BaseConditioner, EncodeFn, get_input
from ldm.conditioning.text import as_prompts, default_text_encoder, tokenize
from ldm.errors import UserError


def wordpiece_tokenizer(vocab: str | Path | None = None) -> Any:
    """An uncased WordPiece `BertTokenizerFast` built from a vocab.txt (default: all-MiniLM-L6-v2's)."""
    from transformers import BertTokenizerFast

    path = Path(vocab).expanduser() if vocab is not None else Path(default_text_encoder()) / "vocab.txt"
    if not path.is_file():
        raise UserError(
            f"BERTEmbedder: vocab file {path} not found; pass vocab=<path to a WordPiece vocab.txt> "
            "(one token per line, as shipped with BERT models)."
        )
    # transformers 5 names the argument `vocab`, 4.x `vocab_file`; a wrong name would be silently ignored.
    arg = "vocab" if "vocab" in inspect.signature(BertTokenizerFast.__init__).parameters else "vocab_file"
    return BertTokenizerFast(**{arg: str(path)}, do_lower_case=True)


class BERTEmbedder(BaseConditioner):
    """Token + learned position embeddings -> pre-LN transformer encoder -> LayerNorm (Rombach et al. 2022).

    The LDM txt2img model (LAION-400M) used n_layer=32, n_embed=1280, max_length=77 with the
    bert-base-uncased WordPiece vocabulary; its encoder was x-transformers' `Encoder`. Here every
    layer is torch's `TransformerEncoderLayer` (pre-norm, GELU, 4x MLP), so a head is n_embed/n_heads
    wide instead of x-transformers' fixed 64. Like the original, padding is attended to (no key mask):
    the model learns what [PAD] means; the null condition "" is [CLS] [SEP] followed by [PAD]s.
    """

    output = "crossattn"

    def __init__(
        self,
        n_layer: int,
        n_embed: int,  # = the UNet's context_dim
        max_length: int = 77,  # same context length as SD, so configs can swap text encoders
        vocab: str | None = None,  # WordPiece vocab.txt; None = all-MiniLM-L6-v2's (bert-base-uncased)
        n_heads: int = 8,  # x-transformers' default, as LDM used
        embedding_dropout: float = 0.0,  # LDM's default
        input_key: str = "caption",
        dropout: float = 0.0,  # condition dropout for classifier-free guidance (not the layer dropout)
    ) -> None:
        super().__init__(dropout)
        if n_embed % n_heads:
            raise UserError(f"BERTEmbedder: n_embed={n_embed} is not divisible by n_heads={n_heads}.")
        self.input_keys = (input_key,)
        self.max_length = int(max_length)
        self.context_dim = int(n_embed)
        self.tokenizer = wordpiece_tokenizer(vocab)
        self.token_emb = nn.Embedding(len(self.tokenizer), n_embed)
        self.pos_emb = nn.Embedding(self.max_length, n_embed)
        self.emb_dropout = nn.Dropout(embedding_dropout)
        layer = nn.TransformerEncoderLayer(
            n_embed, n_heads, 4 * n_embed, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, n_layer, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(n_embed)
        nn.init.normal_(self.token_emb.weight, std=0.02)  # BERT's initialiser
        nn.init.normal_(self.pos_emb.weight, std=0.02)

    @property
    def out_dim(self) -> int:
        return self.context_dim

    def token_ids(self, prompts: list[str]) -> Tensor:
        """WordPiece ids (B, max_length): [CLS] tokens [SEP] [PAD]..., truncated to max_length."""
        return tokenize(self.tokenizer, prompts, self.max_length, self.token_emb.weight.device)["input_ids"]

    def encode_ids(self, ids: Tensor) -> Tensor:
        """(B, L) token ids -> (B, L, n_embed) context."""
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = self.emb_dropout(self.token_emb(ids) + self.pos_emb(positions))  # (B, L, D)
        return self.norm(self.encoder(x))

    def prepare(self, inputs: Mapping[str, Any]) -> dict[str, Any]:
        key = self.input_keys[0]
        return {key: as_prompts(get_input(inputs, key, self), key)}

    def forward(
        self,
        batch: Mapping[str, Any],
        *,
        encode_fn: EncodeFn | None = None,
        latent_size: tuple[int, int] | None = None,
    ) -> Tensor:
        key = self.input_keys[0]
        return self.encode_ids(self.token_ids(as_prompts(get_input(batch, key, self), key)))

    def null(
        self,
        batch: Mapping[str, Any],
        *,
        encode_fn: EncodeFn | None = None,
        latent_size: tuple[int, int] | None = None,
    ) -> Tensor:
        # Trained jointly, so the encoding of "" changes every step: recomputed, never cached.
        n = len(as_prompts(get_input(batch, self.input_keys[0], self), self.input_keys[0]))
        return self.encode_ids(self.token_ids([""])).expand(n, -1, -1)
