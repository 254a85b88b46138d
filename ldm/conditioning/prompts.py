"""Prompt syntax at sampling time: emphasis weights and prompts longer than the text encoder's window.

Emphasis (AUTOMATIC1111's `parse_prompt_attention`, the syntax most Stable Diffusion users write):

    (word:1.3)   weight 1.3         (word)   weight 1.1         [word]   weight 1/1.1
    ((word))     1.1 * 1.1 = 1.21   nesting multiplies          \\( \\) \\[ \\]   literal brackets
    BREAK        start a new window here (long prompts)

An unclosed bracket applies to the rest of the prompt; a stray closing bracket is kept as text.
The weights scale the encoder's output states of those tokens, then the window's states are rescaled so
their mean is the unweighted mean again (A1111's `process_tokens`; done per prompt and per window here,
so that an image does not depend on what else is in its batch).

Long prompts (A1111 / kohya-ss chunking): the tokens (no start/end token) are cut into windows of
`max_length - 2` (75 for CLIP's 77), each window becomes [start] tokens [end] [pad]... and is encoded on
its own; the windows' states are concatenated along the token axis -> (B, windows * max_length, D). The
first window of a prompt that fits is exactly the ordinary encoding of that prompt. Padding windows are
encodings of "", so a prompt padded to more windows, the negative prompt and the null context all have
the same token count, as classifier-free guidance needs (it batches cond and uncond together).
Training never goes through here: captions keep the single 77-token window they were trained with.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

log = logging.getLogger(__name__)
ROUND_WEIGHT = 1.1  # (word)
SQUARE_WEIGHT = 1 / 1.1  # [word]
BREAK = "BREAK"

_TOKENS = re.compile(
    r"""
    \\\(|\\\)|\\\[|\\\]|\\\\|\\|   # escapes: \( \) \[ \] \\ and a lone backslash
    \(|\[|                        # openers
    :\s*([+-]?(?:\d+\.?\d*|\.\d+))\s*\)|   # ':1.3)' closes a round bracket with an explicit weight
    \)|\]|                        # closers
    [^\\()\[\]:]+|                # plain text
    :                             # a colon that is not a weight
    """,
    re.VERBOSE,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*")
SYNTAX_CHARS = re.compile(r"[()\[\]]|\bBREAK\b")


def has_syntax(text: str) -> bool:
    """Whether `text` uses emphasis brackets or BREAK (what a plain-text encoder would read literally)."""
    return bool(SYNTAX_CHARS.search(text))


def parse_weights(text: str) -> list[tuple[str, float]]:
    """A prompt -> [(text, weight), ...], neighbours of equal weight merged; "" -> [("", 1.0)].

    `(a:1.3)` multiplies by 1.3, `(a)` by 1.1, `[a]` by 1/1.1, nested brackets multiply, `\\(` is a
    literal parenthesis; `BREAK` (upper case, a word of its own) becomes the item (BREAK, -1.0), which
    `tokenize_windows` turns into a window boundary. A1111's parser, with the same results on its
    documented examples, e.g. 'a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).' ->
    [('a ', 1.0), ('house', 1.573), (' ', 1.1), ('on', 1.0), (' a ', 1.1), ('hill', 0.55),
    (', sun, ', 1.1), ('sky', 1.4641), ('.', 1.1)] (weights rounded here)."""
    out: list[list[Any]] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply(start: int, factor: float) -> None:
        for item in out[start:]:
            if item[1] >= 0:
                item[1] *= factor

    for m in _TOKENS.finditer(text):
        piece, weight = m.group(0), m.group(1)
        if piece.startswith("\\"):
            out.append([piece[1:] if len(piece) > 1 else piece, 1.0])
        elif piece == "(":
            round_open.append(len(out))
        elif piece == "[":
            square_open.append(len(out))
        elif weight is not None and round_open:
            multiply(round_open.pop(), float(weight))
        elif piece == ")" and round_open:
            multiply(round_open.pop(), ROUND_WEIGHT)
        elif piece == "]" and square_open:
            multiply(square_open.pop(), SQUARE_WEIGHT)
        else:  # text, a stray closer, a ':' or a ':1.3)' without an open bracket
            for i, part in enumerate(_BREAK.split(piece)):
                if i > 0:
                    out.append([BREAK, -1.0])
                out.append([part, 1.0])
    for start in round_open:
        multiply(start, ROUND_WEIGHT)
    for start in square_open:
        multiply(start, SQUARE_WEIGHT)
    merged: list[list[Any]] = []
    for item in out:
        if item[0] == "" and item[1] >= 0:
            continue
        if merged and merged[-1][1] == item[1] and item[1] >= 0:
            merged[-1][0] += item[0]
        else:
            merged.append(item)
    return [(t, float(w)) for t, w in merged] or [("", 1.0)]


@dataclass
class TokenWindows:
    """One prompt as windows: ids (W, L) int64, weights (W, L) float32 (1 on special tokens), mask (W, L).

    `cut` holds the tokens dropped when `max_windows` was reached (0 when none)."""

    ids: Tensor
    weights: Tensor
    mask: Tensor
    cut: int = 0
    n_tokens: int = 0

    @property
    def windows(self) -> int:
        return int(self.ids.shape[0])

    @property
    def weighted(self) -> bool:
        return bool((self.weights != 1).any())


@dataclass
class SpecialTokens:
    """Start, end and padding ids of a tokenizer (CLIP: BOS, EOS, EOS or 0; BERT: CLS, SEP, PAD)."""

    start: int
    end: int
    pad: int

    @classmethod
    def of(cls, tokenizer: Any) -> SpecialTokens:
        """Read from how the tokenizer encodes "" with special tokens ([start, end]) and its pad token."""
        ids = list(tokenizer("", add_special_tokens=True)["input_ids"])
        if len(ids) != 2:
            raise ValueError(f"tokenizer encodes '' as {ids}, not [start, end]")
        pad = tokenizer.pad_token_id
        return cls(int(ids[0]), int(ids[1]), int(ids[1] if pad is None else pad))


def piece_tokens(tokenizer: Any, pieces: Sequence[tuple[str, float]]) -> list[tuple[list[int], float]]:
    """Token ids (no start/end token) of each parsed piece, in one tokenizer call; BREAK stays (-1)."""
    texts = [t for t, w in pieces if w >= 0]
    ids = []
    if texts:
        ids = tokenizer(texts, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
    out, it = [], iter(ids)
    for _, weight in pieces:
        out.append(([], -1.0) if weight < 0 else (list(next(it)), weight))
    return out


def tokenize_windows(
    tokenizer: Any,
    prompt: str,
    max_length: int,
    special: SpecialTokens,
    max_windows: int | None = None,
    weighting: bool = True,
) -> TokenWindows:
    """A prompt -> its token windows (see the module docstring); `max_windows` cuts what does not fit.

    With `weighting=False` the prompt is tokenized as plain text (brackets are characters). A prompt of
    at most max_length - 2 tokens without weights gives exactly `tokenizer(prompt, padding="max_length",
    truncation=True, max_length=max_length)` in its one window."""
    room = max_length - 2
    pieces = parse_weights(prompt) if weighting else [(prompt, 1.0)]
    chunks: list[list[tuple[int, float]]] = [[]]
    for ids, weight in piece_tokens(tokenizer, pieces):
        if weight < 0:  # BREAK: the next tokens start a new window (an empty one is never made)
            if chunks[-1]:
                chunks.append([])
            continue
        for token in ids:
            if len(chunks[-1]) == room:
                chunks.append([])
            chunks[-1].append((int(token), weight))
    if len(chunks) > 1 and not chunks[-1]:
        chunks.pop()
    n_tokens = sum(len(c) for c in chunks)
    cut = 0
    if max_windows is not None and len(chunks) > max_windows:
        cut = sum(len(c) for c in chunks[max_windows:])
        chunks = chunks[:max_windows]
    ids = torch.full((len(chunks), max_length), special.pad, dtype=torch.long)
    weights = torch.ones(len(chunks), max_length)
    mask = torch.zeros(len(chunks), max_length, dtype=torch.long)
    for w, chunk in enumerate(chunks):
        n = len(chunk)
        ids[w, 0] = special.start
        ids[w, n + 1] = special.end
        mask[w, : n + 2] = 1
        if n:
            ids[w, 1 : n + 1] = torch.tensor([t for t, _ in chunk])
            weights[w, 1 : n + 1] = torch.tensor([x for _, x in chunk], dtype=torch.float32)
    return TokenWindows(ids, weights, mask, cut, n_tokens)


def apply_weights(states: Tensor, weights: Tensor) -> Tensor:
    """Emphasis: states (W, L, D) * weights (W, L, 1), then each window rescaled to its original mean.

    A1111's method (`process_tokens`: z *= multipliers; z *= old_mean / new_mean), here per window of one
    prompt. Windows whose weights are all 1 are returned exactly as they were. The mean is not restored
    when either mean is ~0 (|mean| < 1e-2 mean |z|, e.g. after a final LayerNorm without bias) or the
    sign changes: the ratio would then blow up, zero or flip every state."""
    out = states.clone()
    for w in range(states.shape[0]):
        if bool((weights[w] == 1).all()):
            continue
        z = states[w].float()
        original = z.mean()
        scaled = z * weights[w].to(z.device, z.dtype)[:, None]
        new = scaled.mean()
        tiny = 1e-2 * z.abs().mean()
        if original.abs() > tiny and new.abs() > tiny and original * new > 0:
            scaled = scaled * (original / new)
        out[w] = scaled.to(states.dtype)
    return out


def warn_plain_prompts(encoder: Any, prompts: Sequence[str], where: str) -> None:
    """Warn for each prompt a text encoder without windows or emphasis (the LDM paper's BERT, trained
    with a fixed `max_length`) would cut, or whose brackets / BREAK it would read as plain text."""
    tokenizer, room = getattr(encoder, "tokenizer", None), int(getattr(encoder, "max_length", 77)) - 2
    for p in prompts:
        n = len(tokenizer(p, add_special_tokens=False)["input_ids"]) if tokenizer is not None else 0
        if n > room:
            log.warning("prompt %r is %d tokens, but %s takes %d: the rest is cut", p[:80], n, where, room)
        if has_syntax(p):
            log.warning("prompt %r: %s reads emphasis brackets and BREAK as plain text", p[:80], where)


def job_windows(
    conditioner: Any, prompts: Iterable[str], asked: Mapping[str, Any], where: str
) -> dict[str, int]:
    """{`<input_key>_windows`: K} for each text encoder of `conditioner` reading 'caption' that takes
    windows: K = the most any of `prompts` (a sampling job's prompts and its negative prompt) needs, or
    asked[key] if larger. Put in a job's shared inputs, every batch, its negative prompt and its null
    context then have the same token count (guidance batches them) and no image depends on its batch.
    Other text encoders (the LDM paper's BERT) get `warn_plain_prompts` instead."""
    prompts = sorted(set(prompts))
    out: dict[str, int] = {}
    for c in conditioner.conditioners.values():
        if "caption" not in c.input_keys:
            continue
        if hasattr(c, "count_windows"):  # FrozenTextEncoder: windows (CLIP), or it warns when cutting
            out[c.windows_key] = max(int(asked.get(c.windows_key, 1)), c.count_windows(prompts))
        else:
            warn_plain_prompts(c, prompts, f"{where}'s text encoder ({type(c).__name__})")
    return out
