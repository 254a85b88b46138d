"""The sampling glue behind the web page: one `Pipeline` loaded once, a `Request` per click, no gradio here.

    session = Session.from_file("outputs/txt2img/latest/model.safetensors", out_dir="outputs/app")
    result = session.generate(Request(prompt="a red circle", n=4, steps=20, seed=0, height=64, width=64))
    result.files          # the PNGs sample.py would write (parameters in their text), then grid.png, run.json
    result.zip_path       # all of them in one zip: the page's download

Every click samples with `Pipeline.run`, so an image equals what `sample.py` / `Pipeline.txt2img` draw for the
same seed and settings. LoRA files are merged into the weights; a new list first restores the base weights of
the layers the previous list changed (merges never stack across clicks). Mistakes raise `UserError` with one
line, checked before any sampling (`Session.check`); the page shows it as an error toast.
"""

from __future__ import annotations

import functools
import math
import os
import threading
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ldm.errors import UserError
from ldm.interop.checkpoint import atomic_path
from ldm.pipeline import SAMPLERS, Pipeline, parse_lora_spec, refresh_null_contexts, sampler_function
from ldm.sampling import tasks as T
from ldm.sampling.records import RECORD_NAME

StepReport = Callable[[int, int], None]  # (steps done, steps in all) over every batch of a click
EDIT_TASKS = ("img2img", "inpaint", "outpaint", "superres")  # tasks that start from the uploaded image
MAX_SIDE = 4096  # pixels: a larger height/width is a typo, not a request (SD v1 is trained at 512)
MAX_IMAGES = 64  # per click (n x labels)

# Which inputs each task reads: the page shows only these (the prompt: only for models with text conditioning)
TASK_INPUTS: dict[str, tuple[str, ...]] = {
    "txt2img": ("prompt",),
    "img2img": ("prompt", "image", "strength"),
    "inpaint": ("prompt", "image", "mask"),
    "outpaint": ("prompt", "image", "pad"),
    "superres": ("prompt", "image"),
    "semantic": ("segmap",),
    "class": ("label",),
    "uncond": (),
}


@dataclass
class Request:
    """One click of Generate: the task, its inputs and the sampling settings (sample.py's names)."""

    task: str = "txt2img"
    prompt: str = ""
    negative_prompt: str = ""
    image: Image.Image | str | os.PathLike | None = None  # img2img/inpaint/outpaint input, superres low-res
    mask: Image.Image | str | os.PathLike | None = None  # inpaint: white = regenerate, black = keep
    segmap: str | os.PathLike | None = None  # semantic: a PNG of class ids (a file: its ids must stay exact)
    label: str | int | Sequence[int] = ""  # class: "3" or "0, 2, 4"
    pad: Sequence[int] = (0, 0, 0, 0)  # outpaint: pixels added as [left, top, right, bottom]
    strength: float = 0.75  # img2img: share of the schedule re-run from the image (0, 1]
    sampler: str = "ddim"  # a conf/sampler name (ldm.pipeline.SAMPLERS)
    steps: int = 20
    cfg_scale: float = 5.0
    seed: int = 0  # image i uses seed + i
    n: int = 1  # images per prompt / label
    height: int | None = None  # pixels; None or 0: the model's size (txt2img) or the image's (edits)
    width: int | None = None
    loras: str | Sequence[str | tuple[str, float]] = ""  # "a.safetensors:0.8" per line, or a list


@dataclass
class Generation:
    """What one click made: images with a caption each, the files written, and the run record."""

    images: list[Image.Image]
    captions: list[str]  # "seed 3 · ddim · 20 steps · cfg 5.0 — a red circle"
    files: list[Path]  # the images' PNGs (parameters in their text chunk), in order
    folder: Path  # out_dir of this click: PNGs, grid.png, run.json
    zip_path: Path  # the folder zipped (the page's download)
    record: dict[str, Any] = field(repr=False)  # run.json


def whole(value: Any, name: str, low: int, high: int | None = None, hint: str = "") -> int:
    """`value` as an int in [low, high] (floats from number boxes must be whole), else one UserError line."""
    try:
        number = float(value)
        ok = number.is_integer() and number >= low and (high is None or number <= high)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        bound = f"between {low} and {high}" if high is not None else f">= {low}"
        raise UserError(f"{name}={value!r}: must be a whole number {bound}{hint}.")
    return int(number)


def parse_labels(value: str | int | Sequence[int]) -> list[int]:
    """ "0, 2 4" / 3 / [0, 2] -> [0, 2, 4] / [3] / [0, 2]; UserError for anything else."""
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    parts = str(value).replace(",", " ").split() if isinstance(value, str) else list(value)
    try:
        labels = [int(p) for p in parts]
    except (TypeError, ValueError):
        raise UserError(f"label={value!r}: give class ids as whole numbers, e.g. 3 or 0, 2, 4.") from None
    if not labels:
        raise UserError("task=class needs a class id: type one (e.g. 3) or several (0, 2, 4) in 'Class ids'.")
    return labels


def parse_loras(value: str | Sequence[str | tuple[str, float]]) -> list[tuple[str, float]]:
    """LoRA lines "path[:scale]" (or a list of specs) -> [(absolute path, scale)]; files must exist."""
    specs = [s.strip() for s in value.splitlines() if s.strip()] if isinstance(value, str) else list(value)
    out = []
    for spec in specs:
        path, scale = parse_lora_spec(spec)
        file = Path(path).expanduser()
        if not file.is_file():
            raise UserError(
                f"LoRA {path}: no such file (one 'path.safetensors:scale' per line; from {Path.cwd()})."
            )
        if not math.isfinite(scale):
            raise UserError(f"LoRA {path}: scale {scale} is not a number (e.g. {path}:0.8).")
        out.append((str(file.resolve()), float(scale)))
    return out


def editor_image_and_mask(value: Any) -> tuple[Image.Image | None, Image.Image | None]:
    """An image-editor value {"background": RGBA, "layers": [RGBA, ...], ...} (gradio's ImageMask) ->
    (the uploaded image as RGB, the painted mask as L with 255 where any layer has paint; None if unpainted).

    A plain PIL image or path passes through as the image with no mask."""
    if value is None:
        return None, None
    if not isinstance(value, dict):
        image = Image.open(value) if isinstance(value, (str, os.PathLike)) else value
        return image.convert("RGB"), None
    background = value.get("background")
    if background is None:
        return None, None
    background = Image.open(background) if isinstance(background, (str, os.PathLike)) else background
    painted = np.zeros((background.height, background.width), dtype=bool)
    for layer in value.get("layers") or []:
        layer = Image.open(layer) if isinstance(layer, (str, os.PathLike)) else layer
        if layer.mode != "RGBA" or layer.size != background.size:  # strokes live in the alpha channel
            layer = layer.convert("RGBA").resize(background.size, Image.NEAREST)
        painted |= np.asarray(layer)[..., 3] > 0
    image = _flatten(background)
    mask = Image.fromarray((painted * 255).astype(np.uint8), mode="L") if painted.any() else None
    return image, mask


def _flatten(image: Image.Image) -> Image.Image:
    """RGB; transparent pixels over white (what the editor shows), opaque images unchanged."""
    if image.mode not in ("RGBA", "LA", "P"):
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def stepping_sampler(name: str, on_step: StepReport | None) -> Callable[..., torch.Tensor]:
    """The sampler `name` whose step callback also reports progress; recorded under its own name.

    Chains the runner's callback (inpainting's paste, the progress bar) and keeps what it returns."""
    if on_step is None or name not in SAMPLERS:
        return sampler_function(name)  # unknown names raise sampler_function's UserError
    base = SAMPLERS[name]

    @functools.wraps(base)  # describe_sampler -> {"function": "sample_ddim"}, as for the name
    def sampler(denoiser: Any, x: torch.Tensor, sigmas: torch.Tensor, *, callback=None, **kw: Any):
        steps = len(sigmas) - 1

        def counted(info: dict[str, Any]) -> torch.Tensor | None:
            out = callback(info) if callback is not None else None
            on_step(int(info["i"]) + 1, steps)
            return out

        return base(denoiser, x, sigmas, callback=counted, **kw)

    return sampler


class StepCounter:
    """Per-call step numbers (one sampler call per batch) -> (done, total) over the whole click."""

    def __init__(self, report: StepReport, calls: int) -> None:
        self.report, self.calls, self.finished = report, max(1, calls), 0
        self.done_before = 0

    def __call__(self, step: int, steps: int) -> None:
        done = self.done_before + step
        total = max(done, self.done_before + steps * (self.calls - self.finished))
        self.report(done, total)
        if step == steps:
            self.finished += 1
            self.done_before += steps


class Session:
    """A Pipeline loaded once and reused for every click; see the module docstring."""

    def __init__(
        self, pipe: Pipeline, out_dir: str | os.PathLike = "outputs/app", batch_size: int = 4
    ) -> None:
        self.pipe = pipe
        self.out_dir = Path(out_dir)
        self.batch_size = int(batch_size)
        self.lock = threading.Lock()  # one model: clicks run one after another
        self.loras: list[tuple[str, float, int]] = []  # merged now: (path, scale, file mtime_ns)
        self.base_weights: dict[str, torch.Tensor] = {}  # layer path -> its weight before any merge
        self.clicks = 0

    @classmethod
    def from_file(
        cls,
        path: str | os.PathLike,
        config: str | os.PathLike | None = None,
        text_encoder: str | None = None,
        device: str = "auto",
        out_dir: str | os.PathLike = "outputs/app",
        **pipeline_kw: Any,  # dtype, use_ema, compile: see Pipeline.from_file
    ) -> Session:
        """Load `path` (any checkpoint `Pipeline.from_file` reads) once for the page."""
        return cls(
            Pipeline.from_file(path, config=config, text_encoder=text_encoder, device=device, **pipeline_kw),
            out_dir,
        )

    # ---- what the page offers -----------------------------------------------------------------------

    @property
    def tasks(self) -> tuple[str, ...]:
        """The tasks of the loaded model (`Pipeline.tasks`)."""
        return self.pipe.tasks

    @property
    def samplers(self) -> tuple[str, ...]:
        """Sampler names: the keys of `ldm.pipeline.SAMPLERS`, i.e. conf/sampler/*.yaml."""
        return tuple(SAMPLERS)

    @property
    def factor(self) -> int:
        """Height and width must be multiples of this (the autoencoder's downsampling factor)."""
        return int(self.pipe.model.first_stage.downsample_factor)

    @property
    def default_size(self) -> tuple[int, int]:
        """(height, width) the model was trained at (txt2img's size when none is given)."""
        return T.Txt2Img().size(self.pipe.loaded, None, None)

    @property
    def has_text(self) -> bool:
        return "caption" in self.pipe.loaded.input_keys

    def inputs(self, task: str) -> tuple[str, ...]:
        """The inputs `task` reads on this model (the page shows these)."""
        return tuple(k for k in TASK_INPUTS.get(task, ()) if k != "prompt" or self.has_text)

    # ---- one click ------------------------------------------------------------------------------------

    def check(self, r: Request) -> dict[str, Any]:
        """Every mistake of `r` as one UserError line, before anything runs; returns the cleaned values."""
        if r.task not in self.tasks:
            raise UserError(f"task {r.task!r}: this model supports {', '.join(self.tasks)}.")
        if r.sampler not in SAMPLERS:
            raise UserError(f"sampler {r.sampler!r}: use one of {', '.join(SAMPLERS)}.")
        f = self.factor
        hint = f" (a multiple of {f}, the autoencoder's factor; 0 = automatic)"
        clean = {
            "steps": whole(r.steps, "steps", 1, 1000),
            "n": whole(r.n, "n", 1, MAX_IMAGES),
            "seed": whole(r.seed, "seed", 0, 2**63 - MAX_IMAGES),
            "height": whole(r.height or 0, "height", 0, MAX_SIDE, hint) or None,
            "width": whole(r.width or 0, "width", 0, MAX_SIDE, hint) or None,
        }
        for side in ("height", "width"):
            if clean[side] is not None and clean[side] % f:
                value = clean[side]
                raise UserError(
                    f"{side}={value}: must be a multiple of {f} (the autoencoder's factor), "
                    f"e.g. {side}={max(f, value - value % f)}."
                )
        try:
            clean["cfg_scale"] = float(r.cfg_scale)
        except (TypeError, ValueError):
            clean["cfg_scale"] = math.nan
        if not clean["cfg_scale"] >= 0 or not math.isfinite(clean["cfg_scale"]):
            raise UserError(f"cfg_scale={r.cfg_scale!r}: must be a number >= 0 (1 = no guidance).")
        needs = self.inputs(r.task)
        if r.task == "txt2img" and not str(r.prompt or "").strip():
            raise UserError("The prompt is empty: type what to draw (txt2img needs a prompt).")
        if "image" in needs and r.image is None:
            raise UserError(f"task={r.task} needs an input image: upload one in 'Image'.")
        if "mask" in needs and r.mask is None:
            raise UserError(
                "task=inpaint needs a mask: paint the area to regenerate on the image, or upload a mask."
            )
        if "segmap" in needs and not r.segmap:
            raise UserError("task=semantic needs a segmentation map: upload a PNG of class ids.")
        if "strength" in needs:
            strength = float(r.strength)
            if not 0.0 < strength <= 1.0:
                raise UserError(f"strength={r.strength}: must be in (0, 1] (1 = ignore the input image).")
            if strength * clean["steps"] < 1:
                raise UserError(
                    f"strength={strength} x steps={clean['steps']} runs no step: raise steps to "
                    f"{math.ceil(1 / strength)} or more, or raise strength."
                )
        clean["labels"] = parse_labels(r.label) if r.task == "class" else []
        if r.task == "outpaint":
            pad = [whole(p, "pad", 0, MAX_SIDE) for p in r.pad]
            if not any(pad):
                raise UserError("task=outpaint needs a border: set one of pad left/top/right/bottom above 0.")
            clean["pad"] = T.check_pad(pad)
        if clean["n"] * max(1, len(clean["labels"])) > MAX_IMAGES:
            raise UserError(
                f"n x class ids = {clean['n'] * len(clean['labels'])} images: at most {MAX_IMAGES} per click."
            )
        clean["loras"] = parse_loras(r.loras)
        return clean

    def generate(self, r: Request, on_step: StepReport | None = None) -> Generation:
        """Sample `r` with the one loaded Pipeline; `on_step(done, total)` after every sampler step.

        Writes <out_dir>/<time>_<click>/ (PNGs, grid.png, run.json) and its zip. Raises UserError (one line)
        for bad input before sampling."""
        clean = self.check(r)
        with self.lock:
            self.set_loras(clean["loras"])
            self.clicks += 1
            folder = self.out_dir / f"{time.strftime('%Y-%m-%d_%H-%M-%S')}_{self.clicks:04d}"
            images = clean["n"] * max(1, len(clean["labels"]))
            counter = StepCounter(on_step, math.ceil(images / self.batch_size)) if on_step else None
            kw = {
                "n": clean["n"],
                "seed": clean["seed"],
                "steps": clean["steps"],
                "sampler": stepping_sampler(r.sampler, counter),
                "cfg_scale": clean["cfg_scale"],
                "batch_size": self.batch_size,
                "height": clean["height"],
                "width": clean["width"],
                "out_dir": folder,
            }
            out = self._run(r, clean, kw)
        record = out.record
        files = [folder / e["file"] for e in record["images"]]
        zip_path = zip_folder(folder)
        captions = [caption(record, e) for e in record["images"]]
        return Generation(out.images, captions, files, folder, zip_path, record)

    def _run(self, r: Request, clean: dict[str, Any], kw: dict[str, Any]) -> Any:
        """One Pipeline call per task (PIL inputs become files there, as for the Python API)."""
        pipe, prompt = self.pipe, (r.prompt or "") if self.has_text else ""
        text = {"negative_prompt": r.negative_prompt or ""} if self.has_text else {}
        if r.task == "txt2img":
            return pipe.txt2img(prompt, **text, **kw)
        if r.task == "img2img":
            return pipe.img2img(r.image, prompt, strength=float(r.strength), **text, **kw)
        if r.task == "inpaint":
            return pipe.inpaint(r.image, r.mask, prompt, **text, **kw)
        if r.task == "outpaint":
            return pipe.outpaint(r.image, clean["pad"], prompt, **text, **kw)
        if r.task == "superres":
            return pipe.superres(r.image, prompt=prompt if self.has_text else None, **kw)
        if r.task == "semantic":
            return pipe.semantic(str(r.segmap), **kw)
        if r.task == "class":
            return pipe.class_cond(clean["labels"], **kw)
        return pipe.uncond(**kw)

    # ---- LoRA ----------------------------------------------------------------------------------------

    def set_loras(self, loras: Sequence[tuple[str, float]]) -> None:
        """Make the merged LoRAs exactly `loras` [(path, scale)]: unchanged -> nothing; otherwise restore the
        base weights of every layer merged so far, then merge each file (`Pipeline.load_lora`)."""
        wanted = [(p, s, os.stat(p).st_mtime_ns) for p, s in loras]
        if wanted == self.loras:
            return
        self.restore_base()
        from ldm.adapters.lora import base_layer
        from ldm.adapters.lora_files import load_lora

        modules = dict(self.pipe.model.named_modules())
        try:
            for path, scale, mtime in wanted:
                for name in load_lora(path, self.pipe.model):  # the layers this file changes
                    if name not in self.base_weights and name in modules:
                        self.base_weights[name] = base_layer(modules[name]).weight.detach().clone()
                self.pipe.load_lora(path, scale)
                self.loras.append((path, scale, mtime))
        except BaseException:
            self.restore_base()  # a bad file leaves the base model, not half a list
            raise

    @torch.no_grad()
    def restore_base(self) -> None:
        """Undo every merge: copy the saved base weights back (exact); re-encode "" if text layers changed."""
        from ldm.adapters.lora import base_layer

        modules = dict(self.pipe.model.named_modules())
        for name, weight in self.base_weights.items():
            base_layer(modules[name]).weight.copy_(weight)
        if any(name.startswith("conditioner.") for name in self.base_weights):
            refresh_null_contexts(self.pipe.model)
        self.base_weights.clear()
        self.loras.clear()
        self.pipe.adapters[:] = [a for a in self.pipe.adapters if a.get("kind") != "lora"]


def caption(record: dict[str, Any], entry: dict[str, Any]) -> str:
    """ "seed 3 · ddim · 20 steps · cfg 5.0 — a red circle": what reproduces the image, for the gallery."""
    p = record["parameters"]
    sampler = str(p["sampler_name"]).removeprefix("sample_")
    parts = [f"seed {entry['seed']}", sampler, f"{p['steps']} steps", f"cfg {p['cfg_scale']}"]
    if "strength" in record["task_parameters"]:
        parts.append(f"strength {record['task_parameters']['strength']}")
    if "label" in entry:
        parts.append(f"class {entry['label']}")
    text = " · ".join(parts)
    return f"{text} — {entry['prompt']}" if entry.get("prompt") else text


def zip_folder(folder: Path) -> Path:
    """<folder>.zip with the folder's PNGs and run.json (written atomically)."""
    target = folder.with_suffix(".zip")
    with atomic_path(target) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as z:  # PNGs: compressed
        for file in sorted(folder.iterdir()):
            if file.suffix == ".png" or file.name == RECORD_NAME:
                z.write(file, f"{folder.name}/{file.name}")
    return target
