"""Run plumbing shared by the entry points: user-facing errors, resume paths, run folders, loggers."""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf

from ldm.errors import UserError

log = logging.getLogger(__name__)
T = TypeVar("T")


def user_errors_exit(fn: Callable[..., T]) -> Callable[..., T]:
    """Print a `UserError` (also when Hydra's instantiate wrapped it) as one line and exit 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - we re-raise everything that is not a user error
            err: BaseException | None = e
            while err is not None and not isinstance(err, UserError):
                err = err.__cause__ or err.__context__
            if err is None:
                raise
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)

    return wrapper


def resolve_ckpt_path(ckpt_path: str | None, runs_dir: Path) -> str | None:
    """`last` -> the previous run's `checkpoints/last.ckpt` of this experiment; paths must exist."""
    if ckpt_path in (None, "", "null"):
        return None
    if ckpt_path == "last":
        path = runs_dir / "latest" / "checkpoints" / "last.ckpt"
        if not path.is_file():
            raise UserError(
                f"ckpt_path=last: no previous run with a checkpoint under {runs_dir}/latest/checkpoints/. "
                "Start without ckpt_path, or pass ckpt_path=<path to a .ckpt>."
            )
        log.info("resuming from %s", path.resolve())
        return str(path.resolve())
    path = Path(ckpt_path)
    if not path.is_file():
        raise UserError(f"ckpt_path={ckpt_path}: no such file. Pass a Lightning .ckpt written by train.py.")
    from ldm.interop.checkpoint import load_checkpoint_file

    ckpt = load_checkpoint_file(path)  # fails with a clear message before Lightning would
    if "loops" not in ckpt and "optimizer_states" not in ckpt:
        raise UserError(
            f"ckpt_path={ckpt_path} holds weights only (no trainer state), so it cannot resume a run. "
            "To start a new run from these weights use the experiment's init/fine-tune option instead."
        )
    return str(path)


def mark_latest(run_dir: Path, runs_dir: Path) -> None:
    """Point `<runs_dir>/latest` at this run, so `ckpt_path=last` and stage 2 find it."""
    link = runs_dir / "latest"
    try:
        tmp = runs_dir / f".latest.{os.getpid()}"
        if tmp.is_symlink():
            tmp.unlink()
        tmp.symlink_to(os.path.relpath(run_dir, runs_dir))
        os.replace(tmp, link)
    except OSError as e:  # e.g. a file system without symlinks
        log.warning("could not update %s: %s", link, e)


def resolved_config(cfg: DictConfig) -> dict:
    """The run config as plain containers (stored in checkpoints and exports; weights_only-safe)."""
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)  # type: ignore[return-value]


def check_required(cfg: DictConfig, keys: list[str]) -> None:
    """Fail with the key name (and how to set it) when a required `???` value is missing."""
    missing = [k for k in keys if OmegaConf.is_missing(cfg, k) if OmegaConf.select(cfg, k.rsplit(".", 1)[0])]
    for key in missing:
        raise UserError(f"config value {key} is required: pass {key}=... on the command line.")
