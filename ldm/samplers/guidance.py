"""Classifier-free guidance (Ho & Salimans 2021) as one wrapper around any denoiser."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ldm.errors import UserError
from ldm.samplers.base import Denoiser


def _cat_cond(uncond: Mapping[str, Any], cond: Mapping[str, Any]) -> dict[str, Any]:
    """Stack uncond and cond along the batch: {k: cat([uncond[k], cond[k]])}; None stays None."""
    if set(uncond) != set(cond):
        raise UserError(
            f"classifier-free guidance: the unconditional keys {sorted(uncond)} differ from the "
            f"conditional keys {sorted(cond)}; give both the same conditioning fields"
        )
    out = {}
    for key, c in cond.items():
        u = uncond[key]
        if c is None and u is None:
            out[key] = None
        elif isinstance(c, Tensor) and isinstance(u, Tensor):
            out[key] = torch.cat([u, c])
        else:
            raise UserError(
                f"classifier-free guidance: conditioning {key!r} must be a tensor in cond and uncond"
            )
    return out


class ClassifierFreeGuidance(nn.Module):
    """D = D_u + scale (D_c - D_u) (Ho & Salimans 2021, Eq. 6), both from one batched call.

    The combination is affine, so it is the same in eps, v or x0 space. `uncond` holds the
    unconditional (or negative-prompt) conditioning with the same keys as the conditional kwargs;
    its tensors have batch size B, or 1 to be repeated. scale = 1 or uncond = None skips it.
    """

    def __init__(
        self, denoiser: Denoiser, scale: float = 7.5, uncond: Mapping[str, Any] | None = None
    ) -> None:
        super().__init__()
        self.denoiser = denoiser
        self.scale = scale  # 1: no guidance; SD v1 samples are usually made with 5-9
        self.uncond = dict(uncond) if uncond is not None else None

    def forward(self, x: Tensor, sigma: Tensor, **cond: Any) -> Tensor:
        """The guided denoised estimate; batch order [uncond, cond] as in CompVis."""
        if self.uncond is None or self.scale == 1.0:
            return self.denoiser(x, sigma, **cond)
        batch = x.shape[0]
        uncond = {
            k: (v.expand(batch, *v.shape[1:]) if isinstance(v, Tensor) and v.shape[0] == 1 else v)
            for k, v in self.uncond.items()
        }
        sigma = sigma.expand(batch)
        both = self.denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), **_cat_cond(uncond, cond))
        denoised_uncond, denoised_cond = both.chunk(2)
        return denoised_uncond + self.scale * (denoised_cond - denoised_uncond)
