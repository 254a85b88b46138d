"""Per-step hooks for the samplers' `callback`: blending known latents for inpainting / outpainting."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor

from ldm.samplers.base import Generator, randn_like


def inpaint_callback(
    x0_known: Tensor,  # (B, C, h, w) clean latents of the image being edited
    mask: Tensor,  # (B or 1, 1, h, w) at latent size; 1 = generate, 0 = keep (the batch "mask" contract)
    generator: Generator = None,  # noise for re-noising the known region; per image like the sampler's
    previous: Callable[[dict[str, Any]], Tensor | None] | None = None,  # an earlier callback to run first
) -> Callable[[dict[str, Any]], Tensor]:
    """After each step, replace the kept region by x0_known noised to sigma_next (RePaint-style paste;
    CompVis DDIM `mask`/`x0`, Lugmayr et al. 2022). At sigma_next = 0 the kept region is x0_known exactly.
    """

    def callback(info: dict[str, Any]) -> Tensor:
        x = info["x"]
        if previous is not None:
            out = previous(info)
            x = x if out is None else out
        known = x0_known + info["sigma_next"] * randn_like(x0_known, generator)
        return mask * x + (1 - mask) * known

    return callback
