"""Builders for the pieces of original CompVis / Stability checkpoints, looked up by the yaml's `target`.

An original inference yaml names classes of the original code (`ldm.modules.encoders.modules.
FrozenOpenCLIPEmbedder`, `ldm.models.autoencoder.VQModelInterface`, ...). Each family module under
`ldm.interop.families` registers one builder per class *name* (the last dotted component), so
`ldm.interop.compvis` never grows an if/elif chain:

- `@first_stage("VQModelInterface")`: `fn(params: dict) -> (autoencoder nn.Module, its _target_ config)`
  where `params` is `first_stage_config.params`; the module may be built on the meta device (weights are
  loaded with `assign=True` from `first_stage_model.*` afterwards).
- `@cond_stage("ClassEmbedder")`: `fn(ctx: BuildContext) -> {name: BaseConditioner}`; the builder loads
  its own weights from `ctx.state` (keys under `cond_stage_model.`) and raises `UserError` naming the
  user's yaml key or checkpoint key when they do not fit.
- `@model_kind("LatentUpscaleDiffusion")`: `fn(ctx: BuildContext) -> {name: BaseConditioner}`: extra
  conditioners a LatentDiffusion subclass adds (the x4 upscaler's noise-augmented low-res image).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor, nn

FIRST_STAGE: dict[str, Callable[[dict], tuple[nn.Module, dict]]] = {}
COND_STAGE: dict[str, Callable[[BuildContext], dict[str, nn.Module]]] = {}
MODEL_KIND: dict[str, Callable[[BuildContext], dict[str, nn.Module]]] = {}
# Export back (ldm.interop.export): our conditioner class name -> exporters, tried in order; each returns the
# conditioner's tensors under the original names, or None when it is not the original kind it writes.
COND_EXPORT: dict[str, list[Callable[[nn.Module, nn.Module], dict[str, Tensor] | None]]] = {}


@dataclass
class BuildContext:
    """What a cond-stage or model-kind builder may read."""

    params: Mapping[str, Any]  # `model.params` of the yaml
    state: Mapping[str, Tensor]  # the whole checkpoint state dict (original names)
    yaml_path: Path
    text_encoder: str | None = None  # sample.py `text_encoder=`: a local tokenizer / text-model folder
    latent_channels: int = 4
    first_stage: nn.Module | None = None  # the built autoencoder (for `__is_first_stage__`)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def cond_target(self) -> str:
        """`cond_stage_config.target`, or the sentinel string the yaml gives instead of a mapping."""
        cfg = self.params.get("cond_stage_config")
        return cfg if isinstance(cfg, str) else str((cfg or {}).get("target", ""))

    @property
    def conditioning_key(self) -> str | None:
        """crossattn | concat | hybrid | adm, or None for an unconditional model (CompVis' rules: an unset
        key means `concat` when `concat_mode` (default true), else `crossattn`)."""
        if self.cond_target in ("__is_unconditional__", ""):
            return None
        key = self.params.get("conditioning_key")
        if key is None:
            key = "concat" if self.params.get("concat_mode", True) else "crossattn"
        return str(key)

    @property
    def cond_params(self) -> dict[str, Any]:
        """`cond_stage_config.params` (empty for `__is_first_stage__` / `__is_unconditional__`)."""
        cfg = self.params.get("cond_stage_config")
        return dict((cfg or {}).get("params") or {}) if isinstance(cfg, Mapping) else {}

    def where(self, key: str) -> str:
        """A yaml key as the user sees it, for messages: `<yaml>: model.params.<key>`."""
        return f"{self.yaml_path}: model.params.{key}"


def class_name(target: Any) -> str:
    """`ldm.modules.encoders.modules.ClassEmbedder` -> `ClassEmbedder` (and sentinel strings as they are)."""
    return str(target or "").rsplit(".", 1)[-1]


def _register(table: dict, names: tuple[str, ...]) -> Callable[[Callable], Callable]:
    def deco(fn: Callable) -> Callable:
        for name in names:
            table[name] = fn
        return fn

    return deco


def first_stage(*names: str) -> Callable[[Callable], Callable]:
    return _register(FIRST_STAGE, names)


def cond_stage(*names: str) -> Callable[[Callable], Callable]:
    return _register(COND_STAGE, names)


def model_kind(*names: str) -> Callable[[Callable], Callable]:
    return _register(MODEL_KIND, names)


def cond_export(*names: str) -> Callable[[Callable], Callable]:
    """`@cond_export("ClassEmbedder")`: `fn(conditioner, model: LatentDiffusion) -> {original key: tensor}`
    (None: not this exporter's kind), the inverse of the `@cond_stage` builder beside it."""

    def deco(fn: Callable) -> Callable:
        for name in names:
            COND_EXPORT.setdefault(name, []).append(fn)
        return fn

    return deco


def load_families() -> None:
    """Import every family module once so their builders are registered."""
    import ldm.interop.families  # noqa: F401
