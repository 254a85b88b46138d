"""Speed switches for training, chosen by config: `torch.compile` and the channels-last memory format.

Both act on one plain module in place (the UNet, or a stage-1 autoencoder) and leave its names alone:

- compile: `nn.Module.compile` compiles the module's call, not the module. Unlike `torch.compile(module)`,
  which returns an `OptimizedModule` whose state dict says `_orig_mod.<name>`, the module stays what it was,
  so checkpoints, EMA (which reads `named_parameters()`), exports, resume and `load_state_dict` see the
  plain names. The first call compiles (seconds to minutes); a new input shape (static shapes), grad mode
  or train/eval state (preview sampling) compiles once more. Only a module's own `forward` is compiled: a
  module whose class lives in `torch.nn` (nn.Sequential) is skipped by TorchDynamo and runs eagerly.
- channels_last: 4-D weights and 4-D inputs in NHWC order (`torch.channels_last`); convolutions then run
  their NHWC kernels (cuDNN's tensor-core kernels in fp16/bf16 prefer them). Values are the same up to the
  summation order of the kernels (float tolerance).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ldm.errors import UserError

# torch.compile's modes (inductor): "default" balances compile time and speed; "reduce-overhead" adds CUDA
# graphs (small batches on a GPU); "max-autotune" also searches matmul/conv kernels (long first compile).
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")  # aot_eager / eager: for debugging and tests


def _to_channels_last(value: Any) -> Any:
    if isinstance(value, Tensor) and value.dim() == 4:
        return value.contiguous(memory_format=torch.channels_last)
    return value


def _inputs_channels_last(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Forward pre-hook: every 4-D tensor argument (N, C, H, W) in NHWC memory order."""
    return tuple(_to_channels_last(a) for a in args), {k: _to_channels_last(v) for k, v in kwargs.items()}


def check_speed_options(compile_mode: str, compile_backend: str = "inductor", where: str = "model") -> None:
    """Raise UserError for a compile mode or backend that torch.compile does not have."""
    if compile_mode not in COMPILE_MODES:
        raise UserError(f"{where}.compile_mode={compile_mode}: use one of {', '.join(COMPILE_MODES)}.")
    if compile_backend not in COMPILE_BACKENDS:
        raise UserError(
            f"{where}.compile_backend={compile_backend}: use one of {', '.join(COMPILE_BACKENDS)}."
        )


def prepare_for_speed(
    module: nn.Module,
    *,
    compile: bool = False,
    compile_mode: str = "default",
    channels_last: bool = False,
    compile_backend: str = "inductor",
    where: str = "model",
) -> nn.Module:
    """Apply the speed switches to `module` in place and return it (the same object, the same names).

    compile: `module.compile(mode=compile_mode, backend=compile_backend)` (compiles on the first call).
    channels_last: 4-D parameters/buffers and the 4-D tensor inputs of every call in NHWC memory order.
    `where` names the config section in errors. Raises UserError for an unknown mode or backend.
    """
    check_speed_options(compile_mode, compile_backend, where)
    if channels_last:
        module.to(memory_format=torch.channels_last)
        if not getattr(module, "_ldm_channels_last_hook", False):
            module.register_forward_pre_hook(_inputs_channels_last, with_kwargs=True)
            module._ldm_channels_last_hook = True
    if compile:
        # The mode is inductor's; the debugging backends take none. Static shapes (dynamic=False): a run
        # sees a few batch sizes (train, validation, previews), each compiled once; with dynamic shapes
        # torch 2.13 fails on `torch.randn(size, generator=...)` (the KL posterior draw) for a symbolic batch.
        mode = None if compile_mode == "default" or compile_backend != "inductor" else compile_mode
        module.compile(backend=compile_backend, mode=mode, dynamic=False)
    return module


def is_compiled(module: nn.Module) -> bool:
    """Whether `prepare_for_speed(compile=True)` (or `module.compile()`) was applied to `module`."""
    return getattr(module, "_compiled_call_impl", None) is not None
