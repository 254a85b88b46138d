"""sample.py tasks: each turns its user inputs into a `Job` for one loaded model.

One small class per task, picked by `_target_` in conf/task/<name>.yaml; every task has
`build(model, n=, height=, width=) -> Job`. Prompts, labels and inputs the model reads but the task does
not set get neutral values (the empty prompt; "generate everything" for an inpainting model).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ldm.conditioning.prompts import job_windows
from ldm.errors import UserError
from ldm.interop.load import LoadedModel
from ldm.samplers.sigmas import truncate_for_strength
from ldm.sampling.inputs import (
    check_size,
    load_image,
    load_mask,
    load_segmap,
    read_prompts,
    resize_image,
    snap_size,
)
from ldm.sampling.job import Job, check_supported, full_mask_inputs
from ldm.sampling.runner import Result, Settings, run_job

log = logging.getLogger(__name__)
FALLBACK_LATENT_SIDE = 32  # default size when neither the run config nor the yaml records one


class Task:
    """Base: checks the model can do the task and fills the inputs every task shares."""

    prompt_required = False  # txt2img: a prompt is the whole point; edits default to the empty prompt

    def __init__(
        self, name: str, prompt: Any = None, prompt_file: str | None = None, negative_prompt: str = ""
    ) -> None:
        self.name = name
        self.prompt = prompt
        self.prompt_file = prompt_file
        self.negative_prompt = negative_prompt or ""

    def build(
        self, model: LoadedModel, *, n: int, height: int | None = None, width: int | None = None
    ) -> Job:
        raise NotImplementedError

    def sample(self, model: LoadedModel, job: Job, settings: Settings) -> Result:
        """Run the job built by `build` (one pass; txt2img's hires fix runs two)."""
        return run_job(model, job, settings)

    def preflight(self) -> None:
        """Fail on a missing input file before the (possibly minutes-long) model load."""
        for option in ("image", "mask", "segmap", "prompt_file"):
            value = getattr(self, option, None)
            if value not in (None, "") and not Path(str(value)).expanduser().is_file():
                raise UserError(f"{option}={value}: no such file (relative paths are from {Path.cwd()}).")

    # helpers ----------------------------------------------------------------------------------------

    def check(self, model: LoadedModel) -> None:
        check_supported(self.name, model.input_keys, str(model.path))

    @staticmethod
    def factor(model: LoadedModel) -> int:
        return int(model.model.first_stage.downsample_factor)

    def size(self, model: LoadedModel, height: int | None, width: int | None) -> tuple[int, int]:
        """height/width options, else the training resolution of the model."""
        f = self.factor(model)
        native = model.image_size or FALLBACK_LATENT_SIDE * f
        native_h, native_w = native if isinstance(native, (tuple, list)) else (native, native)
        return check_size(height or native_h, width or native_w, f)

    def per_image(self, model: LoadedModel, n: int) -> list[dict[str, Any]]:
        """n images per prompt (prompt-major) for text models; n empty entries otherwise."""
        if n < 1:
            raise UserError(f"n={n}: ask for at least one image.")
        if "caption" not in model.input_keys:
            if self.prompt not in (None, "") or self.prompt_file:
                log.warning("%s has no text conditioning: the prompt is ignored", model.path)
            return [{} for _ in range(n)]
        prompts = read_prompts(self.prompt, self.prompt_file, self.name, self.prompt_required)
        return [{"caption": p} for p in prompts for _ in range(n)]

    def job(
        self, model: LoadedModel, size: tuple[int, int], per_image: list[dict[str, Any]], **kw: Any
    ) -> Job:
        """A Job whose inputs cover every key the model reads (inpainting models get a full mask if unset)."""
        shared = dict(kw.pop("shared", {}))
        keys = model.input_keys
        if "mask" in keys and "masked_image" in keys and "mask" not in shared:
            shared.update(full_mask_inputs(size))
        params = {"task": self.name, **kw.pop("params", {})}
        if "caption" in keys:
            params["negative_prompt"] = self.negative_prompt
            prompts = {str(e["caption"]) for e in per_image if "caption" in e} | {self.negative_prompt}
            shared.update(job_windows(model.model.conditioner, prompts, shared, str(model.path)))
            windows = max([v for k, v in shared.items() if k.endswith("_windows")] or [1])
            if windows > 1:
                params["prompt_windows"] = windows
        return Job(
            size=size,
            per_image=per_image,
            shared=shared,
            negative_prompt=self.negative_prompt,
            params=params,
            **kw,
        )


@dataclass
class Hires:
    """txt2img's two-pass "hires fix": sample at the native size, upscale the decoded images by `scale`
    (bicubic, in pixels), then img2img them at `strength` with a schedule of `steps` (None: the first
    pass's), of which the last strength x steps run (SDEdit). strength 0: the upscaled first pass."""

    scale: float
    strength: float = 0.5
    steps: int | None = None

    UPSCALE = "bicubic (pixels: first pass decoded, upscaled, re-encoded by the VAE)"

    @classmethod
    def parse(cls, value: Any) -> Hires | None:
        """`hires` option ({scale, strength, steps} or None) -> Hires, or None when scale is unset or 1."""
        if value is None:
            return None
        if isinstance(value, Hires):
            return value
        if not isinstance(value, Mapping):
            raise UserError(f"hires={value!r}: give hires.scale=2 (and hires.strength=0.5, hires.steps=20).")
        unknown = sorted(set(value) - {"scale", "strength", "steps"})
        if unknown:
            raise UserError(f"hires: unknown keys {unknown}; use hires.scale, hires.strength, hires.steps.")
        scale, strength, steps = value.get("scale"), value.get("strength", 0.5), value.get("steps")
        if scale is None:
            return None
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale >= 1:
            raise UserError(f"hires.scale={scale}: the upscale factor, a number >= 1 (e.g. 2; 1 = off).")
        if float(scale) == 1.0:
            return None
        if strength is None:
            strength = 0.5
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 <= strength <= 1:
            raise UserError(
                f"hires.strength={strength}: a number in [0, 1] (0.5 is usual; 0 = upscale only)."
            )
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
            raise UserError(f"hires.steps={steps}: a whole number >= 1, or null for the first pass's steps.")
        return cls(float(scale), float(strength), steps)


def upscale_pixels(images: Tensor, size: tuple[int, int]) -> Tensor:
    """(N, 3, h, w) in [-1, 1] -> (N, 3, H, W) bicubic, clamped to [-1, 1] (hires fix's upscaler)."""
    return F.interpolate(images.float(), size=size, mode="bicubic", align_corners=False).clamp(-1, 1)


class Txt2Img(Task):
    """Text-to-image (LDM Sec. 4.3): prompts -> images of height x width; `hires` adds a second,
    upscaled img2img pass (see `Hires`)."""

    prompt_required = True

    def __init__(self, name: str = "txt2img", hires: Any = None, **prompts: Any) -> None:
        super().__init__(name, **prompts)
        self.hires = Hires.parse(hires)

    def build(
        self, model: LoadedModel, *, n: int, height: int | None = None, width: int | None = None
    ) -> Job:
        """The job at the final size (scale x height/width when hires is on; its record says both)."""
        self.check(model)
        native = self.size(model, height, width)
        if self.hires is None:
            return self.job(model, native, self.per_image(model, n))
        f = self.factor(model)
        size = check_size(*(max(f, round(s * self.hires.scale / f) * f) for s in native), f)
        params = {
            "hires": {
                "scale": self.hires.scale,
                "strength": self.hires.strength,
                "steps": self.hires.steps,
                "upscale": Hires.UPSCALE,
                "first_pass_size": list(native),
                "second_pass": "img2img" if self.hires.strength > 0 else "none (strength 0)",
            }
        }
        return self.job(model, size, self.per_image(model, n), params=params)

    def sample(self, model: LoadedModel, job: Job, settings: Settings) -> Result:
        """One pass, or the hires fix: native-size txt2img -> bicubic upscale -> img2img per image (seed +
        i, so an image never depends on its batch) at the job's size; records the second pass's steps."""
        if self.hires is None:
            return run_job(model, job, settings)
        hires, record = self.hires, job.params["hires"]
        first_job = self.job(model, tuple(record["first_pass_size"]), job.per_image, shared=job.shared)
        first = run_job(model, first_job, settings)
        upscaled = upscale_pixels(first.images, job.size)
        if hires.strength == 0:
            record["second_pass_steps"] = 0
            codec = model.model.first_stage
            device = next(codec.parameters()).device
            latents = torch.cat(
                [codec.encode_pixels(u[None].to(device), sample=False).float().cpu() for u in upscaled]
            )
            return Result(upscaled, latents, first.seeds, dict(first.timings), first.guided)
        steps = copy.copy(settings.steps)
        steps.steps = hires.steps or settings.steps.steps
        sigmas = truncate_for_strength(steps(model.model.loss.schedule.alphas_cumprod), hires.strength)
        record["second_pass_steps"] = len(sigmas) - 1
        results = []
        for i, seed in enumerate(first.seeds):
            one = self.job(
                model,
                job.size,
                [job.per_image[i]],
                shared=job.shared,
                init_image=upscaled[i : i + 1],
                strength=hires.strength,
            )
            second = Settings(**{**vars(settings), "seed": seed, "batch_size": 1, "steps": steps})
            results.append(run_job(model, one, second))
        timings = {k: v + sum(r.timings[k] for r in results) for k, v in first.timings.items()}
        images = torch.cat([r.images for r in results])
        latents = torch.cat([r.latents for r in results])
        return Result(images, latents, first.seeds, timings, first.guided)


class Uncond(Task):
    """Unconditional samples (LDM Sec. 4.1); from a text model, with the empty prompt."""

    def __init__(self, name: str = "uncond") -> None:
        super().__init__(name)

    def build(
        self, model: LoadedModel, *, n: int, height: int | None = None, width: int | None = None
    ) -> Job:
        self.check(model)
        # a text model gets the empty prompt (Uncond takes none): its null condition
        return self.job(model, self.size(model, height, width), self.per_image(model, n))


class ClassCond(Task):
    """Class-conditional samples: n images for each id in `label`."""

    def __init__(self, name: str = "class", label: Any = None) -> None:
        super().__init__(name)
        self.label = label

    def build(
        self, model: LoadedModel, *, n: int, height: int | None = None, width: int | None = None
    ) -> Job:
        self.check(model)
        if self.label is None or (isinstance(self.label, str) and not self.label.strip()):
            raise UserError("task=class needs label=<class id> or label=[id,id,...].")
        labels = (
            list(self.label)
            if isinstance(self.label, Sequence) and not isinstance(self.label, str)
            else [self.label]
        )
        try:
            labels = [int(v) for v in labels]
        except (TypeError, ValueError):
            raise UserError(
                f"label={self.label}: class ids must be integers, e.g. label=3 or label=[0,2]."
            ) from None
        base = self.per_image(model, n)[:n]  # the prompt ("" by default) if the model also reads text
        per_image = [{**extra, "label": lab} for lab in labels for extra in base]
        return self.job(model, self.size(model, height, width), per_image, params={"labels": labels})


class Img2Img(Task):
    """Image-to-image (SDEdit, Meng et al. 2022): noise the image to `strength`, denoise with the prompt."""

    def __init__(
        self,
        name: str = "img2img",
        image: str | None = None,
        strength: float | None = None,
        default_strength: float = 0.75,
        **prompts: Any,
    ) -> None:
        super().__init__(name, **prompts)
        self.image = image
        self.strength = default_strength if strength is None else float(strength)

    def build(
        self, model: LoadedModel, *, n: int, height: int | None = None, width: int | None = None
    ) -> Job:
        self.check(model)
        image = load_image(self.image, "image", self.name)
        size = self.image_size(model, image, height, width)
        return self.job(
            model,
            size,
            self.per_image(model, n),
            init_image=resize_image(image, size),
            strength=self.strength,
            params={"image": str(self.image), "strength": self.strength},
        )

    def image_size(
        self, model: LoadedModel, image: Tensor, height: int | None, width: int | None
    ) -> tuple[int, int]:
        if height or width:
            h, w = image.shape[-2:]
            return check_size(height or h, width or w, self.factor(model))
        return snap_size(image.shape[-2], image.shape[-1], self.factor(model), f"image={self.image}")


class Inpaint(Img2Img):
    """Regenerate the mask's white area. An inpainting model (masked_image + mask conditioner) gets them
    through its concat condition; any other model keeps the rest by latent blending at every step."""

    def __init__(
        self,
        name: str = "inpaint",
        mask: str | None = None,
        blend: str | bool = "auto",
        default_strength: float = 1.0,
        paste: bool = True,  # put the input's own pixels back outside the mask after decoding
        feather: float = 0.0,  # paste: blend over this many pixels inside the mask's edge (0 = hard edge)
        **kw: Any,
    ) -> None:
        super().__init__(name, default_strength=default_strength, **kw)
        self.mask = mask
        self.blend = blend
        self.paste = bool(paste)
        if float(feather) < 0:
            raise UserError(f"task.feather={feather}: must be >= 0 pixels.")
        self.feather = float(feather)

    def build(
        self, model: LoadedModel, *, n: int, height: int | None = None, width: int | None = None
    ) -> Job:
        self.check(model)
        image = load_image(self.image, "image", self.name)
        size = self.image_size(model, image, height, width)
        mask = load_mask(self.mask, image.shape[-2:], self.name)
        params = {"image": str(self.image), "mask": str(self.mask), "strength": self.strength}
        return self.masked_job(model, resize_image(image, size), F.interpolate(mask, size=size), n, params)

    def masked_job(self, model: LoadedModel, image: Tensor, mask: Tensor, n: int, params: dict) -> Job:
        """Concat condition for inpainting models, latent blending for the others (or as `blend` says)."""
        if self.blend not in ("auto", True, False):
            raise UserError(
                f"task.blend={self.blend!r}: use auto (blend unless an inpainting model), true or false."
            )
        concat = "masked_image" in model.input_keys
        blend = (not concat) if self.blend == "auto" else bool(self.blend)
        if not concat and not blend:
            raise UserError(
                f"task.blend=false but {model.path} is not an inpainting model: without blending nothing "
                "keeps the unmasked area; leave task.blend=auto."
            )
        shared = {"masked_image": image * (mask < 0.5), "mask": mask} if concat else {}
        mode = "+".join(name for name, used in (("concat", concat), ("blend", blend)) if used)
        params = {**params, "inpaint_mode": mode, "paste": self.paste, "feather": self.feather}
        return self.job(
            model,
            tuple(image.shape[-2:]),
            self.per_image(model, n),
            shared=shared,
            init_image=image,
            strength=self.strength,
            blend_mask=mask if blend else None,
            paste_mask=feathered(mask, self.feather) if self.paste else None,
            params=params,
        )


class Outpaint(Inpaint):
    """Extend the canvas by pad=[left, top, right, bottom] pixels and inpaint the new border.

    The new area starts as the edge pixels replicated outwards and blurred, so that with strength < 1 the
    generated border continues the image's colours instead of starting from pure noise.
    """

    def __init__(
        self,
        name: str = "outpaint",
        pad: Sequence[int] = (0, 0, 0, 0),
        default_strength: float = 0.9,
        **kw: Any,
    ) -> None:
        super().__init__(name, default_strength=default_strength, **kw)
        self.pad = pad

    def build(
        self, model: LoadedModel, *, n: int, height: int | None = None, width: int | None = None
    ) -> Job:
        self.check(model)
        pad = check_pad(self.pad)
        if height or width:
            log.warning("task=outpaint: the output size is the image plus pad; height/width are ignored")
        image = load_image(self.image, "image", self.name)
        canvas, mask, pad = extend_canvas(image, pad, self.factor(model))
        params = {"image": str(self.image), "pad": pad, "strength": self.strength}
        return self.masked_job(model, canvas, mask, n, params)


def feathered(mask: Tensor, feather: float) -> Tensor:
    """(1,1,H,W) mask, 1 = generated -> paste weights: 0 outside the mask (the input's pixels exactly),
    ramping from 0 at the mask's edge to 1 `feather` pixels inside it (a box blur of that width)."""
    binary = (mask > 0.5).float()
    radius = int(round(feather))
    if radius < 1:
        return binary
    outside = F.avg_pool2d(1 - binary, 2 * radius + 1, stride=1, padding=radius, count_include_pad=False)
    return binary * (1 - outside)  # share of kept pixels within `radius`: 0 deep inside the mask


def check_pad(pad: Any) -> list[int]:
    """pad=[left, top, right, bottom]: four non-negative pixel counts, not all zero."""
    example = "e.g. pad=[0,0,64,0] adds 64 pixels on the right"
    if pad is None:
        raise UserError(f"task=outpaint needs pad=[left,top,right,bottom] in pixels, {example}.")
    try:
        values = [int(p) for p in (pad if isinstance(pad, Sequence) and not isinstance(pad, str) else [pad])]
    except (TypeError, ValueError):
        raise UserError(f"pad={pad}: give four pixel counts [left,top,right,bottom], {example}.") from None
    if len(values) != 4 or min(values) < 0 or max(values) == 0:
        raise UserError(f"pad={pad}: give four non-negative pixel counts [left,top,right,bottom], {example}.")
    return values


def extend_canvas(image: Tensor, pad: Sequence[int], multiple: int) -> tuple[Tensor, Tensor, list[int]]:
    """(canvas, mask, pad): the image padded by edge replication + blur, mask = 1 on the new area.

    Right/bottom padding grows so that the canvas is a multiple of the autoencoder's factor.
    """
    left, top, right, bottom = (int(p) for p in pad)
    h, w = image.shape[-2:]
    right += (-(w + left + right)) % multiple
    bottom += (-(h + top + bottom)) % multiple
    if [left, top, right, bottom] != list(pad):
        log.warning(
            "pad=%s grown to %s so the canvas is a multiple of %d",
            list(pad),
            [left, top, right, bottom],
            multiple,
        )
    canvas = F.pad(image, (left, right, top, bottom), mode="replicate")  # (1, 3, H', W')
    radius = max(1, max(left, top, right, bottom) // 4)
    blurred = canvas
    for _ in range(3):  # three box blurs ~ a Gaussian of std ~ radius
        blurred = F.avg_pool2d(F.pad(blurred, (radius,) * 4, mode="replicate"), 2 * radius + 1, stride=1)
    mask = torch.ones(1, 1, *canvas.shape[-2:])
    mask[..., top : top + h, left : left + w] = 0
    return canvas * (1 - mask) + blurred * mask, mask, [left, top, right, bottom]


class SuperRes(Task):
    """Super-resolution (LDM Sec. 4.4): a low-res `image` upscaled by the model's factor."""

    def __init__(
        self,
        name: str = "superres",
        image: str | None = None,
        noise_level: int | None = None,  # noise-augmented upscalers (SD x4): the low-res image's level
        **prompts: Any,
    ) -> None:
        super().__init__(name, **prompts)
        self.image = image
        self.noise_level = noise_level

    def build(
        self, model: LoadedModel, *, n: int, height: int | None = None, width: int | None = None
    ) -> Job:
        self.check(model)
        if height or width:
            log.warning(
                "task=superres: the output size is the model's factor times the input; height/width ignored"
            )
        lowres = load_image(self.image, "image", self.name)
        conditioner = next(
            c for c in model.model.conditioner.conditioners.values() if "lowres" in c.input_keys
        )
        f = self.factor(model)
        upscale = float(getattr(conditioner, "upscale", 1.0))
        base = (
            [s / f for s in lowres.shape[-2:]] if getattr(conditioner, "encode", False) else lowres.shape[-2:]
        )
        size = (round(base[0] * upscale) * f, round(base[1] * upscale) * f)
        factor = size[0] / lowres.shape[-2]
        shared: dict[str, Any] = {"lowres": lowres}
        params: dict[str, Any] = {"image": str(self.image), "upscale": factor}
        if hasattr(conditioner, "noise_level"):  # SD x4: the augmentation level it was conditioned on
            level = conditioner.noise_level if self.noise_level is None else int(self.noise_level)
            shared["noise_level"] = params["noise_level"] = level
        elif self.noise_level is not None:
            log.warning(
                "noise_level=%s: %s has no noise-augmented low-res input; ignored",
                self.noise_level,
                model.path,
            )
        return self.job(model, size, self.per_image(model, n), shared=shared, params=params)


class Semantic(Task):
    """Semantic synthesis (LDM Sec. 4.3.2): a segmentation map of class ids -> an image of its size."""

    def __init__(self, name: str = "semantic", segmap: str | None = None, **prompts: Any) -> None:
        super().__init__(name, **prompts)
        self.segmap = segmap

    def build(
        self, model: LoadedModel, *, n: int, height: int | None = None, width: int | None = None
    ) -> Job:
        self.check(model)
        seg = load_segmap(self.segmap, self.name)
        size = snap_size(seg.shape[-2], seg.shape[-1], self.factor(model), f"segmap={self.segmap}")
        if tuple(seg.shape[-2:]) != size:
            seg = F.interpolate(seg[:, None].float(), size=size, mode="nearest")[:, 0].long()
        return self.job(
            model, size, self.per_image(model, n), shared={"segmap": seg}, params={"segmap": str(self.segmap)}
        )
