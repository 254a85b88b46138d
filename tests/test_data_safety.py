"""Checkpoint files: atomic writes on any file system, a full disk, and the one safe loader (issue 14)."""

from __future__ import annotations

import errno
import os
import pickle
import tempfile
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from ldm_fixtures import bare_trainer
from pytorch_lightning.plugins.io import TorchCheckpointIO
from safetensors.torch import load_file

import ldm.interop.checkpoint as checkpoint_module
from ldm.errors import UserError
from ldm.interop.checkpoint import load_checkpoint_file, save_safetensors
from ldm.training.checkpoint_io import SafeCheckpointIO, require_safe_checkpoint_io
from ldm.training.runtime import resolve_ckpt_path

CONF = Path(__file__).resolve().parents[1] / "conf"


def _checkpoint(step: int) -> dict:
    """What a Lightning checkpoint holds, in miniature (tensors and plain containers)."""
    return {
        "global_step": step,
        "state_dict": {"w": torch.full((64, 64), float(step))},
        "optimizer_states": [{"state": {}, "param_groups": []}],
        "loops": {"fit_loop": {}},
        "pytorch-lightning_version": "2.6.6",
    }


@pytest.fixture
def other_tmpdir(tmp_path, monkeypatch) -> Path:
    """$TMPDIR on "another file system": a folder apart from the run folder (where Lightning wrote)."""
    other = tmp_path / "other_fs_tmp"
    other.mkdir()
    monkeypatch.setenv("TMPDIR", str(other))
    monkeypatch.setattr(tempfile, "tempdir", str(other))
    return other


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_kill_during_a_save_keeps_the_previous_last_ckpt(tmp_path, other_tmpdir, monkeypatch):
    ckpt_dir = tmp_path / "run" / "checkpoints"
    last = ckpt_dir / "last.ckpt"
    io = SafeCheckpointIO()
    io.save_checkpoint(_checkpoint(2), last)

    real_save, written_to = torch.save, []

    def killed_half_way(obj, f, *args, **kwargs):  # the process dies after part of the file is out
        written_to.append(Path(f.name))
        f.write(b"PK\x03\x04" + b"\0" * 4096)
        raise KeyboardInterrupt  # what a kill looks like from inside: nothing after this line runs

    monkeypatch.setattr(torch, "save", killed_half_way)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint(_checkpoint(4), last)
    monkeypatch.setattr(torch, "save", real_save)

    assert written_to[0].parent == ckpt_dir  # the temp file sits beside the target, not under $TMPDIR
    assert written_to[0] != last
    kept = load_checkpoint_file(last)
    assert kept["global_step"] == 2 and torch.equal(kept["state_dict"]["w"], torch.full((64, 64), 2.0))
    assert _leftovers(ckpt_dir) == [] and list(other_tmpdir.iterdir()) == []
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["last.ckpt"]

    io.save_checkpoint(_checkpoint(6), last)  # the next save replaces it whole
    assert load_checkpoint_file(last)["global_step"] == 6 and _leftovers(ckpt_dir) == []


def test_kill_during_an_export_keeps_the_previous_safetensors(tmp_path, other_tmpdir, monkeypatch):
    path = tmp_path / "run" / "model.safetensors"
    save_safetensors({"w": torch.ones(8)}, path, {"name": "first"})

    def killed_half_way(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 100)
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint_module, "save_file", killed_half_way)
    with pytest.raises(KeyboardInterrupt):
        save_safetensors({"w": torch.zeros(8)}, path, {"name": "second"})
    assert torch.equal(load_file(path)["w"], torch.ones(8))
    assert _leftovers(path.parent) == [] and list(other_tmpdir.iterdir()) == []


class _FullDisk:
    """A file that takes `room` bytes, then fails as a full disk does."""

    def __init__(self, f, room: int) -> None:
        self._f, self._room = f, room

    def write(self, data) -> int:
        if len(data) > self._room:
            self._f.write(bytes(data)[: self._room])
            raise OSError(errno.ENOSPC, "No space left on device")
        self._room -= len(data)
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def test_disk_full_is_one_clear_error_and_leaves_no_truncated_checkpoint(tmp_path, monkeypatch):
    ckpt_dir = tmp_path / "run" / "checkpoints"
    SafeCheckpointIO().save_checkpoint(_checkpoint(2), ckpt_dir / "last.ckpt")

    def open_on_a_full_disk(file, mode="r", *args, **kwargs):
        f = open(file, mode, *args, **kwargs)  # noqa: SIM115
        return _FullDisk(f, room=10_000) if "w" in mode else f

    monkeypatch.setattr(checkpoint_module, "open", open_on_a_full_disk, raising=False)
    target = ckpt_dir / "step000004.ckpt"
    with pytest.raises(UserError) as err:  # torch.save wraps the failed write in a RuntimeError
        SafeCheckpointIO().save_checkpoint(_checkpoint(4), target)
    message = str(err.value)
    assert message.startswith(f"disk full while writing {target}: free space or move paths.output_dir")
    assert "\n" not in message
    assert not target.exists() and _leftovers(ckpt_dir) == []
    assert load_checkpoint_file(ckpt_dir / "last.ckpt")["global_step"] == 2


def test_disk_full_during_an_export(tmp_path, monkeypatch):
    path = tmp_path / "model.safetensors"

    def no_room(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 10)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_module, "save_file", no_room)
    with pytest.raises(UserError, match=f"^disk full while writing {path}: free space"):
        save_safetensors({"w": torch.ones(8)}, path, None)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONF / "trainer").glob("*.yaml")))
def test_every_trainer_config_writes_through_the_safe_checkpoint_io(name, tmp_path, monkeypatch):
    monkeypatch.setenv("LDM_ROOT", str(tmp_path))
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=uncond", f"trainer={name}"])
    plugins = [p["_target_"] for p in cfg.trainer.plugins]
    assert plugins == ["ldm.training.checkpoint_io.SafeCheckpointIO"]
    if name in ("cpu", "ddp_cpu"):  # the others need GPUs to build
        trainer = instantiate(cfg.trainer, logger=False, enable_progress_bar=False)
        assert type(trainer.strategy.checkpoint_io) is SafeCheckpointIO


def test_a_trainer_without_the_plugin_gets_it_and_a_foreign_one_is_refused():
    trainer = bare_trainer(max_steps=1)  # no plugins: Lightning's TorchCheckpointIO
    assert type(trainer.strategy.checkpoint_io) is TorchCheckpointIO
    require_safe_checkpoint_io(trainer)
    assert type(trainer.strategy.checkpoint_io) is SafeCheckpointIO

    class ForeignIO(TorchCheckpointIO):
        pass

    with pytest.raises(UserError, match="checkpoint IO ForeignIO"):
        require_safe_checkpoint_io(bare_trainer(max_steps=1, plugins=[ForeignIO()]))


# --- reading: every path goes through load_checkpoint_file (weights_only=True) --------------------------


class _Planted:
    """Unpickling this creates a file: proof that code from the checkpoint ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _plant_latest(runs_dir: Path, content: bytes) -> Path:
    """`<runs>/latest -> run1`, whose checkpoints/last.ckpt holds `content`."""
    last = runs_dir / "run1" / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    last.write_bytes(content)
    (runs_dir / "latest").symlink_to("run1")
    return last


@pytest.mark.parametrize("form", ["torch.save", "bare pickle"])
def test_planted_pickle_behind_ckpt_path_last_is_never_unpickled(tmp_path, form):
    marker = tmp_path / "code_ran"
    obj = {"state_dict": {"w": torch.ones(2)}, "loops": _Planted(marker)}
    if form == "torch.save":
        torch.save(obj, tmp_path / "planted")
        content = (tmp_path / "planted").read_bytes()
    else:
        content = pickle.dumps(obj, protocol=4)
    last = _plant_latest(tmp_path / "runs", content)

    with pytest.raises(UserError) as err:  # train.py's resume path
        resolve_ckpt_path("last", tmp_path / "runs")
    assert str(err.value).startswith(f"{last} stores Python objects besides tensors")
    with pytest.raises(UserError, match="stores Python objects"):  # Lightning's own read (fit ckpt_path)
        SafeCheckpointIO().load_checkpoint(last)
    with pytest.raises(UserError, match="stores Python objects"):
        bare_trainer(max_steps=1, plugins=[SafeCheckpointIO()]).strategy.load_checkpoint(last)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (bytes(range(256)) * 16, "neither a PyTorch archive nor a pickle"),
        (b"\x80\x04" + bytes(range(256)) * 4, "its contents do not parse as a pickle"),
        (b"", "the file is empty, 0 bytes"),
        (b"hello world\n", "neither a PyTorch archive nor a pickle"),
    ],
    ids=["random bytes", "pickle header then random", "empty", "text"],
)
def test_bytes_that_are_no_checkpoint_say_so(tmp_path, content, why):
    last = _plant_latest(tmp_path / "runs", content)
    with pytest.raises(UserError) as err:
        resolve_ckpt_path("last", tmp_path / "runs")
    assert str(err.value).startswith(f"{last} is not a checkpoint ({why}")
    assert "Python objects" not in str(err.value) and "trust-pickle" not in str(err.value)


def test_truncated_checkpoint_says_truncated(tmp_path):
    torch.save(_checkpoint(2), tmp_path / "full.ckpt")
    data = (tmp_path / "full.ckpt").read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match=r"cut.ckpt is not a readable checkpoint .*is it truncated\?"):
        load_checkpoint_file(tmp_path / "cut.ckpt")


def test_checkpoint_of_another_lightning_version_gets_a_message(tmp_path):
    old = _checkpoint(7)
    del old["loops"]  # Lightning < 1.6 stored no loop state
    old["pytorch-lightning_version"] = "1.5.10"
    torch.save(old, tmp_path / "old.ckpt")
    with pytest.raises(UserError) as err:
        resolve_ckpt_path(str(tmp_path / "old.ckpt"), tmp_path)
    old_path = tmp_path / "old.ckpt"
    assert str(err.value).startswith(
        f"ckpt_path={old_path} was written by another Lightning version (1.5.10; it has no loops)"
    )


def test_resumable_checkpoint_resolves(tmp_path):
    last = _plant_latest(tmp_path / "runs", b"")
    torch.save(_checkpoint(3), last)
    assert resolve_ckpt_path("last", tmp_path / "runs") == str(last.resolve())
    assert os.path.samefile(resolve_ckpt_path(str(last), tmp_path), last)


def test_atomic_writes_keep_ordinary_file_permissions(tmp_path):
    """mkstemp makes 0600 files: a checkpoint must be as readable as any file the user writes (group runs)."""
    import stat

    from ldm.interop.checkpoint import save_checkpoint_file, save_safetensors

    old = os.umask(0o022)
    try:
        save_checkpoint_file({"x": torch.zeros(1)}, tmp_path / "a.ckpt")
        save_safetensors({"x": torch.zeros(1)}, tmp_path / "m.safetensors", {"model": {}})
        for name in ("a.ckpt", "m.safetensors", "config.yaml"):
            assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name
        os.chmod(tmp_path / "a.ckpt", 0o640)  # an existing file keeps the mode it was given
        save_checkpoint_file({"x": torch.ones(1)}, tmp_path / "a.ckpt")
        assert stat.S_IMODE((tmp_path / "a.ckpt").stat().st_mode) == 0o640
    finally:
        os.umask(old)
