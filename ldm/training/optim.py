"""AdamW with linear warm-up and a constant or cosine schedule (no hidden LR scaling)."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from ldm.errors import UserError


def lr_lambda(
    step: int, warmup_steps: int, total_steps: int | None, schedule: str, min_lr_ratio: float
) -> float:
    """Multiplier of the base LR at `step`: linear warm-up, then constant or half-cosine to min_lr_ratio."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant" or not total_steps or total_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_adamw(
    params: Iterable[nn.Parameter],
    *,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    weight_decay: float = 0.0,
    warmup_steps: int = 0,
    schedule: str = "constant",
    min_lr_ratio: float = 0.0,
    total_steps: int | None = None,
) -> dict:
    """Lightning `configure_optimizers` dict for AdamW + a per-step LambdaLR."""
    if schedule not in ("constant", "cosine"):
        raise UserError(f"optim.schedule={schedule!r}: use 'constant' or 'cosine'.")
    if lr <= 0:
        raise UserError(f"optim.lr={lr}: the learning rate must be > 0.")
    params = [p for p in params if p.requires_grad]
    fused = bool(params) and all(p.is_cuda for p in params)
    optimizer = torch.optim.AdamW(
        params, lr=lr, betas=tuple(betas), weight_decay=weight_decay, fused=fused or None
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, warmup_steps, total_steps, schedule, min_lr_ratio)
    )
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
