"""Strategy builders for configs that name module classes by import path (Hydra cannot pass classes)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hydra.utils import get_class
from pytorch_lightning.strategies import FSDPStrategy


def fsdp(
    wrap_modules: Sequence[str],  # each instance becomes its own FSDP unit (sharded, gathered per block)
    checkpoint_modules: Sequence[str] = (),  # recompute these blocks' activations in backward
    **kwargs: Any,  # FSDPStrategy options: sharding_strategy, state_dict_type, cpu_offload, ...
) -> FSDPStrategy:
    """Lightning's FSDPStrategy with wrap/checkpoint policies given as class paths."""
    wrap = {get_class(path) for path in wrap_modules}
    ckpt = {get_class(path) for path in checkpoint_modules} or None
    return FSDPStrategy(auto_wrap_policy=wrap, activation_checkpointing_policy=ckpt, **kwargs)
