"""Textual inversion (Gal et al. 2023, "An Image is Worth One Word"; `experiment=textual_inversion`).

    python train.py experiment=textual_inversion base_model=<file> [base_config=<yaml>] \
        [text_encoder=<CLIP tokenizer>] data=custom 'data.train_shards=...' ti.token='<my-thing>' \
        ti.init_word=dog [ti.num_vectors=1] [ti.templates=style] [ti.use_captions=false]

The base model loads exactly as for `experiment=finetune`; then every weight is frozen — UNet, first stage,
text encoder, and the base vocabulary's embedding rows — and the text encoder learns one new word:
`ti.num_vectors` rows of its token embedding (`ldm.adapters.embeddings.ExtendedEmbedding.extra`), started
from the token embedding(s) of `ti.init_word`. Captions come from `ti.templates` ("object": the paper's /
diffusers' "a photo of a {}" list; "style": "a painting in the style of {}"; or your own list with `{}`),
one drawn per sample from the step's seed (a resumed run draws the same); with `ti.use_captions=true` the
shards' own captions are used and each must contain the token. The null context ("") stays the base's.

Learning rate: 5e-3, AUTOMATIC1111's default embedding learning rate and the paper's base rate, used as
is (no scaling by batch size or GPUs; diffusers' example reaches 2e-3 through `--scale_lr`). No EMA by
default. Checkpoints hold only the new rows (+ optimizer state); at the end the run folder gets
`<token>.safetensors` (AUTOMATIC1111 / ComfyUI: `emb_params`) and `learned_embeds.safetensors` (diffusers).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ldm.adapters import embeddings as E
from ldm.conditioning.text import FrozenTextEncoder
from ldm.errors import UserError
from ldm.training.adapter_module import AdapterModule
from ldm.training.finetune import TEXT_KEY, base_record, check_data_keys, load_base

log = logging.getLogger(__name__)
DIFFUSERS_FILE = "learned_embeds.safetensors"  # what diffusers' textual_inversion.py writes
# diffusers' examples/textual_inversion (imagenet_templates_small / imagenet_style_templates_small), which
# follow the paper's code (rinongal/textual_inversion, ldm/data/personalized.py).
TEMPLATES: dict[str, tuple[str, ...]] = {
    "object": (
        "a photo of a {}",
        "a rendering of a {}",
        "a cropped photo of the {}",
        "the photo of a {}",
        "a photo of a clean {}",
        "a photo of a dirty {}",
        "a dark photo of the {}",
        "a photo of my {}",
        "a photo of the cool {}",
        "a close-up photo of a {}",
        "a bright photo of the {}",
        "a cropped photo of a {}",
        "a photo of the {}",
        "a good photo of the {}",
        "a photo of one {}",
        "a close-up photo of the {}",
        "a rendition of the {}",
        "a photo of the clean {}",
        "a rendition of a {}",
        "a photo of a nice {}",
        "a good photo of a {}",
        "a photo of the nice {}",
        "a photo of the small {}",
        "a photo of the weird {}",
        "a photo of the large {}",
        "a photo of a cool {}",
        "a photo of a small {}",
    ),
    "style": (
        "a painting in the style of {}",
        "a rendering in the style of {}",
        "a cropped painting in the style of {}",
        "the painting in the style of {}",
        "a clean painting in the style of {}",
        "a dirty painting in the style of {}",
        "a dark painting in the style of {}",
        "a picture in the style of {}",
        "a cool painting in the style of {}",
        "a close-up painting in the style of {}",
        "a bright painting in the style of {}",
        "a cropped painting in the style of {}",
        "a good painting in the style of {}",
        "a close-up painting in the style of {}",
        "a rendition in the style of {}",
        "a nice painting in the style of {}",
        "a small painting in the style of {}",
        "a weird painting in the style of {}",
        "a large painting in the style of {}",
    ),
}


class TextualInversionEncoder(FrozenTextEncoder):
    """A FrozenTextEncoder whose prompts encode with gradients (to the new embedding rows only; every
    weight stays frozen). The null context is the cached base encoding of "" (no new token in it)."""

    def encode_prompts(self, prompts: list[str]) -> Tensor:
        """Prompts -> (B, max_length, D), differentiable w.r.t. the extra token rows."""
        return FrozenTextEncoder.encode_prompts.__wrapped__(self, prompts)


def resolve_templates(templates: str | Sequence[str]) -> tuple[str, ...]:
    """`ti.templates`: 'object' | 'style' | a list of captions each holding one `{}` (the token's place)."""
    if isinstance(templates, str):
        if templates in TEMPLATES:
            return TEMPLATES[templates]
        templates = [templates]
    out = tuple(str(t) for t in templates or ())
    bad = [t for t in out if t.count("{}") != 1]
    if not out or bad:
        raise UserError(
            f"ti.templates={bad[0] if bad else list(out)!r}: choose object or style, or give captions that "
            "each hold one {} where the token goes, e.g. 'ti.templates=[\"a photo of {}\"]'."
        )
    return out


def check_ti(ti: Mapping[str, Any]) -> dict[str, Any]:
    """The `ti` options checked and completed: token, init_word, num_vectors, templates, use_captions."""
    ti = {"num_vectors": 1, "templates": "object", "use_captions": False, **dict(ti)}
    token = ti.get("token")
    if not isinstance(token, str) or not token.strip() or any(c.isspace() for c in token):
        raise UserError(
            f"ti.token={token!r}: pass the new word to learn, one word without spaces, e.g. "
            "\"ti.token='<my-thing>'\"."
        )
    if not isinstance(ti.get("init_word"), str) or not ti["init_word"].strip():
        raise UserError(
            f"ti.init_word={ti.get('init_word')!r}: pass a word close to the concept to start from, e.g. "
            "ti.init_word=dog (the paper's coarse descriptor)."
        )
    n = ti["num_vectors"]
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise UserError(f"ti.num_vectors={n!r}: a whole number >= 1 (vectors per token; 1..8 is usual).")
    unknown = sorted(set(ti) - {"token", "init_word", "num_vectors", "templates", "use_captions"})
    if unknown:
        raise UserError(
            f"ti.{unknown[0]}: unknown option; ti takes token, init_word, num_vectors, "
            "templates, use_captions."
        )
    ti["use_captions"] = bool(ti["use_captions"])
    resolve_templates(ti["templates"])
    return ti


def file_stem(token: str) -> str:
    """'<my-thing>' -> 'my-thing': the A1111 file name (its stem is the trigger word there)."""
    stem = re.sub(r"[^\w.-]+", "_", token.strip("<>")).strip("._")
    return stem or "embedding"


class TextualInversionModule(AdapterModule):
    """Trains the new token rows only; captions from templates; exports A1111 + diffusers embeddings."""

    ti: dict[str, Any]
    templates: tuple[str, ...]

    def adapter_summary(self) -> dict[str, Any]:
        return dict(self.ti)

    def text_encoders(self) -> list[FrozenTextEncoder]:
        return [self.model.conditioner.conditioners[n] for n in self.ti["text_conditioners"]]

    def param_groups(self) -> list[dict[str, Any]]:
        """One group: the new rows of each text encoder (everything else is frozen)."""
        params = [E.install_embedding(c).extra for c in self.text_encoders()]
        return [{"params": params, "name": "embeddings"}]

    def setup(self, stage: str) -> None:
        """Before any work: data keys the base reads (captions only with ti.use_captions), no caption_emb."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer else None
        options = getattr(datamodule, "options", None)
        if options is None:
            return
        keys = tuple(getattr(options, "keys", None) or ())
        if "caption_emb" in keys:
            raise UserError(
                "experiment=textual_inversion: data.keys holds caption_emb (text states cached by the frozen "
                "encoder, without the new token): drop caption_emb from data.keys; cached latents "
                "(data.latents=true) are fine."
            )
        needed = tuple(k for k in self.model.input_keys if k != TEXT_KEY or self.ti["use_captions"])
        if self.ti["use_captions"] and TEXT_KEY not in keys:
            raise UserError(
                "ti.use_captions=true but data.keys has no caption: add it ('data.keys=[image,caption]'), or "
                "drop ti.use_captions to caption with ti.templates."
            )
        check_data_keys(needed, options, datamodule.task, self.base["path"])

    def captions(self, batch: Mapping[str, Any], generator: torch.Generator) -> list[str]:
        """This batch's captions: a template per sample (drawn from the step's seed) with the token, or the
        shard captions (ti.use_captions), each checked to hold the token."""
        n = _batch_len(batch)
        token = self.ti["token"]
        if self.ti["use_captions"]:
            captions = list(batch.get(TEXT_KEY) or [])
            for i, caption in enumerate(captions):
                if token.lower() not in str(caption).lower():
                    key = batch.get("key")
                    where = f" (sample {key[i]})" if isinstance(key, (list, tuple)) else ""
                    raise UserError(
                        f"ti.use_captions=true, but the caption {str(caption)[:80]!r}{where} does not hold "
                        f"the token {token}: write {token} into every caption, or drop ti.use_captions."
                    )
            return captions
        draw = torch.Generator().manual_seed(generator.initial_seed() ^ 0x7E3A)
        index = torch.randint(len(self.templates), (n,), generator=draw).tolist()
        return [self.templates[i].format(token) for i in index]

    def _step(self, batch: dict[str, Any], train: bool, generator: torch.Generator) -> tuple[Tensor, dict]:
        batch[TEXT_KEY] = self.captions(batch, generator)  # in place: previews see the captions used
        return super()._step(batch, train, generator)

    def vectors(self) -> dict[str, Tensor]:
        """{text conditioner name: (num_vectors, D) float32 copy}, EMA weights when EMA is on."""

        def read() -> dict[str, Tensor]:
            return {
                n: E.embedding_vectors(c, self.ti["token"]).detach().float().cpu().clone()
                for n, c in zip(self.ti["text_conditioners"], self.text_encoders())
            }

        if self.ema is not None:
            with self.ema.swapped_in(self.model):
                return read()
        return read()

    def export_adapter(self, folder: Path, run_config: dict | None) -> list[Path]:
        """`<token>.safetensors` (A1111 `emb_params` + metadata) and `learned_embeds.safetensors`
        (diffusers `{token: (n, D)}`) in `folder`, rank zero; returns their paths."""
        vectors = next(iter(self.vectors().values()))
        if self._trainer is not None and not self.trainer.is_global_zero:
            return []
        folder = Path(folder)
        token = self.ti["token"]
        step = int(self.trainer.global_step) if self._trainer is not None else None
        a1111 = E.save_embedding(
            folder / f"{file_stem(token)}.safetensors",
            vectors,
            name=token,
            init_word=self.ti["init_word"],
            step=step,
            base_model=self.base["path"],
        )
        return [a1111, E.save_diffusers_embedding(folder / DIFFUSERS_FILE, {token: vectors})]


def add_token_to_model(model: Any, text: Sequence[str], ti: Mapping[str, Any]) -> dict[str, Any]:
    """Freeze `model` and add the trainable word `ti.token` (from `ti.init_word`) to its text encoders
    `text`; returns the summary recorded with the run. UserError when there is no text encoder."""
    encoders = {n: model.conditioner.conditioners[n] for n in text}
    encoders = {n: c for n, c in encoders.items() if isinstance(c, FrozenTextEncoder)}
    if not encoders:
        raise UserError(
            "experiment=textual_inversion learns a word of the prompts, but this base model has no "
            f"pretrained text encoder (it reads {list(model.input_keys)}); use a text-to-image base "
            "(SD 1.x/2.x)."
        )
    model.requires_grad_(False)
    vocab = 0
    for c in encoders.values():
        E.init_embedding(c, ti["token"], ti["init_word"], int(ti["num_vectors"]), trainable=True)
        c.__class__ = TextualInversionEncoder
        vocab = E.install_embedding(c).first_id
    return {
        "kind": "textual_inversion",
        "token": ti["token"],
        "init_word": ti["init_word"],
        "num_vectors": int(ti["num_vectors"]),
        "templates": ti["templates"] if isinstance(ti["templates"], str) else list(ti["templates"]),
        "use_captions": bool(ti["use_captions"]),
        "text_conditioners": list(encoders),
        "base_vocabulary": int(vocab),
        "trainable_parameters": int(sum(p.numel() for p in model.parameters() if p.requires_grad)),
    }


def ti_module_from_base(
    base_model: str | None,
    optim: Mapping[str, Any],
    ti: Mapping[str, Any],  # token init_word num_vectors templates use_captions
    base_config: str | None = None,
    text_encoder: str | None = None,
    use_ema: bool = True,
    gradient_checkpointing: bool = False,
    cond_dropout: float | None = 0.0,
    resolution: int | None = None,
    sampler: Callable[..., Tensor] | None = None,
    **options: Any,  # LatentDiffusionModule: ema_decay, ema_warmup, preview_steps, preview_cfg_scale
) -> TextualInversionModule:
    """The textual-inversion training module for `base_model` (see the module docstring).

    Raises UserError for bad `ti` options (token, init_word, num_vectors, templates), a token already in
    the vocabulary, an init word without tokens, or a base model without a text encoder."""
    ti = check_ti(ti)
    loaded, model, text = load_base(
        base_model,
        base_config,
        text_encoder,
        use_ema,
        gradient_checkpointing=gradient_checkpointing,
        cond_dropout=cond_dropout,
        resolution=resolution,
    )
    try:
        summary = add_token_to_model(model, text, ti)
    except UserError as e:
        raise UserError(f"ti.token={ti['token']}, ti.init_word={ti['init_word']}: {e}") from None
    module = TextualInversionModule.from_model(model, optim=optim, sampler=sampler, **options)
    module.base = base_record(loaded, base_model, base_config, text_encoder)
    module.ti = summary
    module.templates = resolve_templates(ti["templates"])
    log.info(
        "textual inversion: %s (%d vector%s, from '%s') on %s; %d trainable parameters",
        summary["token"],
        summary["num_vectors"],
        "" if summary["num_vectors"] == 1 else "s",
        summary["init_word"],
        Path(str(base_model)).name,
        summary["trainable_parameters"],
    )
    return module


def _batch_len(batch: Mapping[str, Any]) -> int:
    for v in batch.values():
        if isinstance(v, (Tensor, list, tuple)):
            return len(v)
    return 1
