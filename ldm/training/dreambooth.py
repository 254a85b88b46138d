"""DreamBooth (Ruiz et al. 2023, "DreamBooth: Fine Tuning Text-to-Image Diffusion Models for Subject-Driven
Generation") as a train.py experiment: the config rules checked before any work, and the validation prompts.

    python train.py experiment=dreambooth base_model=<file> [base_config=<yaml>] [text_encoder=<tokenizer>] \
        dreambooth.instance_dir=<folder of 3-20 photos> dreambooth.instance_prompt="a photo of sks dog" \
        dreambooth.class_prompt="a photo of a dog" [dreambooth.num_class_images=100] \
        [dreambooth.prior_loss_weight=1.0] [dreambooth.class_dir=<folder>]

DreamBooth lives on the data side (`ldm.data.dreambooth.DreamBoothDataModule`, conf/data/dreambooth.yaml):
the training module is whatever `model=` builds (`finetune`: full fine-tuning; `lora` once it exists), so no
module is subclassed. The data module writes the instance photos as shards captioned with the instance prompt,
generates the class ("prior") images with the base model before the first update, and hands out batches of
`data.batch_size` instance + `data.batch_size` class samples whose `loss_weight` gives diffusers'
`loss + prior_loss_weight * prior_loss` (see `ldm.data.dreambooth.pair_batches`).

The class ("prior") images come from `generate_class_images` here (a sampling loop over the plain model,
no Lightning). This module imports only the standard library and omegaconf at import time (torch, PIL and
webdataset inside the functions that need them): `ldm.config_checks` runs the rules below before
Hydra makes the run folder, so a mistake leaves nothing behind. Each rule is `(key, value, cfg) -> problem or
None`, the `ldm.config_checks.Check` contract; `check_dreambooth_config` runs them all.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import math
import os
import struct
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ldm.errors import UserError

log = logging.getLogger(__name__)
Rule = Callable[[str, Any, DictConfig], "str | None"]

# Keys of a base file's text encoder: original SD 1.x CLIP / SD 2.x OpenCLIP / LDM BERT, and ours (export).
TEXT_PREFIXES = ("cond_stage_model.transformer.", "cond_stage_model.model.")
OUR_TEXT_MARKERS = ("token_embedding", "token_emb", "text_model", ".transformer.")
NEEDS_PROMPTS = (
    "DreamBooth teaches a text identifier (dreambooth.instance_prompt), so it needs a text-conditioned base "
    "(SD 1.x/2.x, LDM text-to-image)"
)


def _get(cfg: DictConfig, key: str, default: Any = None) -> Any:
    """The resolved value at `key` (plain Python), or `default` when missing / unresolvable here."""
    try:
        value = OmegaConf.select(cfg, key, default=default, throw_on_missing=False)
        if OmegaConf.is_config(value):
            return OmegaConf.to_container(value, resolve=True)
    except OmegaConfBaseException:  # e.g. ${oc.env:...} outside a train.py run: not ours to judge
        return default
    return default if value == "???" else value


def is_dreambooth(cfg: DictConfig) -> bool:
    """The config has a `dreambooth` section (experiment=dreambooth)."""
    return OmegaConf.is_config(cfg) and OmegaConf.select(cfg, "dreambooth", default=None) is not None


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def prior_enabled(cfg: DictConfig) -> bool:
    """Prior preservation is on: dreambooth.prior_loss_weight > 0 and dreambooth.num_class_images > 0."""
    weight, count = (
        _get(cfg, "dreambooth.prior_loss_weight", 1.0),
        _get(cfg, "dreambooth.num_class_images", 0),
    )
    return _number(weight) and weight > 0 and _whole(count) and count > 0


def image_files(folder: Path) -> list[Path]:
    """The images `ldm.data.make_shards.list_folder` reads under `folder` (recursive, by suffix, sorted)."""
    from ldm.data.make_shards import IMAGE_SUFFIXES

    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def instance_dir_problem(value: Any) -> str | None:
    """Why `value` is not a usable folder of instance photos (missing, a file, no images), or None."""
    from ldm.data.make_shards import IMAGE_SUFFIXES

    reads = ", ".join(sorted(IMAGE_SUFFIXES))
    if value in (None, ""):
        return (
            "is not set: pass the folder with 3-20 photos of your subject, e.g. "
            f"dreambooth.instance_dir=/data/my_dog (reads {reads})."
        )
    path = Path(str(value)).expanduser()
    if not path.exists():
        return f"no such folder (relative paths are from {Path.cwd()}); pass the folder with your photos."
    if not path.is_dir():
        return f"is a file, not a folder; pass the folder that holds your 3-20 photos (reads {reads})."
    found = image_files(path)
    if not found:
        return f"found 0 images in it (reads {reads}, recursively); put 3-20 photos of the subject in it."
    return None


def instance_dir(key: str, value: Any, cfg: DictConfig) -> str | None:
    return instance_dir_problem(value)


def instance_prompt(key: str, value: Any, cfg: DictConfig) -> str | None:
    if isinstance(value, str) and value.strip():
        return None
    return (
        "is not set: pass the prompt with a rare identifier and the class noun, e.g. "
        f'{key}="a photo of sks dog" (every instance photo is captioned with it).'
    )


def class_prompt(key: str, value: Any, cfg: DictConfig) -> str | None:
    if value not in (None, "") and not isinstance(value, str):
        return f'must be a text prompt; e.g. {key}="a photo of a dog".'
    if (value is None or not value.strip()) and prior_enabled(cfg):
        weight = _get(cfg, "dreambooth.prior_loss_weight")
        return (
            f"prior preservation is on (dreambooth.prior_loss_weight={weight}) and needs the class prompt "
            f'for the generated class images: pass {key}="a photo of a dog", or '
            "dreambooth.prior_loss_weight=0 (no class images)."
        )
    return None


def whole_at_least(minimum: int, what: str, example: Any) -> Rule:
    def rule(key: str, value: Any, cfg: DictConfig) -> str | None:
        if _whole(value) and value >= minimum:
            return None
        return f"must be a whole number >= {minimum} ({what}); e.g. {key}={example}."

    return rule


def non_negative(what: str, example: Any, nullable: bool = False) -> Rule:
    def rule(key: str, value: Any, cfg: DictConfig) -> str | None:
        if (value is None and nullable) or (_number(value) and value >= 0):
            return None
        return f"must be a number >= 0{' or null' if nullable else ''} ({what}); e.g. {key}={example}."

    return rule


def class_dir(key: str, value: Any, cfg: DictConfig) -> str | None:
    """null (a cache folder) or a folder path that is not a file."""
    if value in (None, ""):
        return None
    path = Path(str(value)).expanduser()
    if path.exists() and not path.is_dir():
        return "is a file, not a folder; pass a folder for the generated class images (new or ours)."
    return None


def _safetensors_header(path: Path) -> dict | None:
    try:
        with path.open("rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > 100_000_000:
                return None
            return json.loads(f.read(size))
    except (OSError, ValueError, struct.error):
        return None


def base_text_problem(path: Any) -> str | None:
    """From a base file's key names alone (safetensors header, diffusers folder): why it has no text
    encoder, or None (also when it cannot tell cheaply, e.g. a .ckpt: the loaded model is checked later)."""
    if path in (None, ""):
        return None
    path = Path(str(path)).expanduser()
    if (path / "model_index.json").is_file():
        if (path / "text_encoder").is_dir():
            return None
        return f"this diffusers folder has no text_encoder/. {NEEDS_PROMPTS}."
    if path.suffix != ".safetensors" or not path.is_file():
        return None
    header = _safetensors_header(path)
    if header is None:
        return None
    keys = [k for k in header if k != "__metadata__"]
    if any(k.startswith(TEXT_PREFIXES) for k in keys):
        return None
    cond = [k for k in keys if k.startswith(("cond_stage_model.", "conditioner."))]
    if any(m in k for k in cond for m in OUR_TEXT_MARKERS if k.startswith("conditioner.")):
        return None
    unet = any(k.startswith(("model.diffusion_model.", "unet.")) for k in keys)
    if not unet:
        return None  # not a diffusion model at all: the loader names what it is
    what = "a class-conditional" if cond or any("label_emb" in k for k in keys) else "an unconditional"
    return f"is {what} model without a text encoder. {NEEDS_PROMPTS}."


def base_model(key: str, value: Any, cfg: DictConfig) -> str | None:
    """experiment=dreambooth only: the base file must have a text encoder (other experiments: skipped)."""
    return base_text_problem(value) if is_dreambooth(cfg) else None


# (key, rule) rows for ldm.config_checks.TRAIN_CHECKS; keys a config lacks (other experiments) are skipped.
RULES: list[tuple[str, Rule]] = [
    ("dreambooth.instance_dir", instance_dir),
    ("dreambooth.instance_prompt", instance_prompt),
    (
        "dreambooth.num_class_images",
        whole_at_least(0, "generated class images; 0 = no prior preservation", 100),
    ),
    ("dreambooth.prior_loss_weight", non_negative("weight of the class images' loss; 0 = off", 1.0)),
    ("dreambooth.class_prompt", class_prompt),
    ("dreambooth.class_dir", class_dir),
    ("dreambooth.class_steps", whole_at_least(1, "sampler steps per class image", 50)),
    ("dreambooth.class_batch_size", whole_at_least(1, "class images generated at once", 4)),
    ("dreambooth.class_cfg_scale", non_negative("guidance scale; null = model.preview_cfg_scale", 7.5, True)),
    ("base_model", base_model),
]


def _shown(value: Any) -> str:
    return "null" if value is None else str(value)


def check_dreambooth_config(cfg: DictConfig) -> None:
    """Raise the first DreamBooth mistake the config shows as one UserError line `<key>=<value>: <problem>`.

    No-op for configs without a `dreambooth` section (other experiments)."""
    if not is_dreambooth(cfg):
        return
    for key, rule in RULES:
        value = _get(cfg, key, default=_ABSENT)
        if value is _ABSENT:
            continue
        problem = rule(key, value, cfg)
        if problem is not None:
            raise UserError(f"{key}={_shown(value)}: {problem}")


_ABSENT = object()


def validation_images(prompts: Sequence[Any] | None = None, **options: Any):
    """`ldm.training.validation.ValidationImages` for the prompts that are set (a null class prompt is
    dropped), so `validation.prompts: [instance_prompt, class_prompt]` works without prior preservation."""
    from ldm.training.validation import ValidationImages

    kept = [p for p in (prompts or []) if p is not None and str(p).strip()]
    return ValidationImages(prompts=kept, **options)


# --- cache folders ----------------------------------------------------------------------------------------

MANIFEST = "manifest.json"
CLASS_KIND = "dreambooth-class-images"
INSTANCE_KIND = "dreambooth-instance-images"
# What must match for cached class images to be reused (or topped up); anything else regenerates them.
CLASS_SETTINGS = ("base_identity", "prompt", "resolution", "sampler", "steps", "cfg_scale")


def cache_key(*parts: Any) -> str:
    """16 hex digits of sha256 over the parts (their str), naming cache folders."""
    h = hashlib.sha256()
    for p in parts:
        h.update(str(p).encode())
        h.update(b"\x00")
    return h.hexdigest()[:16]


def read_manifest(folder: Path) -> dict | None:
    """`folder/manifest.json`, or None when missing or unreadable."""
    try:
        return json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def write_json(path: Path, data: dict) -> None:
    """JSON written atomically (`ldm.interop.checkpoint.atomic_path`)."""
    from ldm.interop.checkpoint import atomic_path

    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(data, indent=1) + "\n")


def write_shard(path: Path, sample: dict) -> None:
    """One sample as a tar shard, written atomically (a kill leaves no half shard under its name)."""
    import webdataset as wds

    from ldm.interop.checkpoint import atomic_path

    with atomic_path(path) as tmp, wds.TarWriter(str(tmp), mtime=0) as sink:
        sink.write(sample)


# --- class images -------------------------------------------------------------------------------------


def model_identity(model: Any) -> str:
    """A short sha256 of the weights that make the images (LoRA adapters, zero at the start, left out and
    peft's `base_layer` names folded back), so full and LoRA fine-tunes of one base share class images."""
    from ldm.models.first_stage import state_identity

    state = {k.replace(".base_layer.", "."): v for k, v in model.state_dict().items() if "lora_" not in k}
    return state_identity(state)


def require_prompts(model: Any, base: str | None) -> None:
    """UserError unless the plain model reads a `caption` (DreamBooth needs prompts)."""
    if "caption" not in tuple(model.input_keys):
        raise UserError(
            f"base_model={base or 'the base model'} reads {list(model.input_keys)}, no prompt. "
            f"{NEEDS_PROMPTS}."
        )


def sampler_name(sampler: Callable[..., Any]) -> str:
    """`sample_ddim(eta=0.0)`: the function and its bound options, for the manifest."""
    fn = getattr(sampler, "func", sampler)
    kw = getattr(sampler, "keywords", {}) or {}
    options = ", ".join(f"{k}={v}" for k, v in sorted(kw.items()))
    return f"{getattr(fn, '__name__', type(fn).__name__)}({options})"


def class_folder(cache_dir: str | os.PathLike, identity: str, prompt: str, resolution: int) -> Path:
    """The default class-image folder: `<cache_dir>/class-<key of base identity, prompt, resolution>`."""
    return Path(cache_dir).expanduser() / f"class-{cache_key(CLASS_KIND, identity, prompt, int(resolution))}"


def _png(image: Any) -> bytes:
    """(3,H,W) in [-1,1] -> PNG bytes (lossless, deterministic)."""
    from PIL import Image

    from ldm.training.images import to_uint8

    buf = io.BytesIO()
    Image.fromarray(to_uint8(image)).save(buf, format="PNG")
    return buf.getvalue()


def generate_class_images(
    model: Any,
    out_dir: str | os.PathLike,
    prompt: str,
    count: int,
    *,
    resolution: int,
    sampler: Callable[..., Any] | None = None,
    steps: int = 50,
    cfg_scale: float = 7.5,
    batch_size: int = 4,
    device: Any = None,
    base: str | None = None,
) -> dict:
    """`count` images of `prompt` from `model` (a plain `LatentDiffusion`) as shards in `out_dir`; returns
    the manifest.

    Image i: seed i, `steps` steps of `sampler` (default DDIM, eta 0) with `model.default_spacing`, guidance
    `cfg_scale`, `resolution` px square, stored as `class-%06d.tar` = {png, txt: prompt, json: seed}. Reuses a
    manifest whose `CLASS_SETTINGS` match (topping it up to `count` with the next seeds), regenerates one
    that does not (its shards removed). The manifest is rewritten after each batch, so an interrupted run
    keeps what it made. `base`: the file the model came from (recorded). UserError for a model without a
    text encoder, or a folder holding files but no manifest of ours (never mixed with foreign images)."""
    import torch

    from ldm.samplers import sample_ddim
    from ldm.samplers.sigmas import StepSchedule

    require_prompts(model, base)
    sampler = sampler or functools.partial(sample_ddim, eta=0.0)
    out = Path(out_dir).expanduser()
    settings = dict(
        base_identity=model_identity(model),
        prompt=prompt,
        resolution=int(resolution),
        sampler=sampler_name(sampler),
        steps=int(steps),
        cfg_scale=float(cfg_scale),
    )
    manifest = read_manifest(out)
    if manifest is not None and manifest.get("kind") == CLASS_KIND:
        differ = [k for k in CLASS_SETTINGS if manifest.get(k) != settings[k]]
        if differ:
            log.warning(
                "dreambooth: class images in %s were made with other settings (%s); regenerating all of them",
                out,
                ", ".join(f"{k}: {manifest.get(k)!r} -> {settings[k]!r}" for k in differ),
            )
            for path in [*out.glob("class-*.tar"), out / MANIFEST]:
                path.unlink(missing_ok=True)
            manifest = None
    elif out.is_dir() and any(out.iterdir()):
        raise UserError(
            f"dreambooth.class_dir={out} holds files but no class-image manifest of ours; pass a new or "
            "empty folder (or dreambooth.class_dir=null for the cache), so generated images are never mixed."
        )
    have = int(manifest["count"]) if manifest else 0
    if manifest is None:
        manifest = dict(
            kind=CLASS_KIND,
            **settings,
            base=base,
            count=0,
            seeds=[],
            shards=[],
            total=0,
            keys=["json", "png", "txt"],
        )
    if have >= count:
        log.info("dreambooth: reusing %d cached class images in %s (%d needed)", have, out, count)
        return manifest
    out.mkdir(parents=True, exist_ok=True)
    net = model.unet
    device = torch.device(device) if device is not None else next(net.parameters()).device
    schedule = StepSchedule(steps=int(steps), spacing=model.default_spacing)
    f = model.first_stage.downsample_factor
    latent = (int(resolution) // f, int(resolution) // f)
    log.info(
        "dreambooth: generating %d class images of %r in %s (%d cached)", count - have, prompt, out, have
    )
    modes = {m: m.training for m in model.modules()}
    start = time.monotonic()
    model.eval()
    try:
        for first in range(have, count, batch_size):
            seeds = list(range(first, min(first + batch_size, count)))
            images = model.sample(
                {"caption": [prompt] * len(seeds)},
                seeds,
                float(cfg_scale),
                sampler=sampler,
                steps=schedule,
                latent_size=latent,
                device=device,
            )
            for seed, image in zip(seeds, images):
                meta = {"seed": seed, "caption": prompt}
                sample = {
                    "__key__": f"{seed:06d}",
                    "png": _png(image),
                    "txt": prompt,
                    "json": json.dumps(meta).encode(),
                }
                write_shard(out / f"class-{seed:06d}.tar", sample)
            manifest["shards"] += [{"name": f"class-{s:06d}.tar", "count": 1} for s in seeds]
            manifest["seeds"] += seeds
            manifest["count"] = manifest["total"] = len(manifest["seeds"])
            write_json(out / MANIFEST, manifest)
            done = seeds[-1] + 1 - have
            rate = (time.monotonic() - start) / done
            log.info(
                "dreambooth: class images %d/%d (%.2f s each, ~%.0f s left)",
                seeds[-1] + 1,
                count,
                rate,
                rate * (count - seeds[-1] - 1),
            )
    finally:
        for m, mode in modes.items():
            m.training = mode
    return manifest
    return manifest
