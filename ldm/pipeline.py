"""Sampling from Python: load any supported file in one call, run any task in one call.

    from ldm.pipeline import Pipeline
    pipe = Pipeline.from_file("outputs/txt2img/latest/model.safetensors", device="cpu")
    out = pipe.txt2img("a red circle on a blue background", n=2, steps=20, seed=0)
    out.images[0].save("circle.png")          # PIL images; out.record is what sample.py writes as run.json

Original checkpoints take their yaml and text-encoder folder:
`Pipeline.from_file("v1-5.safetensors", config="v1-inference.yaml", text_encoder="clip-vit-large-patch14/")`.
Every task of `sample.py` is a method (txt2img, img2img, inpaint, outpaint, superres, semantic, class_cond,
uncond); `sample.py` itself is a command line over `Pipeline.run`. Nothing here imports Lightning.
"""

from __future__ import annotations

import functools
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

from ldm.errors import UserError
from ldm.interop.load import LoadedModel, load_model
from ldm.samplers import (
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
    sample_dpmpp_2m_sde,
    sample_dpmpp_2s_ancestral,
    sample_dpmpp_sde,
    sample_euler,
    sample_euler_ancestral,
    sample_heun,
    sample_lms,
    sample_plms,
    sample_unipc,
)
from ldm.samplers.sigmas import StepSchedule
from ldm.sampling import tasks as T
from ldm.sampling.records import make_record, write_outputs
from ldm.sampling.runner import Settings, prepare, resolve_device
from ldm.training.images import to_uint8

# sampler names of conf/sampler/*.yaml -> the functions (their keyword defaults are the yaml defaults)
SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "ddim": sample_ddim,
    "ddpm": sample_ddpm,
    "plms": sample_plms,
    "dpmpp_2m": sample_dpmpp_2m,
    "euler": sample_euler,
    "euler_a": sample_euler_ancestral,
    "heun": sample_heun,
    "dpmpp_2s_a": sample_dpmpp_2s_ancestral,
    "dpmpp_sde": sample_dpmpp_sde,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "lms": sample_lms,
    "unipc": sample_unipc,
}
DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
ImageInput = str | os.PathLike | Image.Image


@dataclass
class Output:
    """What one call returns: PIL images, the run record (run.json), and the tensors behind them."""

    images: list[Image.Image]
    record: dict[str, Any]
    tensors: Tensor = field(repr=False)  # (N, 3, H, W) in [-1, 1], float32, CPU
    latents: Tensor = field(repr=False)  # (N, C, h, w) scaled latents


def to_pil(images: Tensor) -> list[Image.Image]:
    """(N, 3, H, W) in [-1, 1] -> RGB PIL images (rounded to 8 bits as the PNGs sample.py writes)."""
    return [Image.fromarray(np.ascontiguousarray(a)) for a in to_uint8(images)]


def sampler_function(sampler: str | Callable[..., Tensor], **options: Any) -> Callable[..., Tensor]:
    """A sampler by name (a key of SAMPLERS, e.g. ddim, dpmpp_2m, euler_a, unipc) or function, with `options`
    bound."""
    if callable(sampler):
        return functools.partial(sampler, **options) if options else sampler
    if sampler not in SAMPLERS:
        raise UserError(f"sampler={sampler!r}: use one of {', '.join(SAMPLERS)}.")
    return functools.partial(SAMPLERS[sampler], **options)


def describe_sampler(sampler: Callable[..., Tensor]) -> dict[str, Any]:
    """{"function": "sample_ddim", "eta": 0.0, ...}: the sampler and its bound options, for run records."""
    base, options = sampler, {}
    while isinstance(base, functools.partial):
        options = {**base.keywords, **options}
        base = base.func
    return {"function": getattr(base, "__name__", str(base)), **options}


class Pipeline:
    """A loaded model on a device, and one method per sampling task (see the module docstring)."""

    def __init__(
        self,
        loaded: LoadedModel,
        device: str | torch.device = "auto",
        dtype: torch.dtype = torch.float32,  # autocast dtype of the UNet; decoding stays float32
        compile: bool = False,  # torch.compile the UNet (pays off on a GPU after the first batch)
    ) -> None:
        if dtype not in DTYPES:
            raise UserError(f"dtype={dtype}: use torch.float32, torch.bfloat16 or torch.float16.")
        self.loaded = loaded
        self.device = resolve_device(str(device))
        self.precision = DTYPES[dtype]
        self.adapters: list[dict[str, Any]] = []  # LoRAs merged and embeddings added, for run records
        prepare(loaded, self.device, compile_unet=compile)

    @classmethod
    def from_file(
        cls,
        path: str | os.PathLike,
        config: str | os.PathLike | None = None,  # original yaml, for original CompVis/Stability files
        text_encoder: str | None = None,  # local tokenizer / text-model folder (CLIP, OpenCLIP, BERT)
        device: str | torch.device = "auto",
        dtype: torch.dtype = torch.float32,
        use_ema: bool = True,
        compile: bool = False,
        lora: Sequence[str | tuple[str, float]] = (),  # LoRA files: "a.safetensors:0.8" or (path, scale)
        embeddings: Sequence[str] = (),  # textual-inversion files (the token is the file name, or path:name)
    ) -> Pipeline:
        """Load any supported checkpoint (see `ldm.interop.load.load_model`) onto `device`, then merge
        `lora` adapters and add `embeddings` (see `load_lora`, `load_embeddings`)."""
        start = time.perf_counter()
        loaded = load_model(path, config=config, use_ema=use_ema, text_encoder=text_encoder)
        pipe = cls(loaded, device=device, dtype=dtype, compile=compile)
        for spec in lora:
            pipe.load_lora(*parse_lora_spec(spec))
        if embeddings:
            pipe.load_embeddings(embeddings)
        pipe.load_s = time.perf_counter() - start
        return pipe

    def load_lora(self, path: str | os.PathLike, scale: float = 1.0) -> int:
        """Merge a LoRA file into the weights: W += scale * (alpha/r) * up @ down (as AUTOMATIC1111 does).

        Reads the AUTOMATIC1111 / ComfyUI / kohya convention and the diffusers / peft one (see
        `ldm.adapters.lora_files.load_lora`); returns the number of layers changed. Several calls stack.
        Raises UserError for a file that is not a LoRA of this model's architecture."""
        from ldm.adapters.lora import merge_lora
        from ldm.adapters.lora_files import load_lora

        adapters = load_lora(path, self.model)
        n = merge_lora(self.model, adapters, float(scale))
        if any(name.startswith("conditioner.") for name in adapters):
            refresh_null_contexts(self.model)  # "" encodes differently with the text-encoder LoRA
        self.adapters.append({"kind": "lora", "path": str(path), "scale": float(scale), "layers": n})
        return n

    def load_embeddings(self, paths: Sequence[str | os.PathLike]) -> list[str]:
        """Add textual-inversion embeddings (AUTOMATIC1111 `emb_params` / `string_to_param`, diffusers
        `learned_embeds`); returns their tokens, usable in prompts from now on."""
        from ldm.adapters.embeddings import load_embeddings

        tokens = load_embeddings(self.model, [str(p) for p in paths])
        self.model.to(self.device)
        self.adapters.extend(
            {"kind": "embedding", "path": str(p), "token": t} for p, t in zip(paths, tokens, strict=True)
        )
        return tokens

    load_s: float = 0.0

    @property
    def model(self) -> Any:
        """The plain `LatentDiffusion` model (first stage, conditioner, UNet, schedule)."""
        return self.loaded.model

    @property
    def tasks(self) -> tuple[str, ...]:
        """The tasks this model supports (from the inputs its conditioner reads)."""
        return self.loaded.tasks

    # ---- the one general call ---------------------------------------------------------------------

    def run(
        self,
        task: T.Task,
        *,
        n: int = 1,  # images per prompt / label
        seed: int = 0,  # image i uses seed + i, whatever the batch size
        steps: int = 50,
        sampler: str | Callable[..., Tensor] = "ddim",
        sampler_options: dict[str, Any] | None = None,
        cfg_scale: float = 5.0,
        spacing: str = "auto",  # auto: from the loaded schedule (trailing for zero-terminal SNR)
        batch_size: int = 4,
        height: int | None = None,
        width: int | None = None,
        out_dir: str | os.PathLike | None = None,  # also write PNGs, grid.png and run.json there
        progress: bool = False,
        config: dict[str, Any] | None = None,  # recorded in run.json (sample.py passes its config)
    ) -> Output:
        """Build the task's job for this model, sample it, and return images + the run record."""
        start = time.perf_counter()
        spacing = self.model.default_spacing if spacing == "auto" else spacing
        sampler_fn = sampler_function(sampler, **(sampler_options or {}))
        settings = Settings(
            sampler=sampler_fn,
            steps=StepSchedule(steps=int(steps), spacing=spacing),
            cfg_scale=float(cfg_scale),
            batch_size=int(batch_size),
            seed=int(seed),
            device=self.device,
            precision=self.precision,
            progress=progress,
        )
        task.preflight()
        job = task.build(self.loaded, n=int(n), height=height, width=width)
        result = task.sample(self.loaded, job, settings)  # txt2img's hires fix runs two passes
        sampler_record = describe_sampler(sampler_fn)
        run = {
            "n": n,
            "seed": seed,
            "steps": steps,
            "spacing": spacing,
            "cfg_scale": cfg_scale,
            "batch_size": batch_size,
            "precision": self.precision,
            "use_ema": self.loaded.used_ema,
            "device": str(self.device),
            "sampler": sampler_record,
            "sampler_name": sampler_record["function"],
            "adapters": list(self.adapters),
        }
        timings = {"load_s": self.load_s, "total_s": self.load_s + time.perf_counter() - start}
        record = make_record(result, job, self.loaded, run, config, timings, out_dir)
        if out_dir is not None:
            write_outputs(out_dir, result, job, record)
        return Output(to_pil(result.images), record, result.images, result.latents)

    # ---- one method per task ----------------------------------------------------------------------

    def txt2img(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str = "",
        hires: dict[str, Any] | None = None,  # {"scale": 2, "strength": 0.5, "steps": None}: hires fix
        **kw: Any,
    ) -> Output:
        """Text-to-image: `n` images per prompt. Prompts may be longer than the text encoder's window
        (CLIP: windows of 77 tokens) and use emphasis, `(word:1.3)` (see `ldm.conditioning.prompts`);
        `hires` samples at the native size, upscales by `scale` and re-runs `strength` of the schedule
        (`ldm.sampling.tasks.Hires`)."""
        task = T.Txt2Img(prompt=_prompts(prompt), negative_prompt=negative_prompt, hires=hires)
        return self.run(task, **kw)

    def img2img(
        self,
        image: ImageInput,
        prompt: str | Sequence[str] = "",
        strength: float | None = None,  # share of the schedule re-run (None: 0.75)
        negative_prompt: str = "",
        **kw: Any,
    ) -> Output:
        """SDEdit (Meng et al. 2022): noise `image` to `strength`, then denoise towards the prompt."""
        with _files(image=image) as files:
            task = T.Img2Img(
                image=files["image"],
                strength=strength,
                prompt=_prompts(prompt),
                negative_prompt=negative_prompt,
            )
            return self.run(task, **kw)

    def inpaint(
        self,
        image: ImageInput,
        mask: ImageInput,  # white = regenerate, black = keep
        prompt: str | Sequence[str] = "",
        negative_prompt: str = "",
        **kw: Any,
    ) -> Output:
        """Regenerate the masked part of `image` (a concat inpainting model, or latent blending)."""
        with _files(image=image, mask=mask) as files:
            task = T.Inpaint(
                image=files["image"],
                mask=files["mask"],
                prompt=_prompts(prompt),
                negative_prompt=negative_prompt,
            )
            return self.run(task, **kw)

    def outpaint(
        self,
        image: ImageInput,
        pad: Sequence[int],  # pixels added as [left, top, right, bottom]
        prompt: str | Sequence[str] = "",
        negative_prompt: str = "",
        **kw: Any,
    ) -> Output:
        """Extend `image` by `pad` pixels per side and generate the new border."""
        with _files(image=image) as files:
            task = T.Outpaint(
                image=files["image"], pad=list(pad), prompt=_prompts(prompt), negative_prompt=negative_prompt
            )
            return self.run(task, **kw)

    def superres(
        self,
        image: ImageInput,
        prompt: str | Sequence[str] | None = None,  # text-guided upscalers (SD x4)
        noise_level: int | None = None,  # SD x4: augmentation level of the low-res image (None: 20)
        **kw: Any,
    ) -> Output:
        """Upscale a low-resolution image (the model's factor)."""
        with _files(image=image) as files:
            task = T.SuperRes(image=files["image"], noise_level=noise_level, prompt=_prompts(prompt))
            return self.run(task, **kw)

    def semantic(self, segmap: ImageInput, **kw: Any) -> Output:
        """Semantic synthesis: a map of class ids -> an image of its size."""
        with _files(segmap=segmap) as files:
            return self.run(T.Semantic(segmap=files["segmap"]), **kw)

    def class_cond(self, label: int | Sequence[int], **kw: Any) -> Output:
        """Class-conditional samples: `n` images for each class id."""
        return self.run(T.ClassCond(label=list(label) if isinstance(label, Sequence) else int(label)), **kw)

    def uncond(self, **kw: Any) -> Output:
        """Unconditional samples (a text model: its empty prompt)."""
        return self.run(T.Uncond(), **kw)


def parse_lora_spec(spec: str | os.PathLike | tuple[str, float] | Sequence[Any]) -> tuple[str, float]:
    """ "a.safetensors:0.8" -> ("a.safetensors", 0.8); a path without ":<number>" has scale 1.0."""
    if not isinstance(spec, (str, os.PathLike)):
        path, scale = spec
        return str(path), float(scale)
    text = str(spec)
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            return head, float(tail)
        except ValueError:
            pass
    return text, 1.0


def refresh_null_contexts(model: Any) -> None:
    """Re-encode the cached "" context of text encoders whose weights changed (merged text-encoder LoRA)."""
    for c in model.conditioner.conditioners.values():
        if hasattr(c, "null_context") and hasattr(c, "encode_prompts"):
            with torch.no_grad():
                c.null_context.copy_(c.encode_prompts([""]).to(c.null_context))


def _prompts(prompt: str | Sequence[str] | None) -> str | list[str] | None:
    return prompt if prompt is None or isinstance(prompt, str) else list(prompt)


class _files:
    """PIL images given to the API become PNG files for the tasks' one image reader (paths pass through)."""

    def __init__(self, **images: ImageInput) -> None:
        self.images = images
        self.tmp: tempfile.TemporaryDirectory | None = None

    def __enter__(self) -> dict[str, str]:
        out = {}
        for key, value in self.images.items():
            if isinstance(value, Image.Image):
                if self.tmp is None:
                    self.tmp = tempfile.TemporaryDirectory(prefix="ldm_pipeline_")
                path = Path(self.tmp.name) / f"{key}.png"
                # PNG keeps no EXIF orientation: apply it here, as the file decoder would have
                ImageOps.exif_transpose(value).save(path)
                out[key] = str(path)
            else:
                out[key] = str(value)
        return out

    def __exit__(self, *exc: Any) -> None:
        if self.tmp is not None:
            self.tmp.cleanup()
