"""Safe checkpoint I/O: safetensors first, `torch.load(weights_only=True)` for `.ckpt`; never runs code."""

from __future__ import annotations

import json
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ldm.errors import UserError

CONFIG_KEY = "config"


def _check_file(path: Path, what: str) -> None:
    if not path.exists():
        raise UserError(
            f"{what} not found: {path}. Pass an existing file (absolute path or relative to cwd)."
        )
    if path.is_dir():
        raise UserError(
            f"{what} is a folder: {path}. Pass the checkpoint file inside it (e.g. model.safetensors)."
        )


def load_checkpoint_file(path: str | os.PathLike, what: str = "checkpoint") -> dict[str, Any]:
    """Load a Lightning/CompVis `.ckpt` with `weights_only=True`, explaining files that need more."""
    path = Path(path)
    _check_file(path, what)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"{path} stores Python objects besides tensors, so it cannot be loaded safely "
            f"(torch.load weights_only=True said: {first}). If you trust the file, convert it once with "
            f"`python -m ldm.interop.convert {path} OUT.safetensors --trust-pickle` and use the output."
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise UserError(
            f"{path} is not a readable checkpoint ({type(e).__name__}: {e}); is it truncated?"
        ) from None


def load_state_dict(
    path: str | os.PathLike, what: str = "checkpoint"
) -> tuple[dict[str, torch.Tensor], dict | None]:
    """Return (state_dict, config or None) from `.safetensors` or a `.ckpt`/`.pt`/`.pth` file."""
    path = Path(path)
    _check_file(path, what)
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                metadata = f.metadata() or {}
                state = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError) as e:
            raise UserError(f"{path} is not a valid safetensors file ({e}); is it truncated?") from None
        config = json.loads(metadata[CONFIG_KEY]) if CONFIG_KEY in metadata else None
        if config is None and (path.parent / "config.yaml").is_file():
            from omegaconf import OmegaConf

            config = OmegaConf.to_container(OmegaConf.load(path.parent / "config.yaml"), resolve=True)
        return state, config
    ckpt = load_checkpoint_file(path, what)
    if not isinstance(ckpt, dict):
        raise UserError(f"{path} holds a {type(ckpt).__name__}, not a state dict or a Lightning checkpoint.")
    state = ckpt.get("state_dict", ckpt)
    if not isinstance(state, dict):
        raise UserError(f"{path}: 'state_dict' is a {type(state).__name__}, expected a dict of tensors.")
    state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    return state, ckpt.get("ldm_config")


def save_safetensors(
    state_dict: dict[str, torch.Tensor], path: str | os.PathLike, config: dict | None
) -> Path:
    """Write weights atomically as safetensors; the run config goes in metadata and config.yaml beside it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    metadata = {"format": "pt"}
    if config is not None:
        metadata[CONFIG_KEY] = json.dumps(config)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    if config is not None:
        from omegaconf import OmegaConf

        OmegaConf.save(OmegaConf.create(config), path.parent / "config.yaml")
    return path


def strip_prefix(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Keys under `prefix` with it removed (e.g. 'first_stage_model.' of a CompVis checkpoint)."""
    return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
