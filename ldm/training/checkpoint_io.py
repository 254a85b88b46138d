"""Lightning's checkpoint reads and writes routed through `ldm.interop.checkpoint`: atomic and safe.

Lightning's own `TorchCheckpointIO` writes through an fsspec transaction: a temp file under $TMPDIR that
is moved over the target at the end, which is a copy (not a rename) when the run folder lives on another
file system, so a kill during it left `last.ckpt` truncated. It also reads with `torch.load`, outside our
safe loader. `SafeCheckpointIO` writes beside the target (temp file, fsync, `os.replace`) and reads with
`load_checkpoint_file` (weights only). Every trainer config lists it under `plugins`, and `train.py`
refuses a trainer whose strategy ended up with another one (`require_safe_checkpoint_io`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lightning_fabric.utilities.types import _PATH
from pytorch_lightning.plugins.io import TorchCheckpointIO

from ldm.errors import UserError
from ldm.interop.checkpoint import load_checkpoint_file, save_checkpoint_file


class SafeCheckpointIO(TorchCheckpointIO):
    """Atomic same-folder writes, a clear error on a full disk, weights-only reads."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options (local files only)")
        save_checkpoint_file(checkpoint, path)

    def load_checkpoint(
        self,
        path: _PATH,
        map_location: Callable | None = None,  # always CPU; Lightning moves the state to the device
        weights_only: bool | None = None,  # always True: checkpoints hold tensors and plain containers
    ) -> dict[str, Any]:
        return load_checkpoint_file(path)


def require_safe_checkpoint_io(trainer: Any) -> None:
    """Install `SafeCheckpointIO` where Lightning's default is still in place; refuse any other plugin.

    A config that drops `trainer.plugins` (or a test that builds its own Trainer) still gets atomic
    checkpoints; a foreign CheckpointIO would write or read checkpoints around both guarantees.
    """
    strategy = trainer.strategy
    current = strategy.checkpoint_io
    if isinstance(current, SafeCheckpointIO):
        return
    if type(current) is TorchCheckpointIO:  # Lightning's default: nobody asked for it
        strategy.checkpoint_io = SafeCheckpointIO()
        return
    raise UserError(
        f"trainer.plugins: checkpoint IO {type(current).__name__} would write checkpoints non-atomically or "
        "read them unsafely; use ldm.training.checkpoint_io.SafeCheckpointIO (conf/trainer/default.yaml)."
    )
