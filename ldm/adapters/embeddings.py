"""Textual-inversion embeddings (Gal et al. 2023, "An Image is Worth One Word"): new words, frozen encoder.

A learned "word" is n vectors of the text encoder's token-embedding width D (768: SD 1.x's CLIP ViT-L/14,
1024: SD 2.x's OpenCLIP ViT-H/14). Adding one to a `FrozenTextEncoder` leaves every base row untouched:

- the encoder's token embedding becomes an `ExtendedEmbedding` (the same `weight` Parameter, frozen, plus
  an `extra` Parameter (n_new, D) for the token ids from `first_id` on); prompts without new tokens give
  bit-identical states;
- the tokenizer learns the tokens with `add_tokens` (matched case-insensitively by CLIP's lower-casing
  tokenizer) and is wrapped in an `EmbeddingTokenizer`, which rewrites a name in the prompt text into all of
  its tokens: AUTOMATIC1111's "vectors per token" — `<sks>` with 3 vectors becomes `<sks> <sks>_1 <sks>_2`,
  diffusers' `maybe_convert_prompt` convention. `ldm.conditioning.text` needs no change.

Supported encoders: transformers' CLIP text models (SD 1.x/2.x; `embeddings.token_embedding`) and BERT-family
`FrozenTextEncoder`s such as the default all-MiniLM-L6-v2 (`embeddings.word_embeddings`). The LDM paper's
BERT trained from scratch (`ldm.conditioning.bert.BERTEmbedder`) is refused with a UserError.

Files (read without running code: safetensors, or `torch.load(weights_only=True)`):
- AUTOMATIC1111 / ComfyUI `.safetensors`: `{"emb_params": (n, D)}` (what this module writes, with metadata);
- AUTOMATIC1111 `.pt`: `{"string_to_param": {"*": (n, D)}, "name": ..., "step": ...}`;
- diffusers `learned_embeds.bin` / `.safetensors`: `{token: (D,) or (n, D)}`.
The trigger word is the file's stem (A1111's convention), the token of a diffusers file, or `path:name`.
No Lightning here: sampling uses this module.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ldm.errors import UserError

A1111_KEY = "emb_params"  # the single tensor of AUTOMATIC1111 / ComfyUI .safetensors embeddings
# Token-embedding width -> the base models whose text encoder has it (named in width-mismatch errors).
BASE_FOR_WIDTH = {
    768: "SD 1.x (CLIP ViT-L/14)",
    1024: "SD 2.x (OpenCLIP ViT-H/14)",
    1280: "SDXL's second text encoder (OpenCLIP ViT-bigG)",
}
SUFFIXES = (".safetensors", ".pt", ".bin", ".ckpt")


class ExtendedEmbedding(nn.Embedding):
    """A token embedding with new rows: ids < `first_id` read the frozen `weight` (V, D) exactly as before,
    ids >= `first_id` read `extra[id - first_id]` ((n_new, D), the learned vectors).

    Installed in place of an encoder's `nn.Embedding` by `install_embedding` (class swap: the base
    Parameter, its name `weight` and every state-dict key of the base stay as they were)."""

    first_id: int
    extra: nn.Parameter

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002  (nn.Embedding's argument name)
        """(B, L) token ids -> (B, L, D) vectors (the weight's dtype)."""
        base = super().forward(input.clamp(0, self.first_id - 1))
        new = input >= self.first_id
        if self.extra.shape[0] == 0 or not bool(new.any()):
            return base
        rows = self.extra.to(base.dtype)[(input - self.first_id).clamp(0, self.extra.shape[0] - 1)]
        return torch.where(new.unsqueeze(-1), rows, base)


class EmbeddingTokenizer:
    """A tokenizer proxy that rewrites embedding names in prompts into their tokens before tokenizing.

    `names`: {name: [its tokens]}; every other attribute is the wrapped tokenizer's."""

    def __init__(self, tokenizer: Any) -> None:
        self.wrapped = tokenizer
        self.names: dict[str, list[str]] = {}
        self._pattern: re.Pattern[str] | None = None

    def __getattr__(self, name: str) -> Any:
        wrapped = self.__dict__.get("wrapped")
        if wrapped is None:
            raise AttributeError(name)
        return getattr(wrapped, name)

    def __len__(self) -> int:
        return len(self.wrapped)

    def add(self, name: str, tokens: list[str]) -> None:
        self.names[name] = list(tokens)
        # longest names first, so that '<sks>' never cuts '<sks>2' short; '<sks>_1' is left as written
        alternatives = "|".join(re.escape(n) for n in sorted(self.names, key=len, reverse=True))
        self._pattern = re.compile(rf"(?:{alternatives})(?!_\d)", re.IGNORECASE)

    def expand(self, text: str | Sequence[str]) -> str | list[str]:
        """Each embedding name in `text` (a prompt or a list of prompts) -> its tokens, space-separated."""
        if isinstance(text, (list, tuple)):
            return [self.expand(t) for t in text]
        if self._pattern is None or not isinstance(text, str):
            return text
        lookup = {n.lower(): n for n in self.names}
        return self._pattern.sub(lambda m: " ".join(self.names[lookup[m.group(0).lower()]]), text)

    def __call__(self, text: Any = None, *args: Any, **kwargs: Any) -> Any:
        return self.wrapped(self.expand(text), *args, **kwargs)

    def tokenize(self, text: str, **kwargs: Any) -> list[str]:
        return self.wrapped.tokenize(self.expand(text), **kwargs)

    def encode(self, text: str, *args: Any, **kwargs: Any) -> Any:
        return self.wrapped.encode(self.expand(text), *args, **kwargs)


def _embeddings_owner(encoder: Any) -> tuple[nn.Module, str]:
    """(module holding the token embedding, its attribute name) of a FrozenTextEncoder's transformer."""
    transformer = getattr(encoder, "transformer", None)
    text_model = getattr(transformer, "text_model", transformer)  # transformers 4.x nests CLIP one deeper
    owner = getattr(text_model, "embeddings", None)
    for attribute in ("token_embedding", "word_embeddings"):  # CLIP | BERT family
        if isinstance(getattr(owner, attribute, None), nn.Embedding):
            return owner, attribute
    kind = type(encoder).__name__
    raise UserError(
        f"Textual-inversion embeddings need a pretrained CLIP or BERT-family text encoder "
        f"(FrozenTextEncoder); this model's {kind} has no token embedding to extend (the LDM paper's "
        "BERT trained from scratch is not supported)."
    )


def install_embedding(encoder: Any) -> ExtendedEmbedding:
    """Make `encoder`'s token embedding an ExtendedEmbedding and its tokenizer an EmbeddingTokenizer (once).

    Raises UserError for an encoder without a token embedding, or a tokenizer longer than the embedding."""
    owner, attribute = _embeddings_owner(encoder)
    embedding = getattr(owner, attribute)
    if not isinstance(encoder.tokenizer, EmbeddingTokenizer):
        encoder.tokenizer = EmbeddingTokenizer(encoder.tokenizer)
    if isinstance(embedding, ExtendedEmbedding):
        return embedding
    first = len(encoder.tokenizer)
    if first > embedding.num_embeddings:
        raise UserError(
            f"The tokenizer of {getattr(encoder, 'model_name', 'this text encoder')} has {first} tokens but "
            f"its embedding only {embedding.num_embeddings} rows: pass the tokenizer made for these weights."
        )
    weight = embedding.weight
    embedding.__class__ = ExtendedEmbedding
    embedding.first_id = first  # ids the tokenizer gives new tokens start here (rows >= it never occur)
    embedding.extra = nn.Parameter(weight.new_zeros(0, weight.shape[1]), requires_grad=False)
    return embedding


def embedding_names(encoder: Any) -> dict[str, int]:
    """{name: number of vectors} of the embeddings added to `encoder`."""
    tokenizer = getattr(encoder, "tokenizer", None)
    names = tokenizer.names if isinstance(tokenizer, EmbeddingTokenizer) else {}
    return {n: len(t) for n, t in names.items()}


def embedding_vectors(encoder: Any, name: str) -> Tensor:
    """The (n, D) vectors of embedding `name` (a view of the extra rows; KeyError when not added)."""
    tokens = encoder.tokenizer.names[name]
    owner, attribute = _embeddings_owner(encoder)
    embedding = getattr(owner, attribute)
    ids = encoder.tokenizer.wrapped.convert_tokens_to_ids(tokens)
    return embedding.extra[ids[0] - embedding.first_id : ids[-1] - embedding.first_id + 1]


def _check_name(encoder: Any, name: str, tokens: list[str], where: str) -> None:
    tokenizer = encoder.tokenizer.wrapped
    if not isinstance(name, str) or not name.strip() or any(c.isspace() for c in name):
        raise UserError(
            f"{where}: the embedding name {name!r} must be one word without spaces, e.g. '<sks>'."
        )
    if name.lower() in {n.lower() for n in encoder.tokenizer.names}:
        raise UserError(
            f"{where}: an embedding named '{name}' is already loaded; give this one another name "
            "(file.safetensors:<name>)."
        )
    vocab = tokenizer.get_vocab()
    first = install_embedding(encoder).first_id
    for token in tokens:
        pieces = tokenizer.tokenize(token)
        ids = tokenizer.convert_tokens_to_ids(pieces)
        if token in vocab or (len(ids) == 1 and ids[0] < first):
            raise UserError(
                f"{where}: '{token}' is already a token of the text encoder's vocabulary ({pieces[0]}); "
                "an embedding needs a new word, e.g. '<" + name.strip("<>") + ">'."
            )


def add_embedding(encoder: Any, name: str, vectors: Tensor, trainable: bool = False) -> list[str]:
    """Add the word `name` with `vectors` (n, D) to a FrozenTextEncoder; returns its n tokens.

    Tokens: `name`, `name_1`, ..., `name_{n-1}`; the prompt text `name` expands to all of them. The base
    vocabulary rows and every prompt without the name keep their exact states. `trainable`: the extra
    rows require grad (textual-inversion training). Raises UserError for a name already in the vocabulary
    or already added, a width other than the encoder's, or more vectors than the context holds."""
    install_embedding(encoder)
    where = f"embedding '{name}'"
    vectors = torch.as_tensor(vectors).detach()
    if vectors.ndim == 1:
        vectors = vectors.unsqueeze(0)
    owner, attribute = _embeddings_owner(encoder)
    embedding: ExtendedEmbedding = getattr(owner, attribute)
    width = embedding.weight.shape[1]
    if vectors.ndim != 2 or vectors.shape[1] != width or vectors.shape[0] < 1:
        raise UserError(
            f"{where}: vectors of shape {tuple(vectors.shape)}, but this text encoder needs (n, {width})."
        )
    n = int(vectors.shape[0])
    room = int(getattr(encoder, "max_length", 77)) - 2
    if n > room:
        raise UserError(f"{where}: {n} vectors do not fit a {room + 2}-token context; use at most {room}.")
    tokens = [name] + [f"{name}_{i}" for i in range(1, n)]
    _check_name(encoder, name, tokens, where)
    tokenizer = encoder.tokenizer.wrapped
    expected = list(range(len(tokenizer), len(tokenizer) + n))
    start = embedding.first_id + embedding.extra.shape[0]
    if expected[0] != start:
        raise RuntimeError(f"tokenizer has {len(tokenizer)} tokens, the extended embedding {start} rows")
    tokenizer.add_tokens(tokens)
    if tokenizer.convert_tokens_to_ids(tokens) != expected:
        raise RuntimeError(f"add_tokens gave {tokenizer.convert_tokens_to_ids(tokens)}, not ids {expected}")
    rows = vectors.to(embedding.extra.device, embedding.extra.dtype)
    grow = torch.cat([embedding.extra.detach(), rows])
    embedding.extra = nn.Parameter(grow, requires_grad=bool(trainable or embedding.extra.requires_grad))
    encoder.tokenizer.add(name, tokens)
    return tokens


@torch.no_grad()
def init_embedding(
    encoder: Any, name: str, init_word: str, num_vectors: int = 1, trainable: bool = False
) -> Tensor:
    """Add `name` initialised from `init_word`'s token embedding(s); returns the (num_vectors, D) vectors.

    The word's k tokens (no start/end tokens) are repeated cyclically or truncated to num_vectors (the
    textual-inversion paper initialises its single vector from one coarse descriptor word, e.g. 'dog').
    Raises UserError when the word tokenizes to nothing or num_vectors < 1."""
    if not isinstance(num_vectors, int) or num_vectors < 1:
        raise UserError(f"num_vectors={num_vectors}: a whole number >= 1 (A1111's vectors per token).")
    install_embedding(encoder)
    if not isinstance(init_word, str) or not init_word.strip():
        raise UserError(
            f"init_word={init_word!r}: pass a word close to the concept to start '{name}' from, e.g. dog."
        )
    ids = encoder.tokenizer(init_word, add_special_tokens=False)["input_ids"]
    if len(ids) == 0:
        raise UserError(
            f"init_word='{init_word}' gives no token with this tokenizer; pass a plain word, e.g. dog."
        )
    owner, attribute = _embeddings_owner(encoder)
    embedding = getattr(owner, attribute)
    table = embedding(torch.tensor(ids, device=embedding.weight.device)).float().cpu()
    vectors = table[torch.arange(num_vectors) % len(ids)].clone()
    add_embedding(encoder, name, vectors, trainable=trainable)
    return vectors


# ---- files -------------------------------------------------------------------------------------------


@dataclass
class EmbeddingFile:
    """One embedding read from a file: vectors (n, D) float32; `name` when the file names its token."""

    vectors: Tensor
    name: str | None
    format: str  # a1111-safetensors | a1111-pt | diffusers
    metadata: dict[str, str] = field(default_factory=dict)


def _read_raw(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    if not path.is_file():
        raise UserError(f"embedding file {path}: no such file.")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), "pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        except SafetensorError as e:
            raise UserError(f"embedding file {path} is not a readable safetensors file ({e}).") from None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickles with code, or no torch file at all
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"embedding file {path} cannot be read safely (torch.load weights_only: {first[:160]}); "
            "convert it to .safetensors with a tool you trust."
        ) from None
    if not isinstance(data, dict):
        raise UserError(f"embedding file {path} holds a {type(data).__name__}, not a dict of tensors.")
    return data, {}


def read_embedding(path: str | Path) -> EmbeddingFile:
    """Read an A1111 (.safetensors `emb_params` / .pt `string_to_param`) or diffusers embedding file.

    Returns vectors (n, D) float32. Raises UserError for a missing or unsafe file, an SDXL embedding
    (clip_l + clip_g) or a file without exactly one embedding tensor."""
    path = Path(path).expanduser()
    data, metadata = _read_raw(path)
    if "string_to_param" in data:  # AUTOMATIC1111 .pt: {'*': (n, D)}
        params = data["string_to_param"]
        tensors = [v for v in params.values() if isinstance(v, Tensor)] if isinstance(params, dict) else []
        if len(tensors) != 1:
            raise UserError(f"embedding file {path}: string_to_param holds {len(tensors)} tensors, not 1.")
        vectors, fmt, name = tensors[0], "a1111-pt", None
        metadata = {k: str(v) for k, v in data.items() if isinstance(v, (str, int, float))}
    elif A1111_KEY in data:
        vectors, fmt, name = data[A1111_KEY], "a1111-safetensors", None
    elif "clip_l" in data or "clip_g" in data:
        raise UserError(
            f"embedding file {path} is an SDXL embedding (clip_l + clip_g); this program's models are SD "
            "1.x/2.x and LDM: use an embedding trained for the base you sample with."
        )
    else:
        tensors = {k: v for k, v in data.items() if isinstance(v, Tensor)}
        if len(tensors) != 1:
            found = sorted(tensors)[:4]
            raise UserError(
                f"embedding file {path} holds no embedding tensor (expected emb_params, string_to_param or "
                f"one {{token: vectors}} entry; found tensors {found})."
            )
        name, vectors = next(iter(tensors.items()))
        fmt = "diffusers"
    vectors = vectors.detach().float()
    if vectors.ndim == 1:
        vectors = vectors.unsqueeze(0)
    if vectors.ndim != 2 or vectors.shape[0] < 1:
        raise UserError(f"embedding file {path}: the embedding has shape {tuple(vectors.shape)}, not (n, D).")
    return EmbeddingFile(vectors.contiguous(), name, fmt, metadata)


def save_embedding(
    path: str | Path,
    vectors: Tensor,
    name: str,
    init_word: str | None = None,
    step: int | None = None,
    base_model: str | None = None,
) -> Path:
    """Write an AUTOMATIC1111 / ComfyUI embedding atomically: `{"emb_params": (n, D) float32}` + metadata
    (name, init_word, step, sd_checkpoint_name = the base model's file name, num_vectors). Returns `path`."""
    from safetensors.torch import save_file

    from ldm.interop.checkpoint import atomic_path

    vectors = vectors.detach().float().cpu().contiguous()
    metadata = {"name": str(name), "num_vectors": str(int(vectors.shape[0])), "format": "pt"}
    if init_word is not None:
        metadata["init_word"] = str(init_word)
    if step is not None:
        metadata["step"] = str(int(step))
    if base_model is not None:
        metadata["sd_checkpoint_name"] = Path(str(base_model)).name
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file({A1111_KEY: vectors}, tmp, metadata=metadata)
    return path


def save_diffusers_embedding(path: str | Path, embeddings: dict[str, Tensor]) -> Path:
    """diffusers' `learned_embeds.safetensors`: {token: (n, D) float32} (`load_textual_inversion`)."""
    from safetensors.torch import save_file

    from ldm.interop.checkpoint import atomic_path

    tensors = {k: v.detach().float().cpu().contiguous() for k, v in embeddings.items()}
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata={"format": "pt"})
    return path


def split_spec(spec: str | Path) -> tuple[Path, str | None]:
    """'file' or 'file:name' -> (path, name or None); a path that exists as written is never split."""
    text = str(spec)
    path = Path(text).expanduser()
    if path.exists() or ":" not in text:
        return path, None
    left, name = text.rsplit(":", 1)
    if not name or "/" in name or "\\" in name:
        return path, None
    return Path(left).expanduser(), name


def text_encoders(model: Any) -> list[Any]:
    """The FrozenTextEncoders of a LatentDiffusion's conditioner (UserError when it has none)."""
    from ldm.conditioning.text import FrozenTextEncoder

    conditioners = getattr(getattr(model, "conditioner", None), "conditioners", {}) or {}
    found = [c for c in conditioners.values() if isinstance(c, FrozenTextEncoder)]
    if not found:
        kinds = [type(c).__name__ for c in conditioners.values()] or ["no conditioner"]
        raise UserError(
            f"embeddings: this model has no pretrained text encoder ({', '.join(kinds)}); textual-inversion "
            "embeddings are words of a CLIP/BERT prompt (SD 1.x/2.x, text-to-image models)."
        )
    return found


def load_embeddings(model: Any, paths: Iterable[str | Path]) -> list[str]:
    """Add each file's embedding to `model`'s text encoder(s); returns the names (trigger words) added.

    `paths`: files, each optionally `file:name`. The name is `name`, else the token a diffusers file
    stores, else the file's stem (A1111's convention: the trigger word is the file name). Raises
    UserError (naming the file) for a missing/unreadable file, no embedding tensor, a width other than
    the encoder's (with the base the file is probably for), a name already in the vocabulary or already
    loaded, or a model without a text encoder."""
    encoders = text_encoders(model)
    added = []
    for spec in paths:
        path, name = split_spec(spec)
        emb = read_embedding(path)
        name = name or emb.name or path.stem
        for encoder in encoders:
            owner, attribute = _embeddings_owner(encoder)
            width, got = int(getattr(owner, attribute).weight.shape[1]), int(emb.vectors.shape[1])
            if got != width:
                raise UserError(
                    f"embedding file {path} has {got}-wide vectors (probably for "
                    f"{BASE_FOR_WIDTH.get(got, 'another base model')}), but this model's text encoder is "
                    f"{width} wide (as {BASE_FOR_WIDTH.get(width, 'no released base')}): use an embedding "
                    "trained for this base model."
                )
            try:
                add_embedding(encoder, name, emb.vectors)
            except UserError as e:
                raise UserError(f"embedding file {path}: {e}") from None
        added.append(name)
    return added
