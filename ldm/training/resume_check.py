"""Resuming (`ckpt_path=`) from a checkpoint of another model: one line naming both runs and the first misfit.

Lightning's strict `load_state_dict` would otherwise print every missing and unexpected key in a long
traceback. Called from the LightningModules' `on_load_checkpoint`, before Lightning loads the weights.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from ldm.errors import UserError


def _experiment(config: Any) -> str:
    name = (config or {}).get("name") if isinstance(config, Mapping) else None
    return f"experiment {name}" if name else "an unnamed run"


def run_config_of(module: nn.Module) -> Mapping | None:
    """The resolved config this run stores in its checkpoints (held by the export callback), if any."""
    trainer = getattr(module, "_trainer", None)
    for callback in getattr(trainer, "callbacks", None) or ():
        config = getattr(callback, "config", None)
        if isinstance(config, Mapping) and "model" in config:
            return config
    return None


def check_resume_state(
    module: nn.Module, checkpoint: Mapping[str, Any], own: Mapping[str, Any] | None = None
) -> None:
    """Raise a UserError when the checkpoint's weights do not fit `module` (names, then shapes).

    `own`: the entries a checkpoint of this module holds (default: its whole state_dict; adapter runs
    checkpoint only the adapter)."""
    theirs = checkpoint.get("state_dict") or {}
    own = module.state_dict() if own is None else own
    missing = [k for k in own if k not in theirs]
    unexpected = [k for k in theirs if k not in own]
    shapes = [k for k in own if k in theirs and tuple(own[k].shape) != tuple(theirs[k].shape)]
    if not (missing or unexpected or shapes):
        return
    if shapes:
        k = shapes[0]
        first = f"{k} has shape {tuple(theirs[k].shape)} there and {tuple(own[k].shape)} here"
    elif missing:
        first = f"{missing[0]} is missing there"
    else:
        first = f"{unexpected[0]} is not in this model"
    counts = f"{len(missing)} missing, {len(unexpected)} unexpected, {len(shapes)} of another shape"
    raise UserError(
        f"ckpt_path: the checkpoint was written by {_experiment(checkpoint.get('ldm_config'))} and does not "
        f"fit this run's model ({_experiment(run_config_of(module))}): {first} ({counts}). Resume with the "
        "experiment and model options it was trained with, or start a new run from its weights "
        "(model.init_from=...)."
    )
