"""What a task hands to the sampling loop (`Job`), and which tasks a model can do.

Which tasks a checkpoint supports follows from the batch keys its conditioner reads:

    caption                -> txt2img, img2img, inpaint (latent blending), outpaint, uncond (empty prompt)
    masked_image + mask    -> inpaint, outpaint (through the concat condition)
    lowres                 -> superres
    segmap                 -> semantic
    label                  -> class
    (nothing)              -> uncond
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ldm.errors import UserError

TASKS_BY_INPUT: dict[str, tuple[str, ...]] = {
    # uncond: a text model trained with caption dropout is also the unconditional model under the empty
    # prompt (the null condition of classifier-free guidance, Ho & Salimans 2022).
    "caption": ("txt2img", "img2img", "inpaint", "outpaint", "uncond"),
    "masked_image": ("inpaint", "outpaint"),
    "mask": ("inpaint", "outpaint"),
    "lowres": ("superres",),
    "segmap": ("semantic",),
    "label": ("class",),
}
INPUT_WORDS = {
    "caption": "text prompts ('caption')",
    "masked_image": "a masked image ('masked_image')",
    "mask": "an inpainting mask ('mask')",
    "lowres": "a low-resolution image ('lowres')",
    "segmap": "a segmentation map ('segmap')",
    "label": "class labels ('label')",
}
TASK_NEEDS = {
    "txt2img": "text prompts",
    "img2img": "text prompts",
    "inpaint": "text prompts or a masked image + mask",
    "outpaint": "text prompts or a masked image + mask",
    "superres": "a low-resolution image",
    "semantic": "a segmentation map",
    "class": "class labels",
    "uncond": "nothing (an unconditional model) or text prompts (sampled with the empty prompt)",
}


def supported_tasks(input_keys: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """The sample.py tasks a model whose conditioner reads `input_keys` can run."""
    if not input_keys:
        return ("uncond",)
    if "lowres" in input_keys:  # a text-guided upscaler (SD x4): the prompt only steers the upscaling
        return ("superres",)
    tasks = [t for key in input_keys for t in TASKS_BY_INPUT.get(key, ())]
    return tuple(dict.fromkeys(tasks))


def describe_inputs(input_keys: tuple[str, ...] | list[str]) -> str:
    if not input_keys:
        return "nothing (it is unconditional)"
    return " + ".join(INPUT_WORDS.get(k, f"'{k}'") for k in input_keys)


def check_supported(task: str, input_keys: tuple[str, ...], where: str) -> None:
    """UserError naming what the task needs, what the checkpoint reads and the tasks it supports."""
    supported = supported_tasks(input_keys)
    if task in supported:
        return
    raise UserError(
        f"task={task} needs a model conditioned on {TASK_NEEDS.get(task, 'other inputs')}, but {where} is "
        f"conditioned on {describe_inputs(input_keys)}; it supports: {', '.join(supported) or 'no task'}. "
        f"Pass task={supported[0] if supported else '...'} or a checkpoint trained for {task}."
    )


@dataclass
class Job:
    """Everything the sampling loop needs for one task, independent of how images are batched."""

    size: tuple[int, int]  # output (H, W) in pixels, a multiple of the autoencoder's factor
    per_image: list[dict[str, Any]]  # conditioning inputs of image i (its prompt, its label); len = images
    shared: dict[str, Tensor] = field(default_factory=dict)  # inputs common to all images, batch of 1
    negative_prompt: str = ""  # the unconditional branch's prompt for guidance ("" = the null prompt)
    init_image: Tensor | None = None  # (1, 3, H, W) in [-1, 1]: img2img / inpaint start, encoded once
    strength: float = 1.0  # fraction of the schedule re-run from init_image (SDEdit, Meng et al. 2022)
    blend_mask: Tensor | None = None  # (1, 1, H, W), 1 = generate: paste init latents elsewhere each step
    paste_mask: Tensor | None = None  # (1, 1, H, W) in [0, 1]: decoded = init_image (1 - m) + generated m
    params: dict[str, Any] = field(default_factory=dict)  # task parameters for the PNG metadata and run.json

    def __post_init__(self) -> None:
        if not self.per_image:
            raise UserError("nothing to sample: n must be >= 1.")
        if not 0.0 < float(self.strength) <= 1.0:
            raise UserError(
                f"strength={self.strength}: must be in (0, 1] (1 = ignore the input image's content)."
            )

    def __len__(self) -> int:
        return len(self.per_image)

    def inputs(self, indices: list[int]) -> dict[str, Any]:
        """Conditioning inputs for images `indices`: shared tensors (batch 1) + per-image lists."""
        out: dict[str, Any] = dict(self.shared)
        keys = dict.fromkeys(k for i in indices for k in self.per_image[i])
        for key in keys:
            values = [self.per_image[i][key] for i in indices]
            out[key] = torch.as_tensor(values) if isinstance(values[0], int) else values
        return out


def full_mask_inputs(size: tuple[int, int]) -> dict[str, Tensor]:
    """An inpainting model asked to generate everything: mask = 1, masked image = 0 (its null input)."""
    return {"masked_image": torch.zeros(1, 3, *size), "mask": torch.ones(1, 1, *size)}
