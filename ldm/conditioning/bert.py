"""A BERT-style transformer text encoder trained from scratch with the UNet (LDM paper's BERTEmbedder).

Rombach et al. 2022 (Sec. 4.3, App. E) condition the LAION text-to-image model ("LDM-KL-8-G", 1.45B) on a
32-layer, 1280-wide transformer over bert-base-uncased WordPiece tokens, trained jointly with the UNet.
The original wraps lucidrains' x-transformers (`TransformerWrapper(attn_layers=Encoder(dim, depth))`, in a
copy vendored into the CompVis repo). `TextTransformer` below is the same computation written out, with the
same parameter names, so `cond_stage_model.transformer.*` of an original checkpoint loads as it is and a
BERTEmbedder trained here is one the original code can load (`to_logits`, which the original builds but
never uses for embeddings, is the only name it has that we lack; the CompVis loader is non-strict):

    transformer.token_emb.weight                    (V, D)     token embedding
    transformer.pos_emb.emb.weight                  (L, D)     learned absolute positions
    transformer.attn_layers.layers.{2i}.0.*         LayerNorm(D) before self-attention (pre-norm)
    transformer.attn_layers.layers.{2i}.1.to_q/k/v  (H*64, D)  no bias; to_out (D, H*64) with bias
    transformer.attn_layers.layers.{2i+1}.0.*       LayerNorm(D) before the feed-forward
    transformer.attn_layers.layers.{2i+1}.1.net.0.0 (4D, D)    Linear -> GELU; net.2 (D, 4D) Linear
    transformer.norm.*                              final LayerNorm(D)

Why not depend on x-transformers: the math is ~60 lines, and the package's later releases changed both the
defaults and the module layout, so a pin would tie us to a 2021 release for nothing we cannot write here.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm.conditioning.base import BaseConditioner, EncodeFn, get_input
from ldm.conditioning.text import as_prompts, default_text_encoder, tokenize
from ldm.errors import UserError

HEAD_DIM = 64  # x-transformers' DEFAULT_DIM_HEAD: heads are 64 wide whatever the model width


def wordpiece_tokenizer(vocab: str | Path | None = None) -> Any:
    """An uncased WordPiece `BertTokenizerFast` built from a vocab.txt (default: all-MiniLM-L6-v2's).

    `vocab` may also be a folder holding vocab.txt (what `text_encoder=` names for original checkpoints).
    all-MiniLM-L6-v2 ships bert-base-uncased's vocabulary (30522 tokens), the one the LDM paper used.
    """
    from transformers import BertTokenizerFast

    path = Path(vocab).expanduser() if vocab is not None else Path(default_text_encoder()) / "vocab.txt"
    if path.is_dir():
        path = path / "vocab.txt"
    if not path.is_file():
        raise UserError(
            f"BERTEmbedder: vocab file {path} not found; pass vocab=<path to a WordPiece vocab.txt> "
            "(one token per line, as shipped with BERT models)."
        )
    # transformers 5 names the argument `vocab`, 4.x `vocab_file`; a wrong name would be silently ignored.
    arg = "vocab" if "vocab" in inspect.signature(BertTokenizerFast.__init__).parameters else "vocab_file"
    return BertTokenizerFast(**{arg: str(path)}, do_lower_case=True)


class SelfAttention(nn.Module):
    """Multi-head self-attention, softmax(Q K^T / sqrt(64)) V over all positions (no mask, no bias on QKV)."""

    def __init__(self, dim: int, heads: int, dim_head: int = HEAD_DIM) -> None:
        super().__init__()
        self.heads = heads
        inner = heads * dim_head  # 512 for 8 heads, independent of dim (1280 in the paper's model)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.Linear(inner, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        q, k, v = (f(x).view(b, n, self.heads, -1).transpose(1, 2) for f in (self.to_q, self.to_k, self.to_v))
        out = F.scaled_dot_product_attention(q, k, v)  # (B, H, L, dim_head), scale 1/sqrt(dim_head)
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class FeedForward(nn.Module):
    """Linear(D, 4D) -> GELU -> Dropout -> Linear(4D, D), indexed as x-transformers' `net.0.0` / `net.2`."""

    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        inner = dim * mult
        self.net = nn.Sequential(
            nn.Sequential(nn.Linear(dim, inner), nn.GELU()), nn.Dropout(0.0), nn.Linear(inner, dim)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class PositionEmbedding(nn.Module):
    """Learned absolute positions 0..L-1 -> (1, L, D) (the original's `pos_emb.emb`)."""

    def __init__(self, dim: int, max_length: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(max_length, dim)

    def forward(self, length: int) -> Tensor:
        return self.emb(torch.arange(length, device=self.emb.weight.device))[None]


class EncoderLayers(nn.Module):
    """`depth` pre-norm blocks x = x + Attn(LN(x)); x = x + FF(LN(x)), stored as layers[2i], layers[2i+1]."""

    def __init__(self, dim: int, depth: int, heads: int, dim_head: int = HEAD_DIM) -> None:
        super().__init__()
        self.layers = nn.ModuleList()
        for _ in range(depth):
            self.layers.append(nn.ModuleList([nn.LayerNorm(dim), SelfAttention(dim, heads, dim_head)]))
            self.layers.append(nn.ModuleList([nn.LayerNorm(dim), FeedForward(dim)]))

    def forward(self, x: Tensor) -> Tensor:
        for norm, block in self.layers:
            x = x + block(norm(x))
        return x


class TextTransformer(nn.Module):
    """Token ids (B, L) -> embeddings (B, L, D): token + position embedding, layers, final LayerNorm."""

    def __init__(
        self,
        vocab_size: int,
        max_length: int,
        dim: int,
        depth: int,
        heads: int = 8,
        dim_head: int = HEAD_DIM,
        emb_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.token_emb = nn.Embedding(vocab_size, dim)
        self.pos_emb = PositionEmbedding(dim, max_length)
        self.emb_dropout = nn.Dropout(emb_dropout)
        self.attn_layers = EncoderLayers(dim, depth, heads, dim_head)
        self.norm = nn.LayerNorm(dim)
        nn.init.normal_(self.token_emb.weight, std=0.02)  # the original's initialisation
        nn.init.normal_(self.pos_emb.emb.weight, std=0.02)

    def forward(self, ids: Tensor) -> Tensor:
        x = self.emb_dropout(self.token_emb(ids) + self.pos_emb(ids.shape[1]))  # (B, L, D)
        return self.norm(self.attn_layers(x))


class BERTEmbedder(BaseConditioner):
    """Prompts -> WordPiece ids [CLS] ... [SEP] [PAD]... (max_length) -> `TextTransformer` -> (B, L, D).

    Like the original, padding is attended to (no key mask): the model learns what [PAD] means; the null
    condition of classifier-free guidance is the encoding of "" ([CLS] [SEP] [PAD]...), as the LDM
    txt2img script used.
    """

    output = "crossattn"

    def __init__(
        self,
        n_layer: int,
        n_embed: int,  # = the UNet's context_dim (the paper's model: 1280)
        max_length: int = 77,  # the original's max_seq_len (same context length as SD)
        vocab: str | None = None,  # WordPiece vocab.txt (or its folder); None = bert-base-uncased's
        n_heads: int = 8,  # x-transformers' default, as LDM used; each head is dim_head wide
        embedding_dropout: float = 0.0,  # LDM's default
        input_key: str = "caption",
        dropout: float = 0.0,  # condition dropout for classifier-free guidance (not the layer dropout)
        vocab_size: int | None = None,  # rows of token_emb; None = the vocab's size (LDM: 30522)
        dim_head: int = HEAD_DIM,  # x-transformers' fixed 64 (so attention is n_heads*64 wide)
    ) -> None:
        super().__init__(dropout)
        self.input_keys = (input_key,)
        self.max_length = int(max_length)
        self.context_dim = int(n_embed)
        self.tokenizer = wordpiece_tokenizer(vocab)
        vocab_size = len(self.tokenizer) if vocab_size is None else int(vocab_size)
        if len(self.tokenizer) > vocab_size:
            raise UserError(
                f"BERTEmbedder: the vocab has {len(self.tokenizer)} tokens but vocab_size={vocab_size}; pass "
                "the vocab.txt the model was trained with, or vocab_size >= the vocab's size."
            )
        self.transformer = TextTransformer(
            vocab_size, self.max_length, n_embed, n_layer, n_heads, dim_head, embedding_dropout
        )

    @property
    def token_emb(self) -> nn.Embedding:
        """The token embedding (V, D) (`transformer.token_emb`)."""
        return self.transformer.token_emb

    @property
    def encoder(self) -> EncoderLayers:
        """The transformer layers (`transformer.attn_layers`)."""
        return self.transformer.attn_layers

    @property
    def out_dim(self) -> int:
        return self.context_dim

    def token_ids(self, prompts: list[str]) -> Tensor:
        """WordPiece ids (B, max_length): [CLS] tokens [SEP] [PAD]...; truncated ones still end in [SEP]."""
        return tokenize(self.tokenizer, prompts, self.max_length, self.token_emb.weight.device)["input_ids"]

    def encode_ids(self, ids: Tensor) -> Tensor:
        """(B, L) token ids, L <= max_length -> (B, L, n_embed) context."""
        return self.transformer(ids)

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
