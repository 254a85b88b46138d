"""Safe checkpoint I/O: safetensors first, `torch.load(weights_only=True)` for `.ckpt`; never runs code.

Every file is written atomically beside its target (`atomic_path`): a temp file in the same folder,
flushed and fsynced, `os.replace`d over the target, then the folder fsynced. A kill or a full disk in
the middle leaves the previous file as it was and nothing under the target's name.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import pickle
import pickletools
import shutil
import tempfile
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ldm.errors import UserError

CONFIG_KEY = "config"
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def _check_file(path: Path, what: str) -> None:
    if not path.exists():
        raise UserError(
            f"{what} not found: {path}. Pass an existing file (absolute path or relative to cwd)."
        )
    if path.is_dir():
        raise UserError(
            f"{what} is a folder: {path}. Pass the checkpoint file inside it (e.g. model.safetensors)."
        )


def _disk_full(error: BaseException, folder: Path) -> bool:
    """ENOSPC/EDQUOT anywhere in the chain (torch.save wraps a failed write in a RuntimeError)."""
    err: BaseException | None = error
    while err is not None:
        if isinstance(err, OSError) and err.errno in _DISK_FULL:
            return True
        err = err.__cause__ or err.__context__
    with contextlib.suppress(OSError):  # torch's C++ writer drops the errno: a full disk still shows
        return "write" in str(error) and shutil.disk_usage(folder).free == 0
    return False


def _fsync_folder(folder: Path) -> None:
    """Make a rename in `folder` durable (a no-op where folders cannot be opened, e.g. Windows)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside `path` to write; on success it replaces `path` durably, on any error
    (a kill's KeyboardInterrupt/SystemExit included) it is removed and `path` stays as it was.

    A full disk raises a `UserError` naming the file. Same folder = same file system, so `os.replace`
    is atomic (a temp file under $TMPDIR would be copied over the target, non-atomically).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:  # what was written, on disk before the rename makes it visible
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _file_mode(path))  # mkstemp's 0600 would hide checkpoints from the user's group
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(e, Exception) and _disk_full(e, path.parent):
            raise UserError(
                f"disk full while writing {path}: free space or move paths.output_dir to a disk with room "
                "(the previous file under that name, if any, is intact)."
            ) from None
        raise
    _fsync_folder(path.parent)


def _file_mode(path: Path) -> int:
    """The mode a plain `open(path, "w")` would give: the existing file's, else 0666 less the umask."""
    try:
        return path.stat().st_mode & 0o777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def save_checkpoint_file(checkpoint: dict[str, Any], path: str | os.PathLike) -> Path:
    """`torch.save` a checkpoint atomically (see `atomic_path`)."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(checkpoint, f)  # a Python file: a failed write keeps its OSError (errno) in the chain
    return path


def _file_kind(path: Path) -> str:
    """'zip' (torch.save's format), 'pickle' (legacy torch.save or a bare pickle), 'empty' or 'other'."""
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        return "empty"
    if head.startswith(b"PK"):
        return "zip"
    if head[0] == 0x80 and 2 <= head[1] <= 5:  # pickle PROTO opcode
        return "pickle"
    return "other"


def _well_formed_pickle(path: Path, kind: str) -> bool:
    """Whether the (first) pickle in the file parses, read opcode by opcode: nothing is executed."""
    try:
        if kind == "zip":
            with zipfile.ZipFile(path) as archive:
                name = next(n for n in archive.namelist() if n.endswith("data.pkl"))
                stream: Any = io.BytesIO(archive.read(name))
        else:
            stream = open(path, "rb")  # noqa: SIM115 - closed below
        with stream:
            for _ in pickletools.genops(stream):
                pass
        return True
    except Exception:  # noqa: BLE001 - any parse failure means "not a pickle"
        return False


def _first_sentence(text: str) -> str:
    """torch's errors run to paragraphs; one line of it is enough next to ours."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line.split(". ")[0].rstrip(".")[:200]


def _not_a_checkpoint(path: Path, why: str) -> UserError:
    return UserError(
        f"{path} is not a checkpoint ({why}). Pass a .ckpt written by train.py or Lightning, or a "
        ".safetensors file."
    )


def load_checkpoint_file(path: str | os.PathLike, what: str = "checkpoint") -> dict[str, Any]:
    """Load a Lightning/CompVis `.ckpt` with `weights_only=True`, explaining files that need more.

    The one reader of `.ckpt` files: `train.py` (resume), Lightning (through `SafeCheckpointIO`),
    sample.py and the converters all come here, so a pickle that holds code is never unpickled.
    """
    path = Path(path)
    _check_file(path, what)
    kind = _file_kind(path)
    if kind == "empty":
        raise _not_a_checkpoint(path, "the file is empty, 0 bytes; was its save interrupted?")
    if kind == "other":
        raise _not_a_checkpoint(path, "neither a PyTorch archive nor a pickle")
    try:
        with warnings.catch_warnings():  # torch's note on pickle protocols: noise next to our own message
            warnings.filterwarnings("ignore", message=r".*pickle protocol.*", category=UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if not _well_formed_pickle(path, kind):
            raise _not_a_checkpoint(path, "its contents do not parse as a pickle") from None
        lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
        first = next((line for line in lines if "GLOBAL" in line or "Unsupported" in line), None)
        said = f" (torch.load weights_only=True said: {_first_sentence(first)})" if first else ""
        raise UserError(
            f"{path} stores Python objects besides tensors, so it cannot be loaded safely{said}. If you "
            f"trust the file, convert it once with "
            f"`python -m ldm.interop.convert {path} OUT.safetensors --trust-pickle` and use the output."
        ) from None
    except (RuntimeError, EOFError, OSError, KeyError, ValueError) as e:
        raise UserError(
            f"{path} is not a readable checkpoint ({type(e).__name__}: {_first_sentence(str(e))}); "
            "is it truncated?"
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
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    metadata = {"format": "pt"}
    if config is not None:
        metadata[CONFIG_KEY] = json.dumps(config)
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)
    if config is not None:
        from omegaconf import OmegaConf

        with atomic_path(path.parent / "config.yaml") as tmp:
            OmegaConf.save(OmegaConf.create(config), tmp)
    return path


def strip_prefix(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Keys under `prefix` with it removed (e.g. 'first_stage_model.' of a CompVis checkpoint)."""
    return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
