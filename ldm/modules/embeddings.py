"""Timestep embeddings for the diffusion UNet."""

import math

import torch
from torch import Tensor


def timestep_embedding(timesteps: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal timestep embedding (Ho et al. 2020, after Vaswani et al. 2017): [cos(t·f), sin(t·f)].

    `timesteps` is a (N,) tensor that may hold fractional values (DPM-Solver evaluates the model between
    integer steps); the frequencies are f_i = max_period^(-i / (dim // 2)), as in the CompVis code.
    """
    half = dim // 2
    # Same operation order as CompVis: at t ~ 1000 one ulp in a frequency moves the phase by ~1e-4.
    arange = torch.arange(half, dtype=torch.float32, device=timesteps.device)
    freqs = torch.exp(-math.log(max_period) * arange / half)  # (half,)
    args = timesteps.float()[:, None] * freqs[None]  # (N, half)
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (N, 2 * half)
    if dim % 2:  # odd widths get one zero channel so the output is exactly `dim` wide
        embedding = torch.nn.functional.pad(embedding, (0, 1))
    return embedding
