"""Optimizers chosen by `_target_` config, in one LR schedule: linear warm-up, then constant or cosine.

`model.optim` holds the schedule (lr, warmup_steps, schedule, min_lr_ratio), an optional `optimizer` (a
Hydra `_partial_` of one of the factories below, from conf/optim/*.yaml; default: torch AdamW) and any other
keys, which go to the optimizer (betas, weight_decay). The LR is used as given: no hidden scaling.

    params (or param groups, each may carry its own "lr") --optimizer--> torch Optimizer
    LambdaLR(step) = lr_lambda(step, ...) multiplies every group's LR (its own base LR kept)
"""

from __future__ import annotations

import importlib.util
import inspect
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ldm.errors import UserError

ParamsOrGroups = Iterable[nn.Parameter] | Iterable[dict[str, Any]]


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


def _groups(params: ParamsOrGroups) -> list[dict[str, Any]]:
    """Param groups with only trainable parameters; empty groups dropped."""
    items = list(params)
    groups = items if items and isinstance(items[0], dict) else [{"params": items}]
    out = []
    for g in groups:
        kept = [p for p in g["params"] if p.requires_grad]
        if kept:
            out.append({**g, "params": kept})
    return out


def _all_cuda(groups: list[dict[str, Any]]) -> bool:
    params = [p for g in groups for p in g["params"]]
    return bool(params) and all(p.is_cuda for p in params)


def fused_adamw_supported(groups: list[dict[str, Any]]) -> bool:
    """Whether torch has a fused AdamW kernel for every parameter (floating point, on CUDA, or on the CPU
    from torch 2.4; the device list is torch's own)."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        devices = set(_get_fused_kernels_supported_devices())
    except ImportError:  # older torch: CUDA only
        devices = {"cuda"}
    params = [p for g in groups for p in g["params"]]
    return bool(params) and all(p.device.type in devices and p.is_floating_point() for p in params)


# --- the optimizers (each: param groups, lr, its own options -> torch.optim.Optimizer) ------------------


def adamw(
    params: list[dict[str, Any]],
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    weight_decay: float = 0.0,
    eps: float = 1e-8,
    fused: bool | None = None,
) -> torch.optim.Optimizer:
    """torch AdamW (Loshchilov & Hutter 2019). fused=None: torch's single-kernel AdamW wherever it exists for
    every parameter (CUDA; CPU from torch 2.4), else torch's own choice (foreach on CUDA, the per-tensor loop
    on CPU). On the 2-core CPU the fused step of a 35M-parameter UNet takes ~1/4 of the loop's time and,
    unlike foreach, allocates no weight-sized temporary; results agree to float rounding (~1e-7).
    fused=true demands it (UserError where torch has none), fused=false keeps torch's own choice."""
    supported = fused_adamw_supported(params)
    if fused and not supported:
        devices = sorted({p.device.type for g in params for p in g["params"]})
        raise UserError(
            f"model.optim.fused=true: this torch ({torch.__version__}) has no fused AdamW for parameters on "
            f"{', '.join(devices)}; use model.optim.fused=null (fused where supported) or false."
        )
    return torch.optim.AdamW(
        params,
        lr=lr,
        betas=tuple(betas),
        weight_decay=weight_decay,
        eps=eps,
        fused=(supported if fused is None else fused) or None,
        foreach=None,
    )


def adamw_8bit(
    params: list[dict[str, Any]],
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    weight_decay: float = 0.0,
    eps: float = 1e-8,
) -> torch.optim.Optimizer:
    """8-bit AdamW from bitsandbytes (Dettmers et al. 2022): optimizer states in 8 bits; CUDA only."""
    if not _all_cuda(params):
        raise UserError(
            "optim=adamw_8bit: bitsandbytes' 8-bit AdamW runs on CUDA GPUs only, and this run's weights are "
            "on the CPU; use optim=adamw (or train with trainer=gpu on a CUDA machine)."
        )
    bnb = _require("bitsandbytes", "adamw_8bit")
    return bnb.optim.AdamW8bit(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay, eps=eps)


def adafactor(
    params: list[dict[str, Any]],
    lr: float,
    weight_decay: float = 0.0,
    beta2_decay: float = -0.8,
    betas: Any = None,  # accepted for configs written for AdamW; Adafactor keeps no first moment
) -> torch.optim.Optimizer:
    """torch Adafactor (Shazeer & Stern 2018; torch >= 2.5): factored second moments, no first moment."""
    if not hasattr(torch.optim, "Adafactor"):
        raise UserError(
            f"optim=adafactor needs torch >= 2.5 (this is {torch.__version__}); upgrade torch or use "
            "optim=adamw."
        )
    return torch.optim.Adafactor(params, lr=lr, weight_decay=weight_decay, beta2_decay=beta2_decay)


def prodigy(
    params: list[dict[str, Any]],
    lr: float = 1.0,
    betas: tuple[float, float] = (0.9, 0.999),
    weight_decay: float = 0.0,
    d_coef: float = 1.0,
    safeguard_warmup: bool = True,
    use_bias_correction: bool = True,
) -> torch.optim.Optimizer:
    """Prodigy (Mishchenko & Defazio 2023) from prodigyopt: estimates the step size; lr=1.0 means as found."""
    module = _require("prodigyopt", "prodigy")
    return module.Prodigy(
        params,
        lr=lr,
        betas=tuple(betas),
        weight_decay=weight_decay,
        d_coef=d_coef,
        safeguard_warmup=safeguard_warmup,
        use_bias_correction=use_bias_correction,
    )


def _require(package: str, name: str) -> Any:
    if importlib.util.find_spec(package) is None:
        raise UserError(
            f"optim={name} needs the package {package}, which is not installed: "
            f"pip install 'ldm[optim]' (or pip install {package}); or use optim=adamw."
        )
    return importlib.import_module(package)


# --- the schedule around any optimizer ----------------------------------------------------------------


def build_optimizer(
    params: ParamsOrGroups,
    *,
    lr: float,
    optimizer: Callable[..., torch.optim.Optimizer] | None = None,  # a factory above (Hydra _partial_)
    warmup_steps: int = 0,
    schedule: str = "constant",
    min_lr_ratio: float = 0.0,
    total_steps: int | None = None,
    **options: Any,  # the optimizer's own options (betas, weight_decay, ...)
) -> dict:
    """Lightning `configure_optimizers` dict: `optimizer` (default AdamW) + a per-step warm-up/decay LambdaLR.

    Param groups may carry their own `lr` (e.g. a trainable text encoder's); the schedule multiplies each.
    Raises UserError for an unknown schedule, lr <= 0, or an option the optimizer does not take."""
    if schedule not in ("constant", "cosine"):
        raise UserError(f"optim.schedule={schedule!r}: use 'constant' or 'cosine'.")
    if lr <= 0:
        raise UserError(f"optim.lr={lr}: the learning rate must be > 0.")
    factory = optimizer or adamw
    accepted = inspect.signature(factory).parameters
    unknown = [k for k in options if k not in accepted]
    if unknown and not any(p.kind is p.VAR_KEYWORD for p in accepted.values()):
        name = getattr(getattr(factory, "func", factory), "__name__", str(factory))
        raise UserError(
            f"optim.{unknown[0]}: the optimizer {name} takes no option {unknown[0]!r}; "
            f"its options are {', '.join(k for k in accepted if k not in ('params', 'lr'))}."
        )
    opt = factory(_groups(params), lr=lr, **options)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_lambda(s, warmup_steps, total_steps, schedule, min_lr_ratio)
    )
    return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def build_adamw(
    params: ParamsOrGroups,
    *,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    weight_decay: float = 0.0,
    warmup_steps: int = 0,
    schedule: str = "constant",
    min_lr_ratio: float = 0.0,
    total_steps: int | None = None,
) -> dict:
    """Lightning `configure_optimizers` dict for AdamW + a per-step LambdaLR (the stage-2 default)."""
    return build_optimizer(
        params,
        lr=lr,
        optimizer=adamw,
        betas=betas,
        weight_decay=weight_decay,
        warmup_steps=warmup_steps,
        schedule=schedule,
        min_lr_ratio=min_lr_ratio,
        total_steps=total_steps,
    )
