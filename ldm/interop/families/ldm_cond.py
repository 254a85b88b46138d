"""The LDM paper's conditional families (Rombach et al. 2022): class-conditional ImageNet, BERT text-to-image.

- `ClassEmbedder` (models/ldm/cin256, configs/latent-diffusion/cin256-v2.yaml): `cond_stage_model.embedding.
  weight` (n_classes, embed_dim); a label becomes one cross-attention token. Serves sample.py `task=class`
  (batch key `label`). cin256-v2's 1001 rows hold the null class 1000 for classifier-free guidance.
- `BERTEmbedder` (configs/latent-diffusion/txt2img-1p4B-eval.yaml): an x-transformers encoder stored under
  `cond_stage_model.transformer.*`, over bert-base-uncased WordPiece ids. Serves `task=txt2img` (batch key
  `caption`); `text_encoder=` may name a folder with another vocab.txt.
"""

from __future__ import annotations

from typing import Any

import torch

from ldm.conditioning import BERTEmbedder, ClassEmbedder
from ldm.errors import UserError
from ldm.interop.registry import BuildContext, cond_export, cond_stage

COND = "cond_stage_model."
IMAGENET_WITH_NULL = 1001  # cin256-v2: 1000 ImageNet classes + the null class 1000 its notebook guided with
BERT_VOCAB = 30522  # bert-base-uncased, the original BERTEmbedder's default vocab_size
LABEL_NAME, TEXT_NAME = "label", "text"  # our conditioner entries (as conf/experiment/class_cond, txt2img)


def _cond_weights(ctx: BuildContext, prefix: str, what: str) -> dict[str, torch.Tensor]:
    weights = {k[len(COND) :]: v for k, v in ctx.state.items() if k.startswith(COND + prefix)}
    if not weights:
        raise UserError(
            f"the checkpoint has no {what} weights ({COND}{prefix}*), but "
            f"{ctx.where('cond_stage_config.target')} is {ctx.cond_target}; is it a UNet-only or pruned "
            "file, or the yaml of another model?"
        )
    return weights


@cond_stage("ClassEmbedder")
def class_embedder(ctx: BuildContext) -> dict[str, Any]:
    """ClassEmbedder(n_classes, embed_dim) as one cross-attention token per label (B, 1, embed_dim)."""
    if ctx.conditioning_key != "crossattn":
        raise UserError(
            f"{ctx.where('conditioning_key')}={ctx.conditioning_key!r}: the original ClassEmbedder feeds "
            "cross-attention; set conditioning_key: crossattn (as models/ldm/cin256/config.yaml)."
        )
    cp = ctx.cond_params
    if "embed_dim" not in cp:
        raise UserError(
            f"{ctx.where('cond_stage_config.params.embed_dim')} is missing (the UNet's context_dim)."
        )
    rows, dim = int(cp.get("n_classes", 1000)), int(cp["embed_dim"])  # 1000: the original's default
    weight = _cond_weights(ctx, "embedding.weight", "ClassEmbedder")["embedding.weight"]
    if tuple(weight.shape) != (rows, dim):
        raise UserError(
            f"{ctx.where('cond_stage_config.params')}: n_classes={rows}, embed_dim={dim} give an "
            f"embedding of {(rows, dim)}, but checkpoint key {COND}embedding.weight is "
            f"{tuple(weight.shape)}; set n_classes and embed_dim to the checkpoint's (rows, width)."
        )
    # Only cin256-v2's 1001 rows are known to end in a null class; 1000 rows (cin256) are all real classes.
    null_class = rows == IMAGENET_WITH_NULL
    embedder = ClassEmbedder(
        rows - 1 if null_class else rows, embed_dim=dim, input_key="label", null_class=null_class
    )
    embedder.embedding.weight.data = weight.to(embedder.embedding.weight.dtype).clone()
    return {LABEL_NAME: embedder.requires_grad_(False)}


@cond_stage("BERTEmbedder")
def bert_embedder(ctx: BuildContext) -> dict[str, Any]:
    """The checkpoint's text transformer + a WordPiece tokenizer (bert-base-uncased unless text_encoder=)."""
    from ldm.interop.compvis import load_into

    if ctx.conditioning_key != "crossattn":
        raise UserError(
            f"{ctx.where('conditioning_key')}={ctx.conditioning_key!r}: BERTEmbedder's context feeds "
            "cross-attention; set conditioning_key: crossattn (as txt2img-1p4B-eval.yaml)."
        )
    cp = ctx.cond_params
    weights = _cond_weights(ctx, "transformer.", "BERTEmbedder")
    for k in [k for k in weights if k.startswith("transformer.to_logits.")]:
        del weights[k]  # the wrapper's language-model head: built by the original, never used for embeddings
    vocab_size = int(cp.get("vocab_size", BERT_VOCAB))
    with torch.device("meta"):  # the paper's 32x1280 encoder: no random init of weights loaded right away
        embedder = _bert(ctx, cp, vocab_size)
    load_into(embedder, weights, f"{ctx.yaml_path}: model.params.cond_stage_config.params", assign=True)
    return {TEXT_NAME: embedder.requires_grad_(False)}


def _bert(ctx: BuildContext, cp: dict[str, Any], vocab_size: int) -> BERTEmbedder:
    missing = [k for k in ("n_embed", "n_layer") if k not in cp]
    if missing:
        raise UserError(
            f"{ctx.where('cond_stage_config.params.' + missing[0])} is missing (BERTEmbedder needs it)."
        )
    try:
        return BERTEmbedder(
            n_layer=int(cp["n_layer"]),
            n_embed=int(cp["n_embed"]),
            max_length=int(cp.get("max_seq_len", 77)),
            vocab=ctx.text_encoder,
            embedding_dropout=float(cp.get("embedding_dropout", 0.0)),
            vocab_size=vocab_size,
        )
    except UserError as e:
        raise UserError(
            f"{e} This checkpoint's BERTEmbedder has {vocab_size} token rows "
            f"({ctx.where('cond_stage_config.params.vocab_size')}); pass text_encoder=<folder with the "
            "vocab.txt it was trained with> (the original: bert-base-uncased's)."
        ) from None


# -- export back (ldm.interop.export) ---------------------------------------------------------------------


@cond_export("ClassEmbedder")
def class_export(embedder: ClassEmbedder, model: Any) -> dict[str, torch.Tensor] | None:
    """`cond_stage_model.embedding.weight` (rows, D); None for the class-label (adm) mode, which has none."""
    if embedder.embedding is None:
        return None
    return {COND + "embedding.weight": embedder.embedding.weight}


@cond_export("BERTEmbedder")
def bert_export(embedder: BERTEmbedder, model: Any) -> dict[str, torch.Tensor]:
    """`cond_stage_model.transformer.*`: our names below the prefix are the original's (no to_logits head)."""
    return {COND + k: v for k, v in embedder.state_dict().items()}
