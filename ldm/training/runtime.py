"""Run plumbing shared by the entry points: user-facing errors, resume paths, run folders, loggers."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from ldm.errors import UserError

log = logging.getLogger(__name__)
T = TypeVar("T")

# The run folder of the current `train()`: where ranks > 0 leave their error for rank zero to print.
_current_run_dir: Path | None = None


def find_user_error(error: BaseException | None) -> UserError | None:
    """The `UserError` behind `error` (Hydra's instantiate and Lightning wrap or chain them), if any."""
    while error is not None and not isinstance(error, UserError):
        error = error.__cause__ or error.__context__
    return error


def set_current_run_dir(run_dir: Path | None) -> None:
    global _current_run_dir
    _current_run_dir = None if run_dir is None else Path(run_dir)


def process_rank() -> int:
    """This process's global rank from the launchers' environment (as Lightning's rank_zero_only reads it)."""
    for key in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 0


def _world_size() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    value = os.environ.get("WORLD_SIZE", "1")
    return int(value) if value.isdigit() else 1


def rank_error_path(run_dir: Path, rank: int) -> Path:
    return Path(run_dir) / f".rank{rank}.error"


def leave_rank_error(run_dir: Path, rank: int, message: str) -> None:
    """Rank > 0: write the error for rank zero (whose own error is then only the lost peer)."""
    with contextlib.suppress(OSError):
        path = rank_error_path(run_dir, rank)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(message + "\n")
        os.replace(tmp, path)


def other_rank_error(run_dir: Path, wait_s: float = 0.0) -> str | None:
    """`(rank k) <message>` of the lowest rank that left one in `run_dir`, waiting up to `wait_s` for it."""
    deadline = time.monotonic() + wait_s
    while True:
        found = []
        for path in Path(run_dir).glob(".rank*.error"):
            rank = path.name[len(".rank") : -len(".error")]
            if rank.isdigit():
                found.append((int(rank), path))
        for rank, path in sorted(found):
            with contextlib.suppress(OSError):
                return f"(rank {rank}) {path.read_text().strip()}"
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.1)


def clear_rank_errors(run_dir: Path) -> None:
    """Rank zero at start: errors another run left in this folder are not ours."""
    for path in Path(run_dir).glob(".rank*.error"):
        with contextlib.suppress(OSError):
            path.unlink()


def user_errors_exit(fn: Callable[..., T]) -> Callable[..., T]:
    """Print a `UserError` (also when Hydra's instantiate wrapped it) as one line and exit 2.

    Under DDP a rank > 0 hands its error to rank zero (`<run_dir>/.rank<k>.error`) and exits 2 quietly;
    rank zero, which then fails on the lost peer (a gloo/NCCL error), prints that message instead.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - we re-raise everything that is not a user error
            error, rank, run_dir = find_user_error(e), process_rank(), _current_run_dir
            if rank > 0 and run_dir is not None:
                if error is None:
                    raise
                leave_rank_error(run_dir, rank, str(error))
                sys.exit(2)
            message = str(error) if error is not None else None
            if message is None and run_dir is not None:  # e.g. the collective error of a lost peer
                message = other_rank_error(run_dir, wait_s=3.0 if _world_size() > 1 else 0.0)
            if message is None:
                raise
            print(f"error: {message}", file=sys.stderr)
            sys.exit(2)

    return wrapper


def resolve_ckpt_path(ckpt_path: str | None, runs_dir: Path) -> str | None:
    """`last` -> the previous run's `checkpoints/last.ckpt` of this experiment; paths must exist and resume.

    The file is read here through the safe loader before Lightning reads it (through it again, see
    `SafeCheckpointIO`): pickles that hold code, random bytes, weights-only files and checkpoints of
    another Lightning version stop here with a message.
    """
    if ckpt_path in (None, "", "null"):
        return None
    if ckpt_path == "last":
        path = runs_dir / "latest" / "checkpoints" / "last.ckpt"
        if not path.is_file():
            raise UserError(
                f"ckpt_path=last: no previous run with a checkpoint under {runs_dir}/latest/checkpoints/. "
                "Start without ckpt_path, or pass ckpt_path=<path to a .ckpt>."
            )
        path = path.resolve()
        log.info("resuming from %s", path)
        shown = f"ckpt_path=last ({path})"
    else:
        path = Path(ckpt_path)
        if not path.is_file():
            raise UserError(
                f"ckpt_path={ckpt_path}: no such file. Pass a Lightning .ckpt written by train.py."
            )
        shown = f"ckpt_path={ckpt_path}"
    check_resumable(path, shown)
    return str(path)


def check_resumable(path: Path, shown: str) -> None:
    """The checkpoint holds the trainer state this Lightning restores (else a message, not a KeyError)."""
    from ldm.interop.checkpoint import load_checkpoint_file

    ckpt = load_checkpoint_file(path)  # weights_only=True; fails with a clear message before Lightning would
    if not isinstance(ckpt, dict) or ("loops" not in ckpt and "optimizer_states" not in ckpt):
        raise UserError(
            f"{shown} holds weights only (no trainer state), so it cannot resume a run. "
            "To start a new run from these weights use the experiment's init/fine-tune option instead."
        )
    missing = [k for k in ("state_dict", "optimizer_states", "loops") if k not in ckpt]
    if missing:
        version = ckpt.get("pytorch-lightning_version", "unknown")
        raise UserError(
            f"{shown} was written by another Lightning version ({version}; it has no {', '.join(missing)}), "
            "so it cannot resume a run here. Start a new run from its weights with the experiment's "
            "init/fine-tune option instead."
        )


def mark_latest(run_dir: Path, runs_dir: Path) -> None:
    """Point `<runs_dir>/latest` at this run, so `ckpt_path=last` and stage 2 find it.

    `runs_dir` is the experiment's folder (paths.runs_dir) wherever the run itself lives, created when
    missing (a `hydra.run.dir` elsewhere); the link is relative inside it, absolute to a run outside it.
    """
    link = Path(runs_dir) / "latest"
    run, runs = Path(run_dir).absolute(), Path(runs_dir).absolute()
    target = os.path.relpath(run, runs) if runs in run.parents else str(run)
    try:
        runs.mkdir(parents=True, exist_ok=True)
        tmp = runs / f".latest.{os.getpid()}"
        if tmp.is_symlink():
            tmp.unlink()
        tmp.symlink_to(target)
        os.replace(tmp, link)
    except OSError as e:  # e.g. a file system without symlinks
        log.warning("could not update %s: %s", link, e)


# Run folders this process holds the lock of: realpath -> [fd, depth] (the Hydra callback and train()
# both take it; a second flock on another fd of the same file would fail against ourselves).
_held_locks: dict[str, list[int]] = {}


@contextlib.contextmanager
def run_folder_lock(run_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on `<run_dir>/.lock` (which holds our PID) while a run uses the folder.

    Two runs with the same `hydra.run.dir` overwrote each other's checkpoints, export and config; the
    second now stops before writing anything. The kernel drops a `flock` when its process dies, so a
    killed run never leaves the folder locked. Re-entrant within one process.
    """
    try:
        import fcntl
    except ImportError:  # Windows: no flock; runs there are not protected against sharing a folder
        yield
        return
    key = os.path.realpath(run_dir)
    if key in _held_locks:
        _held_locks[key][1] += 1
        try:
            yield
        finally:
            _held_locks[key][1] -= 1
        return
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    fd = os.open(Path(run_dir) / ".lock", os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by children
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise UserError(
                f"hydra.run.dir={run_dir} is in use by another training run (PID {holder}); wait for it to "
                "end, or give this run its own folder (leave hydra.run.dir unset for a new timestamped one)."
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        _held_locks[key] = [fd, 1]
        try:
            yield
        finally:
            del _held_locks[key]
    finally:
        os.close(fd)  # releases the lock


class RunFolderLock(Callback):
    """Hydra callback (conf/train.yaml): lock the run folder before Hydra writes `.hydra/` into it.

    `train()` takes the same lock (re-entrant) for runs that do not come through Hydra's command line.
    Ranks > 0 (started into rank zero's folder) never take it.
    """

    def __init__(self) -> None:
        self._lock: contextlib.AbstractContextManager | None = None

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if process_rank() > 0:
            return
        try:
            run_dir = OmegaConf.select(config, "hydra.run.dir", default=None)
        except Exception:  # noqa: BLE001 - an unresolvable folder fails later with Hydra's own message
            return
        if not run_dir:
            return
        lock = run_folder_lock(Path(str(run_dir)))
        try:
            lock.__enter__()
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)  # SystemExit passes through Hydra's error reporting
        self._lock = lock

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self._lock is not None:
            self._lock.__exit__(None, None, None)
            self._lock = None


def resolved_config(cfg: DictConfig) -> dict:
    """The run config as plain containers (stored in checkpoints and exports; weights_only-safe)."""
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)  # type: ignore[return-value]


def check_required(cfg: DictConfig, keys: list[str]) -> None:
    """Fail with the key name (and how to set it) when a required `???` value is missing."""
    missing = [k for k in keys if OmegaConf.is_missing(cfg, k) if OmegaConf.select(cfg, k.rsplit(".", 1)[0])]
    for key in missing:
        raise UserError(f"config value {key} is required: pass {key}=... on the command line.")
