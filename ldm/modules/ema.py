"""Exponential moving average of a module's weights, kept as buffers (CompVis `LitEma` layout).

We keep EMA inside the LightningModule rather than using Lightning's `EMAWeightAveraging` callback because
(1) only the UNet (and trainable conditioners) are averaged, not the frozen autoencoder or text encoder,
(2) CompVis checkpoints store it as `model_ema.<name without dots>` buffers plus `decay`/`num_updates`, which
lets released checkpoints load as they are, and (3) the warm-up `min(decay, (1+n)/(10+n))` of LDM.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


class EMA(nn.Module):
    """Shadow weights w_ema <- d * w_ema + (1 - d) * w, with LDM's warm-up d_n = min(d, (1+n)/(10+n))."""

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True) -> None:
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.warmup = warmup
        self.register_buffer("decay", torch.tensor(decay, dtype=torch.float32))
        self.register_buffer("num_updates", torch.tensor(0, dtype=torch.int64))
        self._names: dict[str, str] = {}  # parameter name -> buffer name (dots removed, as CompVis)
        for name, p in model.named_parameters():
            if p.requires_grad:
                buffer_name = name.replace(".", "")
                self._names[name] = buffer_name
                self.register_buffer(buffer_name, p.detach().clone().float())

    def current_decay(self) -> float:
        """Decay used by the next update (warm-up keeps early averages from lagging behind)."""
        d = float(self.decay)
        if self.warmup:
            n = int(self.num_updates) + 1
            d = min(d, (1 + n) / (10 + n))
        return d

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One EMA step from the model's current parameters."""
        d = self.current_decay()
        self.num_updates += 1
        params = dict(model.named_parameters())
        shadows, currents = [], []
        for name, buffer_name in self._names.items():
            shadows.append(getattr(self, buffer_name))
            currents.append(params[name].detach().to(torch.float32))
        torch._foreach_lerp_(shadows, currents, 1.0 - d)

    def _pairs(self, model: nn.Module) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        params = dict(model.named_parameters())
        for name, buffer_name in self._names.items():
            yield params[name], getattr(self, buffer_name)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite the model's parameters with the EMA weights."""
        for p, shadow in self._pairs(model):
            p.copy_(shadow.to(p.dtype))

    def averaged_state(self, model: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
        """The model's state dict with EMA values in place of averaged parameters (for export)."""
        state = {prefix + k: v for k, v in model.state_dict().items()}
        for name, buffer_name in self._names.items():
            state[prefix + name] = getattr(self, buffer_name).to(state[prefix + name].dtype)
        return state

    @contextmanager
    def swapped_in(self, model: nn.Module) -> Iterator[None]:
        """Use the EMA weights inside the block, then restore the training weights."""
        backup = [p.detach().clone() for p, _ in self._pairs(model)]
        self.copy_to(model)
        try:
            yield
        finally:
            with torch.no_grad():
                for (p, _), saved in zip(self._pairs(model), backup):
                    p.copy_(saved)
