"""Ancestral DDPM sampling (Ho et al. 2020, Algorithm 2) on any step schedule."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from ldm.samplers.base import Callback, Denoiser, Generator
from ldm.samplers.ddim import sample_ddim


def sample_ddpm(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: Mapping[str, Any] | None = None,
    callback: Callback | None = None,
    generator: Generator = None,
    disable: bool = False,
) -> Tensor:
    """Draw x_next ~ q(x_next | x, x0 = D(x)), the DDPM posterior (Ho et al. 2020, Eq. 6-7).

    That posterior is DDIM with eta = 1 (Song et al. 2021, Sec. 4.1), so this is one call; with all
    1000 training timesteps (StepSchedule(steps=1000, offset=0)) it is exactly Algorithm 2.
    """
    return sample_ddim(
        denoiser,
        x,
        sigmas,
        extra_args=extra_args,
        callback=callback,
        generator=generator,
        disable=disable,
        eta=1.0,
    )
