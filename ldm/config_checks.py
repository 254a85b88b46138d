"""Checks of a composed train.py / sample.py config, run before anything heavy is built.

The checks are declarative: `TRAIN_CHECKS` and `SAMPLE_CHECKS` list one `Check` per config key, each a
small rule given that key's value and the whole config (for combinations). A rule returns None when the
value is fine, or what is wrong and how to fix it; `run_checks` raises the first problem as one
`UserError` line, `<key>=<value>: <problem>`. A new option gets checked by adding a row here. Keys a config
does not have (another experiment, stage 1 vs stage 2) are skipped. Only omegaconf is imported, so a
mistake fails in a second, before torch or Lightning load.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ldm.errors import UserError
from ldm.training import dreambooth  # its rules import only omegaconf (and PIL's suffix list when they run)

Rule = Callable[[str, Any, DictConfig], "str | None"]  # (key, value, whole config) -> problem or None
_ABSENT = object()

# What Lightning's Trainer(precision=...) accepts (lightning_fabric.plugins.precision.precision).
TRAINER_PRECISIONS = (
    "32-true", "32", 32, "16-mixed", "16", 16, "bf16-mixed", "bf16", "16-true", "bf16-true",
    "64-true", "64", 64, "transformer-engine", "transformer-engine-float16",
)  # fmt: skip
SAMPLE_PRECISIONS = ("fp32", "bf16", "fp16")  # ldm.sampling.runner.PRECISIONS
PARAMETERIZATIONS = ("eps", "v", "x0")
# ldm.training.speed.COMPILE_MODES / COMPILE_BACKENDS (that module imports torch; this one must not)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")
# Task transforms that read data.keys "image": cached latents (data.latents=true) carry no image to give them.
IMAGE_TASKS = (
    "ldm.data.masks.InpaintingMask",
    "ldm.data.masks.OutpaintingMask",
    "ldm.data.degradations.SuperResolution",
)
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"  # the repository's Hydra configs
DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


@dataclass(frozen=True)
class Check:
    """One rule about one config key (dotted path); the rule sees the whole config for combinations."""

    key: str
    rule: Rule
    show: Callable[[Any], str] | None = None  # how the value is quoted in the message (default: as given)

    def problem(self, cfg: DictConfig) -> str | None:
        value = _select(cfg, self.key)
        if value is _ABSENT:
            return None
        problem = self.rule(self.key, value, cfg)
        if problem is None:
            return None
        return f"{self.key}={(self.show or _show)(value)}: {problem}"


def run_checks(cfg: DictConfig, checks: Iterable[Check]) -> None:
    """Raise the first problem any check finds as one UserError line."""
    for check in checks:
        problem = check.problem(cfg)
        if problem is not None:
            raise UserError(problem)


def check_train_config(cfg: DictConfig) -> None:
    """Every train.py mistake the config alone shows (sizes, types, combinations, paths), as a UserError."""
    run_checks(cfg, TRAIN_CHECKS)


def check_sample_config(cfg: DictConfig) -> None:
    """Every sample.py mistake the config alone shows, before the model loads, as a UserError."""
    from ldm.sample_checks import SAMPLE_CHECKS  # sample.py's rows, built from the rules below

    run_checks(cfg, SAMPLE_CHECKS)


# --- reading values ---------------------------------------------------------------------------------------


def _select(cfg: DictConfig, key: str) -> Any:
    """The resolved value at `key` as plain Python; _ABSENT when missing, `???` or not resolvable here."""
    try:
        value = OmegaConf.select(cfg, key, default=_ABSENT, throw_on_missing=False)
        if isinstance(value, (DictConfig, ListConfig)):
            return OmegaConf.to_container(value, resolve=True)
    except OmegaConfBaseException:  # e.g. ${hydra:...} outside a Hydra run: not ours to judge
        return _ABSENT
    return value


def _get(cfg: DictConfig, key: str, default: Any = None) -> Any:
    value = _select(cfg, key)
    return default if value is _ABSENT else value


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, dict) and "_target_" in value:
        return str(value["_target_"])
    return str(value)


def _is_whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# --- rule builders ----------------------------------------------------------------------------------------


def whole(
    minimum: int | None = None,
    what: str = "",
    example: Any = None,
    allow: Sequence[int] = (),
    nullable: bool = False,
) -> Rule:
    """A whole number >= minimum (or one of `allow`, or null when nullable)."""

    def rule(key: str, value: Any, cfg: DictConfig) -> str | None:
        if (value is None and nullable) or (_is_whole(value) and value in allow):
            return None
        if _is_whole(value) and (minimum is None or value >= minimum):
            return None
        bound = "a whole number" if minimum is None else f"a whole number >= {minimum}"
        extra = "".join(f" or {a}" for a in allow) + (" or null" if nullable else "")
        return f"must be {bound}{extra}{f' ({what})' if what else ''}; e.g. {key}={example}."

    return rule


def number(
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    what: str = "",
    example: Any = None,
    nullable: bool = False,
) -> Rule:
    """A finite number in [low, high] (each end optionally open), or null when nullable."""

    def rule(key: str, value: Any, cfg: DictConfig) -> str | None:
        if value is None and nullable:
            return None
        ok = _is_number(value)
        if ok and low is not None:
            ok = value > low if low_open else value >= low
        if ok and high is not None:
            ok = value < high if high_open else value <= high
        if ok:
            return None
        lo = "" if low is None else ("(" if low_open else "[") + f"{low:g}"
        hi = "" if high is None else f"{high:g}" + (")" if high_open else "]")
        if low is not None and high is not None:
            bound = f"a number in {lo}, {hi}"
        elif low is not None:
            bound = f"a number {'>' if low_open else '>='} {low:g}"
        else:
            bound = "a number" if high is None else f"a number {'<' if high_open else '<='} {high:g}"
        null = " or null" if nullable else ""
        return f"must be {bound}{null}{f' ({what})' if what else ''}; e.g. {key}={example}."

    return rule


def one_of(choices: Sequence[Any], what: str = "") -> Rule:
    def rule(key: str, value: Any, cfg: DictConfig) -> str | None:
        if not isinstance(value, bool) and value in choices:
            return None
        shown = ", ".join(dict.fromkeys(str(c) for c in choices))
        return f"use one of {shown}{f' ({what})' if what else ''}."

    return rule


def boolean(key: str, value: Any, cfg: DictConfig) -> str | None:
    return None if isinstance(value, bool) else f"must be true or false; e.g. {key}=true."


def bool_or_auto(key: str, value: Any, cfg: DictConfig) -> str | None:
    ok = isinstance(value, bool) or value == "auto"
    return None if ok else f"must be true, false or auto (auto = on a CUDA GPU); e.g. {key}=auto."


DIFFUSERS_FOLDER = "model_index.json"  # a diffusers pipeline folder loads where a checkpoint file does
RUN_EXPORT = "model.safetensors"  # a train.py run folder loads as its export


def existing_file(
    what: str, required: str | None = None, folder_with: str | Sequence[str] | None = None
) -> Rule:
    """A path to an existing file (not a folder, unless it holds `folder_with`); null is fine unless
    `required` says how to set it."""

    def rule(key: str, value: Any, cfg: DictConfig) -> str | None:
        if value in (None, ""):
            return None if required is None else required
        path = Path(str(value)).expanduser()
        inside = (folder_with,) if isinstance(folder_with, str) else tuple(folder_with or ())
        if any((path / name).is_file() for name in inside):
            return None
        if path.is_dir():
            return f"is a folder; pass the {what} file inside it (e.g. {path / 'model.safetensors'})."
        if not path.is_file():
            return f"no such file (relative paths are from {Path.cwd()}); pass an existing {what} file."
        return None

    return rule


def writable_dir(key: str, value: Any, cfg: DictConfig) -> str | None:
    return None if value in (None, "") else dir_problem(str(value))


def dir_problem(path: str | os.PathLike) -> str | None:
    """Why `path` cannot become a writable folder (it or a parent is a file, read-only), or None."""
    path = Path(path).expanduser().absolute()
    if path.exists() and not path.is_dir():
        return "is an existing file, not a folder; pass a folder path (new or existing)."
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        return f"{parent} is a file, not a folder; pass a path outside it."
    try:  # what access() cannot tell (root on a read-only mount, /proc): try it
        os.rmdir(tempfile.mkdtemp(prefix=".ldm-write-check-", dir=parent))
    except OSError as e:
        why = e.strerror or type(e).__name__
        return f"cannot create it in {parent} ({why}); pass a folder you can write to."
    return None


# --- combination rules: train.py --------------------------------------------------------------------------


def _ch_mult_factor(config: Any) -> int | None:
    """f = 2^(len(ch_mult) - 1) of an autoencoder config (a stage-1 model, or the model of a run config)."""
    if not isinstance(config, dict):
        return None
    for candidate in (config.get("autoencoder"), config.get("first_stage"), config):
        ddconfig = candidate.get("ddconfig") if isinstance(candidate, dict) else None
        if isinstance(ddconfig, dict) and isinstance(ddconfig.get("ch_mult"), list) and ddconfig["ch_mult"]:
            return 2 ** (len(ddconfig["ch_mult"]) - 1)
    return None


def _safetensors_config(path: Path) -> dict | None:
    """The run config in a safetensors header (read without torch), or None."""
    try:
        with path.open("rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > 100_000_000:
                return None
            header = json.loads(f.read(size))
        return json.loads(header.get("__metadata__", {}).get("config", "null"))
    except (OSError, ValueError, struct.error, AttributeError):
        return None


def gpu_present(key: str, value: Any) -> str | None:
    """trainer=gpu / ddp / fsdp (accelerator gpu or cuda) on a machine torch sees no CUDA device on."""
    if str(value) not in ("gpu", "cuda"):
        return None
    import torch  # only for this check: the others run without it

    if torch.cuda.is_available():
        return None
    return (
        "but torch sees no CUDA device here (torch "
        f"{torch.__version__}); use trainer=cpu (or trainer=ddp_cpu for 2 CPU processes), or install a CUDA "
        "build of torch on a GPU machine (README: `make install TORCH=...`)."
    )


def autoencoder_file(value: Any) -> str | None:
    """A stage-2 export given where an autoencoder goes is named as what it is (read from its header)."""
    path = Path(str(value)).expanduser() if value else None
    config = _safetensors_config(path) if path and path.suffix == ".safetensors" and path.is_file() else None
    if isinstance(config, dict) and isinstance(config.get("first_stage_autoencoder"), dict):
        from ldm.kinds import stage2_as_first_stage

        return stage2_as_first_stage(config)
    return None


def _first_stage_factor(cfg: DictConfig) -> tuple[int, str] | None:
    """(f, where it comes from) of the autoencoder this run trains or uses; None when not known cheaply."""
    factor = _ch_mult_factor(_get(cfg, "model"))
    if factor is not None:
        return factor, "model.autoencoder.ddconfig.ch_mult"
    if _get(cfg, "model.first_stage._target_") is None:
        return None
    path = _get(cfg, "model.first_stage.path") or _get(cfg, "first_stage_ckpt")
    if not path:
        path = Path(os.environ.get("LDM_ROOT", ".")) / "outputs/autoencoder_kl/latest/model.safetensors"
    path = Path(str(path)).expanduser()
    if path.suffix != ".safetensors" or not path.is_file():
        return None
    config = _safetensors_config(path)
    factor = _ch_mult_factor((config or {}).get("model"))
    return None if factor is None else (factor, f"the first stage {path}")


def resolution(key: str, value: Any, cfg: DictConfig) -> str | None:
    """A positive whole number of pixels, a multiple of the autoencoder's downsampling factor f."""
    if not _is_whole(value) or value < 1:
        return f"must be a positive whole number of pixels; e.g. {key}=64."
    if _get(cfg, "data.latents") is True:  # the cached latents fix the size
        return None
    found = _first_stage_factor(cfg)
    if found is not None and value % found[0]:
        f, where = found
        return (
            f"must be a multiple of the autoencoder's downsampling factor f={f} ({where}); "
            f"e.g. {key}={max(f, value // f * f)}."
        )
    superres = _get(cfg, "data.task._target_") == "ldm.data.degradations.SuperResolution"
    scale = _get(cfg, "data.task.scale") if superres else None
    if _is_whole(scale) and scale > 0 and value % scale:
        example = max(scale, value // scale * scale)
        return (
            f"must be divisible by the super-resolution scale data.task.scale={scale}; e.g. {key}={example}."
        )
    return None


def bucket_step(key: str, value: Any, cfg: DictConfig) -> str | None:
    """Bucket sides (px) step by a multiple of f x the UNet's downsampling: every bucket's latent fits it."""
    if not _is_whole(value) or value < 1:
        return f"must be a positive whole number of pixels; e.g. {key}=64."
    if _get(cfg, "data.latents") is True:  # the cached latents' shapes are fixed already
        return None
    found, mult = _first_stage_factor(cfg), _get(cfg, "model.unet.channel_mult")
    f, unet = (found[0] if found else 1), 2 ** (len(mult) - 1) if isinstance(mult, Sequence) and mult else 1
    need = f * unet
    if value % need:
        return (
            f"must be a multiple of {need} (the autoencoder's f={f} x the UNet's {unet}x downsampling), "
            f"or some buckets give latents the UNet cannot halve; e.g. {key}={max(1, value // need) * need}."
        )
    return None


def _latents_cannot(option: str, fix: str) -> Rule:
    """Augmentations a latent cache cannot honour: the images were encoded once, centre-cropped, unflipped."""

    def rule(key: str, value: Any, cfg: DictConfig) -> str | None:
        if _get(cfg, "data.latents") is not True:
            return None
        return f"cached latents (data.latents=true) {option}; {fix}"

    return rule


def flip_with_latents(key: str, value: Any, cfg: DictConfig) -> str | None:
    if value is True:
        return _latents_cannot(
            "cannot be mirrored exactly", "set data.flip=false, or train on images (data=shapes)."
        )(key, value, cfg)
    return None if isinstance(value, bool) else boolean(key, value, cfg)


def crop_with_latents(key: str, value: Any, cfg: DictConfig) -> str | None:
    if value not in ("random", "center"):
        return f"use random or center; e.g. {key}=center."
    if value == "random":
        return _latents_cannot(
            "hold one centre crop per image", "set data.crop=center, or train on images (data=shapes)."
        )(key, value, cfg)
    return None


def task_with_latents(key: str, value: Any, cfg: DictConfig) -> str | None:
    tasks = value if isinstance(value, list) else [value]
    for task in tasks:
        target = task.get("_target_") if isinstance(task, dict) else None
        if target in IMAGE_TASKS:
            return _latents_cannot(
                f"hold no image for {target.rsplit('.', 1)[-1]} to transform",
                "train this experiment on images (data=shapes or data=custom without data.latents).",
            )(key, target, cfg)
    return None


def parameterization(key: str, value: Any, cfg: DictConfig) -> str | None:
    if value not in PARAMETERIZATIONS:
        return one_of(PARAMETERIZATIONS)(key, value, cfg)
    if value == "eps" and _get(cfg, "model.loss.schedule.zero_terminal_snr") is True:
        return (
            "with model.loss.schedule.zero_terminal_snr=true the last step is pure noise, where predicting "
            "the noise says nothing about the image and sampling diverges; use model.loss.parameterization=v "
            "(or zero_terminal_snr=false, as for SD v1 weights)."
        )
    return None


def max_steps(key: str, value: Any, cfg: DictConfig) -> str | None:
    return whole(1, "optimisation steps; -1 = no limit, stop by max_epochs", 1000, allow=(-1,))(
        key, value, cfg
    )


# Models built from base_model (experiment=finetune | lora | textual_inversion | dreambooth)
FINETUNE_TARGETS = (
    "ldm.training.finetune.module_from_base",
    "ldm.training.lora.lora_module_from_base",
    "ldm.training.textual_inversion.ti_module_from_base",
)
BNB_TARGETS = ("ldm.training.optim.adamw_8bit",)


def base_model(key: str, value: Any, cfg: DictConfig) -> str | None:
    """Fine-tunes, LoRA and textual inversion need an existing base file; elsewhere the key is unused."""
    if _get(cfg, "model._target_") not in FINETUNE_TARGETS:
        return None
    required = (
        f"experiment={_get(cfg, 'name') or 'finetune'} needs the model to start from: pass base_model=<file> "
        "(an original SD 1.x/2.x or LDM checkpoint, a diffusers folder, a train.py run or model.safetensors)."
    )
    return existing_file("base model", required, folder_with=(DIFFUSERS_FOLDER, RUN_EXPORT))(key, value, cfg)


def lora_targets(key: str, value: Any, cfg: DictConfig) -> str | None:
    from ldm.adapters.lora import TARGET_GROUPS

    if value is None:
        return None
    groups = list(value) if isinstance(value, (list, tuple, ListConfig)) else [value]
    bad = [g for g in groups if g not in TARGET_GROUPS]
    if bad or not groups:
        return (
            f"{bad[0] if bad else 'an empty list'} is not a target group; choose from {list(TARGET_GROUPS)}, "
            f"e.g. '{key}=[attn,ff]' (conv = LoCon: the ResBlock convolutions too)."
        )
    return None


def lora_text_encoder_lr(key: str, value: Any, cfg: DictConfig) -> str | None:
    if value is None:
        return None
    problem = number(0, low_open=True, what="the text encoder LoRA's learning rate", example=5e-5)(
        key, value, cfg
    )
    if problem is None and _get(cfg, "model.lora.text_encoder") is not True:
        return "no text-encoder LoRA: add model.lora.text_encoder=true, or drop model.lora.text_encoder_lr."
    return problem


def text_encoder_folder(key: str, value: Any, cfg: DictConfig) -> str | None:
    if value in (None, "") or Path(str(value)).expanduser().is_dir():
        return None
    return (
        "no such folder; pass the folder with the CLIP tokenizer files (vocab.json + merges.txt, or "
        "tokenizer.json)."
    )


def text_encoder_lr(key: str, value: Any, cfg: DictConfig) -> str | None:
    if value is None:
        return None
    problem = number(0, low_open=True, what="the text encoder's learning rate", example=1e-6)(key, value, cfg)
    if problem is None and _get(cfg, "model.train_text_encoder") is not True:
        return "the text encoder is frozen; add model.train_text_encoder=true, or drop model.text_encoder_lr."
    return problem


def optimizer_device(key: str, value: Any, cfg: DictConfig) -> str | None:
    """8-bit AdamW (bitsandbytes) needs CUDA: refuse it on a CPU trainer before any work."""
    if value in BNB_TARGETS and _get(cfg, "trainer.accelerator") == "cpu":
        return (
            "bitsandbytes' 8-bit AdamW runs on CUDA GPUs only and this run trains on the CPU "
            "(trainer.accelerator=cpu); use optim=adamw, or trainer=gpu on a CUDA machine."
        )
    return None


TI_TARGET = "ldm.training.textual_inversion.ti_module_from_base"
FEATURES = ("inception", "inception-random", "tiny")  # ldm.evaluate feature networks


def ti_option(key: str, value: Any, cfg: DictConfig) -> str | None:
    """experiment=textual_inversion: `ti.<option>` as ldm.training.textual_inversion.check_ti sees it."""
    if _get(cfg, "model._target_") != TI_TARGET:
        return None
    from ldm.training.textual_inversion import check_ti

    try:
        check_ti(_get(cfg, "ti") or {})
    except UserError as e:
        head, _, rest = str(e).partition(": ")
        return rest if head.startswith(f"{key}=") else None
    return None


TRAIN_CHECKS: list[Check] = [
    Check("seed", whole(None, "seeds Python, numpy, torch and the data stream", 0)),
    Check("paths.output_dir", writable_dir),
    Check("first_stage_ckpt", existing_file("stage-1 autoencoder (model.safetensors or .ckpt)")),
    Check("first_stage_ckpt", lambda key, value, cfg: autoencoder_file(value)),
    Check("model.init_from", existing_file("stage-2 model (model.safetensors or .ckpt)")),
    # fine-tuning (experiment=finetune)
    Check("base_model", base_model),
    Check("base_config", existing_file("original inference yaml of base_model")),
    Check("text_encoder", text_encoder_folder),
    Check("model.train_text_encoder", boolean),
    Check("model.gradient_checkpointing", boolean),
    Check("model.text_encoder_lr", text_encoder_lr),
    Check("model.optim.optimizer._target_", optimizer_device),
    Check("model.lora.rank", whole(1, "adapter rank", 16)),
    Check("model.lora.alpha", number(0, low_open=True, what="null = rank", example=16, nullable=True)),
    Check("model.lora.dropout", number(0, 1, high_open=True, what="adapter input dropout", example=0.1)),
    Check("model.lora.targets", lora_targets),
    Check("model.lora.conv_rank", whole(1, "3x3 convolution rank; null = lora.rank", 8, nullable=True)),
    Check("model.lora.text_encoder", boolean),
    Check("model.lora.text_encoder_lr", lora_text_encoder_lr),
    Check("ti.token", ti_option),
    Check("ti.init_word", ti_option),
    Check("ti.num_vectors", ti_option),
    Check("ti.templates", ti_option),
    Check("validation.prompt_file", existing_file("text file of validation prompts, one a line")),
    Check("validation.every_n_steps", whole(0, "0 = no validation images", 250)),
    # DreamBooth: instance folder, prompts, class images; base_model has a text encoder
    *(Check(key, rule) for key, rule in dreambooth.RULES),
    # data: the loader, then what the pipeline can do
    Check("data.batch_size", whole(1, "samples per step on each device", 16)),
    Check("data.val_batch_size", whole(1, "null = data.batch_size", 16, nullable=True)),
    Check("data.num_workers", whole(0, "loader processes per device; 0 = load in the main process", 2)),
    Check("data.shuffle_buffer", whole(0, "samples shuffled in memory per worker; 0 = off", 1000)),
    Check("data.epoch_length", whole(1, "samples per rank per epoch; null = one pass", 10000, nullable=True)),
    Check("data.timeout", number(0, low_open=True, what="seconds per batch", example=300)),
    Check("data.prefetch_factor", whole(1, "batches each loader worker prepares ahead", 2)),
    Check("data.persistent_workers", boolean),
    Check("data.uint8_transfer", bool_or_auto),
    Check("data.pin_memory", bool_or_auto),
    Check("data.num_classes", whole(2, "segmap classes including background", 6, nullable=True)),
    Check("data.resolution", resolution),
    Check("data.latents", boolean),
    Check("data.flip", flip_with_latents),
    Check("data.crop", crop_with_latents),
    Check("data.task", task_with_latents),
    Check("data.buckets.enabled", boolean),
    Check("data.buckets.step", bucket_step),
    Check(
        "data.buckets.max_area", whole(1, "px^2 of a bucket; null = data.resolution^2", 65536, nullable=True)
    ),
    Check("data.buckets.min_side", whole(1, "px; null = data.buckets.step", 128, nullable=True)),
    Check(
        "data.buckets.max_side", whole(1, "px; null = bounded by max_area and max_ratio", 512, nullable=True)
    ),
    Check("data.buckets.max_ratio", number(1, what="longest over shortest bucket side", example=2.0)),
    # trainer
    Check("trainer.max_steps", max_steps),
    Check("trainer.precision", one_of(TRAINER_PRECISIONS, "bf16-mixed on Ampere+ GPUs")),
    Check("trainer.accelerator", lambda key, value, cfg: gpu_present(key, value)),
    Check("trainer.accumulate_grad_batches", whole(1, "batches per optimiser step", 1)),
    Check("trainer.log_every_n_steps", whole(1, "", 10)),
    Check("trainer.limit_val_batches", number(0, what="batches, or a fraction <= 1.0", example=4)),
    Check("trainer.gradient_clip_val", number(0, what="null = no clipping", example=1.0, nullable=True)),
    # model (stage 1: learning_rate; stage 2: optim, loss, EMA)
    Check("model.learning_rate", number(0, low_open=True, example=4.5e-4)),
    Check("model.optim.lr", number(0, low_open=True, example=1e-4)),
    Check("model.optim.warmup_steps", whole(0, "", 50)),
    Check("model.ema_decay", number(0, 1, high_open=True, what="0 = no EMA", example=0.999)),
    Check("model.loss.parameterization", parameterization),
    Check("model.loss.schedule.zero_terminal_snr", boolean),
    Check("model.preview_steps", whole(1, "sampler steps of the preview grids", 25)),
    # speed switches (ldm/training/speed.py), stage 1 and stage 2
    Check("model.compile", boolean),
    Check("model.compile_mode", one_of(COMPILE_MODES, "torch.compile modes")),
    Check("model.compile_backend", one_of(COMPILE_BACKENDS, "torch.compile backends")),
    Check("model.channels_last", boolean),
    # AdamW's fused kernel (ldm.training.optim.adamw): null = wherever torch has one, true = demanded
    *(
        Check(key, lambda key, value, cfg: None if value is None else boolean(key, value, cfg))
        for key in ("model.optim.fused", "model.optim.optimizer.fused")
    ),
    Check("callbacks.image_logger.every_n_steps", whole(0, "0 = no sample grids", 250)),
    Check("callbacks.sample_metrics.every_n_steps", whole(0, "0 = off", 250)),
    Check("callbacks.sample_metrics.num_images", whole(2, "FID/KID need at least 2", 16)),
    Check("callbacks.sample_metrics.features", one_of(FEATURES, "FID/KID features")),
    Check("callbacks.sample_metrics.feature_extractor_weights_path", existing_file("Inception weights")),
    Check("callbacks.metrics_csv.flush_every_n_steps", whole(1, "logged steps between rewrites", 50)),
    # the end-of-run export in the original CompVis/Stability layout (callbacks.ExportSafetensors)
    Check("callbacks.export.original", boolean),
    Check("callbacks.export.original_dtype", one_of(("fp32", "fp16", "bf16"), "the original export's")),
    Check("callbacks.export.original_ema_only", boolean),
    Check(
        "callbacks.periodic_checkpoint.every_n_train_steps",
        whole(0, "0 = only last.ckpt", 500, nullable=True),
    ),
]
