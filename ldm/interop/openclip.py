"""The OpenCLIP text tower of Stable Diffusion 2.x (`FrozenOpenCLIPEmbedder`) as a HF `CLIPTextModel`.

SD 2.x encodes prompts with OpenCLIP ViT-H/14's text transformer (Radford et al. 2021; Cherti et al. 2023) and
keeps its weights under `cond_stage_model.model.*` with OpenCLIP's names. The architecture is CLIP's text
transformer (pre-norm, causal mask, exact GELU), so the weights load into transformers' `CLIPTextModel` after
renaming; no OpenCLIP code is needed:

    token_embedding.weight                       -> embeddings.token_embedding.weight      (V, D)
    positional_embedding                         -> embeddings.position_embedding.weight   (77, D)
    transformer.resblocks.N.ln_1 / ln_2          -> encoder.layers.N.layer_norm1 / layer_norm2
    transformer.resblocks.N.attn.in_proj_weight  -> encoder.layers.N.self_attn.{q,k,v}_proj.weight  (3D, D)
    transformer.resblocks.N.attn.in_proj_bias    -> encoder.layers.N.self_attn.{q,k,v}_proj.bias    (3D,)
    transformer.resblocks.N.attn.out_proj        -> encoder.layers.N.self_attn.out_proj
    transformer.resblocks.N.mlp.c_fc / c_proj    -> encoder.layers.N.mlp.fc1 / fc2
    ln_final                                     -> final_layer_norm
    text_projection, logit_scale, attn_mask      -> unused (the UNet reads per-token states, not pooled)

SD 2's `layer: penultimate` takes the states before the last resblock and applies `ln_final` to them, which
is what `FrozenTextEncoder(layer="penultimate")` does for a CLIP model. OpenCLIP pads prompts with token id 0
("!" in CLIP's vocabulary) after the end-of-text token, and the UNet attends to every one of the 77 positions,
so the tokenizer's pad token is set to id 0 whatever the tokenizer folder says.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from ldm.conditioning import FrozenTextEncoder
from ldm.errors import UserError

OPENCLIP = "cond_stage_model.model."
RESBLOCK = "transformer.resblocks."
HEAD_WIDTH = 64  # every released OpenCLIP text tower (ViT-B/L/H/g/bigG) uses 64-wide heads
UNUSED = ("text_projection", "logit_scale", "attn_mask", "visual.")
RENAMES = {
    "token_embedding.weight": "embeddings.token_embedding.weight",
    "positional_embedding": "embeddings.position_embedding.weight",
    "ln_final.weight": "final_layer_norm.weight",
    "ln_final.bias": "final_layer_norm.bias",
}
BLOCK_RENAMES = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
TOKENIZER_FILES = ("tokenizer.json", "vocab.json")


def openclip_text_weights(state: Mapping[str, Tensor], prefix: str = OPENCLIP) -> dict[str, Tensor]:
    """The OpenCLIP text tower under `prefix` by CLIPTextModel (transformers 5) names; in_proj split in 3."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix) :]
        if name.startswith(UNUSED):
            continue
        if name in RENAMES:
            out[RENAMES[name]] = value
            continue
        if not name.startswith(RESBLOCK):
            raise UserError(
                f"checkpoint key {key} is not part of an OpenCLIP text transformer; the yaml's "
                "cond_stage_config.target is FrozenOpenCLIPEmbedder: is it the config of this checkpoint?"
            )
        index, rest = name[len(RESBLOCK) :].split(".", 1)
        layer = f"encoder.layers.{index}."
        if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
            kind = rest.rsplit("_", 1)[-1]  # weight | bias
            q, k, v = value.chunk(3, dim=0)  # (3D, ...) -> 3 x (D, ...), in q, k, v order
            for proj, part in zip(("q_proj", "k_proj", "v_proj"), (q, k, v), strict=True):
                out[f"{layer}self_attn.{proj}.{kind}"] = part
            continue
        module, _, leaf = rest.rpartition(".")
        if module not in BLOCK_RENAMES:
            raise UserError(
                f"checkpoint key {key}: unknown OpenCLIP resblock part {module!r} (expected ln_1, attn, "
                "ln_2, mlp.c_fc, mlp.c_proj); the file does not hold a standard OpenCLIP text transformer."
            )
        out[f"{layer}{BLOCK_RENAMES[module]}.{leaf}"] = value
    if "embeddings.token_embedding.weight" not in out:
        raise UserError(
            f"the checkpoint has no OpenCLIP text weights ({prefix}token_embedding.weight, ...), but its "
            "yaml uses FrozenOpenCLIPEmbedder; is it a UNet-only or pruned file?"
        )
    return out


def openclip_text_config(weights: Mapping[str, Tensor], tokenizer: Any) -> Any:
    """CLIPTextConfig read off the converted weights (heads: OpenCLIP's 64-wide convention, exact GELU)."""
    from transformers import CLIPTextConfig

    vocab, width = weights["embeddings.token_embedding.weight"].shape
    layers = 1 + max(int(k.split(".")[2]) for k in weights if k.startswith("encoder.layers."))
    return CLIPTextConfig(
        vocab_size=int(vocab),
        hidden_size=int(width),
        intermediate_size=int(weights["encoder.layers.0.mlp.fc1.weight"].shape[0]),
        num_hidden_layers=layers,
        num_attention_heads=max(1, int(width) // HEAD_WIDTH),
        max_position_embeddings=int(weights["embeddings.position_embedding.weight"].shape[0]),
        hidden_act="gelu",  # OpenCLIP's LAION models use nn.GELU (OpenAI's CLIP: quick_gelu)
        layer_norm_eps=1e-5,  # torch.nn.LayerNorm's default, which OpenCLIP uses
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=0,
    )


def read_tokenizer(folder: str | None) -> Any:
    """The CLIP BPE tokenizer of `text_encoder=<folder>`, padding with id 0 as `open_clip.tokenize` does."""
    if not folder:
        raise UserError(
            "this checkpoint encodes prompts with OpenCLIP (cond_stage_config.target: "
            "FrozenOpenCLIPEmbedder), whose tokenizer is not stored in the checkpoint: pass "
            "text_encoder=<local folder with a CLIP tokenizer (tokenizer.json, or vocab.json + merges.txt)>, "
            "e.g. the tokenizer/ folder of stabilityai/stable-diffusion-2-1 or a download of "
            "openai/clip-vit-large-patch14 (same vocabulary)."
        )
    path = Path(folder).expanduser()
    if not path.is_dir() or not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise UserError(
            f"text_encoder={folder}: not a folder with CLIP tokenizer files (tokenizer.json, or vocab.json + "
            "merges.txt). Pass e.g. the tokenizer/ folder of stabilityai/stable-diffusion-2-1."
        )
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise UserError(f"text_encoder={folder}: could not read the CLIP tokenizer ({e}).") from None
    tokenizer.pad_token = tokenizer.convert_ids_to_tokens(0)  # OpenCLIP pads with 0 ("!"), not end-of-text
    return tokenizer


def openclip_text_encoder(
    folder: str | None,
    state: Mapping[str, Tensor],
    *,
    max_length: int | None = None,  # None: the checkpoint's positions (open_clip.tokenize always pads to 77)
    layer: str = "penultimate",
    prefix: str = OPENCLIP,
) -> FrozenTextEncoder:
    """FrozenTextEncoder over the checkpoint's OpenCLIP text weights, tokenizer from `folder`.

    Returns (B, max_length, D) states of `layer` (last | penultimate, both through the final LayerNorm).
    """
    if layer not in ("last", "penultimate"):
        raise UserError(
            f"cond_stage_config.params.layer={layer!r} is not supported for FrozenOpenCLIPEmbedder; use "
            "last or penultimate (SD 2.x: penultimate)."
        )
    # float32 as the original builds it (an fp16 file would otherwise give an fp16 CLIPTextModel).
    weights = {k: v.float() for k, v in openclip_text_weights(state, prefix).items()}
    tokenizer = read_tokenizer(folder)
    config = openclip_text_config(weights, tokenizer)
    if len(tokenizer) != config.vocab_size:
        raise UserError(
            f"text_encoder={folder}: its tokenizer has {len(tokenizer)} tokens but the checkpoint's "
            f"{prefix}token_embedding.weight has {config.vocab_size} rows; pass the CLIP tokenizer the "
            "checkpoint was trained with (SD 2.x: 49408 tokens)."
        )
    with tempfile.TemporaryDirectory(prefix="ldm_openclip_") as tmp:
        tokenizer.save_pretrained(tmp)
        config.save_pretrained(tmp)
        save_file({k: v.contiguous() for k, v in weights.items()}, os.path.join(tmp, "model.safetensors"))
        max_length = config.max_position_embeddings if max_length is None else int(max_length)
        encoder = FrozenTextEncoder(model=tmp, max_length=max_length, layer=layer)
    encoder.model_name = str(Path(folder).expanduser())
    load_weights(encoder, weights)
    return encoder


def load_weights(encoder: FrozenTextEncoder, weights: Mapping[str, Tensor]) -> None:
    """Load converted weights strictly (cast to the model's dtype) and refresh the cached null context."""
    from ldm.interop.compvis import load_text_weights

    load_text_weights(encoder, weights)
    if encoder.tokenizer.pad_token_id != 0:  # a tokenizer saved and reloaded must keep OpenCLIP's padding
        encoder.tokenizer.pad_token = encoder.tokenizer.convert_ids_to_tokens(0)
        with torch.no_grad():
            encoder.null_context.copy_(encoder.encode_prompts([""]))


def openclip_state(weights: Mapping[str, Tensor], prefix: str = OPENCLIP) -> dict[str, Tensor]:
    """The inverse of `openclip_text_weights`: CLIPTextModel names -> OpenCLIP names under `prefix`, with
    q/k/v merged back into `attn.in_proj_weight` (3D, D) / `in_proj_bias` (3D,). `text_projection`,
    `logit_scale` and `attn_mask` are not written (not modelled: the UNet reads per-token states)."""
    renames = {ours: theirs for theirs, ours in RENAMES.items()}
    blocks = {ours: theirs for theirs, ours in BLOCK_RENAMES.items()}
    out: dict[str, Tensor] = {}
    for key, value in weights.items():
        name = key[len("text_model.") :] if key.startswith("text_model.") else key  # transformers 4.x level
        if name in renames:
            out[prefix + renames[name]] = value
        elif name.startswith("encoder.layers."):
            index, rest = name[len("encoder.layers.") :].split(".", 1)
            module, _, leaf = rest.rpartition(".")
            block = f"{prefix}{RESBLOCK}{index}."
            if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                if module == "self_attn.q_proj":  # (D, ...) x 3 -> (3D, ...) in q, k, v order
                    parts = [weights[key.replace("q_proj", p)] for p in ("q_proj", "k_proj", "v_proj")]
                    out[f"{block}attn.in_proj_{leaf}"] = torch.cat(parts, dim=0)
            else:
                out[f"{block}{blocks[module]}.{leaf}"] = value
        elif name != "embeddings.position_ids":  # a constant arange (older transformers store it)
            raise UserError(f"text encoder weight {key} has no OpenCLIP counterpart; cannot export it.")
    return out


__all__ = [
    "openclip_state",
    "openclip_text_config",
    "openclip_text_encoder",
    "openclip_text_weights",
    "read_tokenizer",
]
