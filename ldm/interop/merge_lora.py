"""Merge LoRA files into a base model and write the result as one original-layout checkpoint.

    python -m ldm.interop.merge_lora BASE LORA [LORA ...] OUT.safetensors [--scales 0.8 0.5]
        [--config <yaml>] [--text-encoder <folder>] [--dtype fp32|fp16|bf16]

W' = W + sum_i scale_i * (alpha_i / r_i) * up_i @ down_i (Hu et al. 2022) for every layer each LoRA adapts,
UNet and text encoder. BASE loads as `ldm.interop.export.load_source` loads it (any file `load_model` reads;
a file's EMA UNet weights, when it has them, are what the LoRAs are merged into: the weights sampling uses),
the LoRAs as `ldm.adapters.lora_files.load_lora` reads them (kohya / AUTOMATIC1111 or diffusers / peft).
OUT is written like `python -m ldm.interop.export` writes (`original_state` + `save_original`: one set of
weights, no model_ema.*), with the original inference yaml beside it as OUT.yaml, so AUTOMATIC1111, ComfyUI,
diffusers' single-file loader and `load_model` read it as the base. Every file is checked before anything is
merged; OUT is written atomically and never over BASE or a LoRA.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from ldm.adapters.lora import merge_lora
from ldm.adapters.lora_files import load_lora
from ldm.errors import UserError
from ldm.interop.checkpoint import save_safetensors
from ldm.interop.export import (
    DTYPES,
    NoOriginalLayout,
    cast_state,
    load_source,
    original_state,
    original_yaml_text,
    save_original,
)

log = logging.getLogger(__name__)
USAGE = "python -m ldm.interop.merge_lora BASE LORA [LORA ...] OUT.safetensors"


def _same(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def check_arguments(
    base: Path,
    loras: Sequence[Path],
    out: Path,
    scales: Sequence[float] | None,
    config: Path | None = None,
) -> list[float]:
    """The scale of each LoRA (1.0 each when `scales` is None); UserError for a wrong count of scales, a
    missing LoRA file, OUT not a .safetensors name, or OUT (or the OUT.yaml written beside it) naming one of
    the inputs."""
    if not loras:
        raise UserError(
            "no LoRA file given: python -m ldm.interop.merge_lora BASE LORA [LORA ...] OUT.safetensors"
        )
    if scales is not None and len(scales) != len(loras):
        raise UserError(
            f"--scales has {len(scales)} value(s) for {len(loras)} LoRA file(s): give one scale per LoRA, in "
            "the same order (or none: 1.0 each)."
        )
    if out.suffix != ".safetensors":
        raise UserError(f"OUT={out}: the merged model is one original-layout file; name it *.safetensors.")
    for path in (base, *loras, *([config] if config is not None else [])):
        for written in (out, out.with_suffix(".yaml")):
            if _same(written, path):
                raise UserError(
                    f"OUT={out} would overwrite the input {path} (writing {written.name}); write the merged "
                    "model to a new file name."
                )
    for path in loras:
        if not path.is_file():
            raise UserError(f"LoRA file {path}: no such file; pass an existing LoRA .safetensors file.")
    return [1.0] * len(loras) if scales is None else [float(s) for s in scales]


def merge_files(
    base: str | os.PathLike,
    loras: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    scales: Sequence[float] | None = None,
    config: str | os.PathLike | None = None,
    text_encoder: str | None = None,
    dtype: str = "fp32",
) -> Path:
    """Merge `loras` (with `scales`, default 1.0 each) into `base` and write `out` (+ `out`.yaml).

    The original layout when the model has one; a model trained here with parts no original family has is
    written in our export layout with its run config (loadable with `load_model` / sample.py).

    All LoRAs are read and checked against the base before any is merged. Raises UserError (see
    `check_arguments`, `load_lora`, `load_source`) and writes nothing then."""
    base, out, paths = Path(base), Path(out), [Path(p) for p in loras]
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype}: not one of {', '.join(DTYPES)}.")
    factors = check_arguments(base, paths, out, scales, None if config is None else Path(config))
    source = load_source(base, config, text_encoder)
    model = source.model
    if source.ema:  # the weights sampling uses (load_model's use_ema=True): merge into those
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in source.ema.items():
                if name in params:
                    params[name].copy_(value.to(params[name].dtype))
    adapters = [load_lora(p, model) for p in paths]
    for path, adapter, scale in zip(paths, adapters, factors, strict=True):
        merge_lora(model, adapter, scale)
        log.info("merged %d layers of %s (scale %g)", len(adapter), path, scale)
    try:
        state = original_state(model, None, betas=source.betas)
    except NoOriginalLayout as e:
        # a model trained here with parts no original family has (MiniLM text encoder, pooled_context): our
        # export layout with the run config, which load_model / sample.py read like any train.py export
        log.warning("%s Writing our own export layout to %s instead (load it with ldm's load_model).", e, out)
        state = cast_state(model.export_state_dict(), dtype)
        save_safetensors(state, out, source.run_config)
        return out
    return save_original(state, out, dtype, original_yaml_text(source))


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit code (2 with one line on stderr for a user error)."""
    parser = argparse.ArgumentParser(
        prog="python -m ldm.interop.merge_lora", description=__doc__.split("\n")[0]
    )
    parser.add_argument("paths", nargs="+", help="BASE LORA [LORA ...] OUT.safetensors")
    parser.add_argument("--scales", nargs="+", type=float, default=None, help="one per LoRA (default 1.0)")
    parser.add_argument("--config", default=None, help="original inference yaml of BASE (if needed)")
    parser.add_argument("--text-encoder", default=None, help="tokenizer folder BASE needs (CLIP)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if len(args.paths) < 3:
            raise UserError(f"got {len(args.paths)} path(s); usage: {USAGE}")
        base, *loras, out = args.paths
        merge_files(
            base,
            loras,
            out,
            scales=args.scales,
            config=args.config,
            text_encoder=args.text_encoder,
            dtype=args.dtype,
        )
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["check_arguments", "main", "merge_files"]
