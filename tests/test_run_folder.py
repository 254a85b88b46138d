"""Run folders through train.py: one `last.ckpt`, `latest` only after a real start, a lock per folder,
grids that say what they show, one-line errors for a diverged loss and a failing DDP rank (issue 14)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from train_helpers import (
    PYTHON,
    REPO,
    compose_train,
    free_port,
    load_ckpt,
    run_train,
    subprocess_env,
    tiny_overrides,
)

import ldm.interop.checkpoint as checkpoint_module
import train
from ldm.errors import TrainingDiverged, UserError
from ldm.training.callbacks import ExportSafetensors, ImageLogger
from ldm.training.runtime import (
    resolve_ckpt_path,
    run_folder_lock,
    set_current_run_dir,
    user_errors_exit,
)

EXPERIMENT = "class_cond"  # labels: the preview grids' conditions are checkable values


def _overrides(data: Path, ae: Path, run_dir: Path, runs_dir: Path | None = None, **kw) -> list[str]:
    args = tiny_overrides(EXPERIMENT, data, run_dir, ae, **kw)
    if runs_dir is not None:
        args = [a for a in args if not a.startswith("paths.runs_dir=")] + [f"paths.runs_dir={runs_dir}"]
    return args


@pytest.fixture(scope="module")
def short_run(tmp_path_factory, tiny_data, tiny_ae):  # noqa: F811
    """3 steps (periodic checkpoints every 500), the run folder outside the experiment's runs folder,
    progress bar on (its output kept)."""
    root = tmp_path_factory.mktemp("short")
    run_dir, runs_dir = root / "elsewhere" / "run", root / "outputs" / EXPERIMENT
    args = _overrides(tiny_data, tiny_ae, run_dir, runs_dir, max_steps=3, every=2, ckpt_every=500)
    args = [a for a in args if a != "trainer.enable_progress_bar=false"] + [
        "trainer.enable_progress_bar=true"
    ]
    cfg = compose_train(args)
    out = io.StringIO()
    os.environ["LDM_PROGRESS"] = "bar"  # the tqdm bar although stdout is captured (no terminal)
    try:
        with contextlib.redirect_stdout(out):
            train.train(cfg)
    finally:
        del os.environ["LDM_PROGRESS"]
    return {"run_dir": run_dir, "runs_dir": runs_dir, "cfg": cfg, "stdout": out.getvalue()}


def test_run_shorter_than_the_checkpoint_interval_keeps_one_last_ckpt(short_run):
    ckpts = short_run["run_dir"] / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["best.ckpt", "last.ckpt"]  # no last-v1.ckpt
    last = load_ckpt(ckpts / "last.ckpt")
    assert last["global_step"] == 3 and "loops" in last


def test_latest_is_made_in_the_runs_folder_for_a_run_elsewhere(short_run):
    link = short_run["runs_dir"] / "latest"
    assert link.is_symlink() and os.readlink(link) == str(short_run["run_dir"])  # absolute: outside runs
    assert resolve_ckpt_path("last", short_run["runs_dir"]) == str(
        short_run["run_dir"] / "checkpoints" / "last.ckpt"
    )


def test_preview_grids_list_each_images_label(short_run):
    dm = instantiate(short_run["cfg"].data)
    dm.setup("fit")
    first_batch = next(iter(dm.train_dataloader()))  # the module's fixed preview conditions
    expected = [{"label": int(label)} for label in first_batch["label"][:4]]
    for step in (2, 3):  # periodic grids and the final ones
        listed = json.loads((short_run["run_dir"] / "images" / f"train_step{step:06d}.json").read_text())
        assert listed == {"step": step, "images": expected}
        assert (short_run["run_dir"] / "images" / f"train_samples_step{step:06d}.png").is_file()


def test_export_is_written_before_the_final_grids(short_run):
    run_dir = short_run["run_dir"]
    exported = (run_dir / "model.safetensors").stat().st_mtime_ns
    assert exported <= (run_dir / "images" / "train_samples_step000003.png").stat().st_mtime_ns


def test_progress_bar_counts_steps_not_epochs(short_run):
    shown = short_run["stdout"]
    assert "step 3/3" in shown and "Epoch" not in shown and "/-2" not in shown


def test_image_logger_every_0_also_stops_the_final_grids(tmp_path):
    class Module:
        last_batch = {"label": torch.tensor([1, 2])}

        def log_images(self, batch, max_images):
            raise AssertionError("no grids were asked for")

    exports = []

    class Export(ExportSafetensors):
        def export(self, trainer, pl_module):
            exports.append(trainer.global_step)

    logger = ImageLogger(every_n_steps=0, out_dir=str(tmp_path / "images"))
    trainer = SimpleNamespace(global_step=7, callbacks=[logger, Export()])
    logger.on_train_end(trainer, Module())
    assert not (tmp_path / "images").exists() and exports == []


def _fake_previous_run(runs_dir: Path) -> Path:
    """`<runs>/latest -> previous`, with a resumable last.ckpt."""
    last = runs_dir / "previous" / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    torch.save({"global_step": 5, "state_dict": {}, "optimizer_states": [], "loops": {"fit_loop": {}}}, last)
    (runs_dir / "latest").symlink_to("previous")
    return last


def test_failed_start_keeps_latest_and_leaves_no_logger_folder(tiny_data, tiny_ae, tmp_path):  # noqa: F811
    runs_dir = tmp_path / "runs"
    previous = _fake_previous_run(runs_dir)
    run_dir = runs_dir / "failed"
    args = _overrides(tiny_data, tiny_ae, run_dir, max_steps=2)
    args = [a for a in args if not a.startswith(("data.train_shards=", "logger="))]
    args += [f"data.train_shards={tmp_path}/nothing-*.tar", "logger=wandb"]
    with pytest.raises(UserError, match="train_shards"):
        train.train(compose_train(args))
    assert os.readlink(runs_dir / "latest") == "previous"
    assert resolve_ckpt_path("last", runs_dir) == str(previous.resolve())
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock", "config.yaml"]  # no wandb/ folder


def test_second_run_in_a_locked_folder_stops_before_writing(tiny_data, tiny_ae, tmp_path):  # noqa: F811
    run_dir = tmp_path / "runs" / "shared"
    holder = subprocess.Popen(  # the first run: holds the lock as run_folder_lock does
        [
            PYTHON,
            "-c",
            "import sys\nfrom pathlib import Path\nfrom ldm.training.runtime import run_folder_lock\n"
            f"with run_folder_lock(Path({str(run_dir)!r})):\n"
            "    print('locked', flush=True)\n    sys.stdin.read()",
        ],
        cwd=REPO,
        env=subprocess_env(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert (run_dir / ".lock").read_text().strip() == str(holder.pid)
        with pytest.raises(UserError) as err:
            train.train(compose_train(_overrides(tiny_data, tiny_ae, run_dir, max_steps=2)))
        assert f"is in use by another training run (PID {holder.pid})" in str(err.value)
        assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]  # nothing written

        # the command line: stopped before Hydra writes .hydra/ and train.log into the folder
        cli = run_train([f"hydra.run.dir={run_dir}", *_overrides(tiny_data, tiny_ae, run_dir, max_steps=2)])
        assert cli.returncode == 2, cli.stderr[-3000:]
        assert _error_lines(cli.stderr) == [
            f"error: hydra.run.dir={run_dir} is in use by another training run (PID {holder.pid}); "
            "wait for it to end, or give this run its own folder "
            "(leave hydra.run.dir unset for a new timestamped one)."
        ]
        assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]
    finally:
        holder.kill()  # SIGKILL: the kernel drops the lock with the process
        holder.wait()
    with run_folder_lock(run_dir):  # free again
        assert (run_dir / ".lock").read_text().strip() == str(os.getpid())


def test_lock_is_reentrant_in_one_process_and_released_after(tmp_path):
    import fcntl

    run_dir = tmp_path / "run"
    with run_folder_lock(run_dir), run_folder_lock(run_dir):  # the Hydra callback, then train()
        pass
    with open(run_dir / ".lock") as f:  # another open file: the lock is free
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)


# --- errors during training: one line, exit code 2 --------------------------------------------------


class PoisonWeights(pl.Callback):
    """Test-only: NaN in every UNet weight before step `step` (the loss of that step is NaN)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                for p in pl_module.unet.parameters():
                    p.fill_(float("nan"))


class FailOnRank(pl.Callback):
    """Test-only: a UserError on one rank only, at step `step` (the others go on into the collective)."""

    def __init__(self, rank: int, step: int) -> None:
        self.rank, self.step = rank, step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            raise UserError(f"bad sample on rank {self.rank} at step {self.step}: fix the data")


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


def test_nan_loss_is_one_line_and_exit_code_2(tiny_data, tiny_ae, tmp_path, capsys):  # noqa: F811
    args = _overrides(tiny_data, tiny_ae, tmp_path / "runs" / "run", max_steps=4)
    args += ["+callbacks.poison._target_=test_run_folder.PoisonWeights", "+callbacks.poison.step=1"]
    with pytest.raises(SystemExit) as exit_:
        user_errors_exit(train.train)(compose_train(args))
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert _error_lines(err) == [
        "error: non-finite training loss (nan) at step 1: lower optim.lr, check the data, or resume from the "
        "last good checkpoint with ckpt_path=last."
    ]
    assert "Traceback" not in err
    assert issubclass(TrainingDiverged, FloatingPointError)  # code that caught the old type still does


def test_disk_full_during_training_is_one_line_and_no_truncated_checkpoint(
    tiny_data,  # noqa: F811
    tiny_ae,  # noqa: F811
    tmp_path,
    capsys,
    monkeypatch,
):
    from test_data_safety import _FullDisk

    def open_on_a_full_disk(file, mode="r", *args, **kwargs):
        f = open(file, mode, *args, **kwargs)  # noqa: SIM115
        return _FullDisk(f, room=50_000) if "w" in mode else f

    monkeypatch.setattr(checkpoint_module, "open", open_on_a_full_disk, raising=False)
    run_dir = tmp_path / "runs" / "run"
    with pytest.raises(SystemExit) as exit_:
        user_errors_exit(train.train)(compose_train(_overrides(tiny_data, tiny_ae, run_dir, max_steps=4)))
    assert exit_.value.code == 2
    target = run_dir / "checkpoints" / "step000002.ckpt"
    assert _error_lines(capsys.readouterr().err) == [
        f"error: disk full while writing {target}: free space or move paths.output_dir to a disk with room "
        "(the previous file under that name, if any, is intact)."
    ]
    assert list((run_dir / "checkpoints").iterdir()) == []  # no truncated step000002.ckpt, no temp file


def test_rank_errors_are_handed_to_rank_zero(tmp_path, monkeypatch, capsys):
    """The mechanism without processes: rank 1 leaves its message, rank 0 prints it instead of its own
    (collective) error; both exit 2."""

    def fails_with(error):
        def run():
            raise error

        return user_errors_exit(run)

    set_current_run_dir(tmp_path)
    try:
        monkeypatch.setenv("RANK", "1")
        with pytest.raises(SystemExit) as exit_:
            fails_with(TrainingDiverged("non-finite training loss (nan) at step 3: lower optim.lr"))()
        assert exit_.value.code == 2 and capsys.readouterr().err == ""  # rank 1 says nothing itself
        assert (
            tmp_path / ".rank1.error"
        ).read_text() == "non-finite training loss (nan) at step 3: lower optim.lr\n"

        monkeypatch.setenv("RANK", "0")
        with pytest.raises(SystemExit) as exit_:
            fails_with(RuntimeError("[../gloo/transport/tcp/pair.cc:534] Connection closed by peer"))()
        assert exit_.value.code == 2
        assert (
            capsys.readouterr().err
            == "error: (rank 1) non-finite training loss (nan) at step 3: lower optim.lr\n"
        )

        (tmp_path / ".rank1.error").unlink()  # no rank left a message: a real error stays a traceback
        with pytest.raises(RuntimeError, match="Connection closed"):
            fails_with(RuntimeError("Connection closed by peer"))()
    finally:
        set_current_run_dir(None)


@pytest.mark.slow  # two DDP processes start in ~40 s on the 2-core machine
def test_a_failing_ddp_rank_reaches_the_user_as_one_line(tiny_data, tiny_ae, tmp_path):  # noqa: F811
    runs_dir = tmp_path / "runs"
    args = tiny_overrides(EXPERIMENT, tiny_data, runs_dir / "run", tiny_ae, max_steps=4)
    args = [a for a in args if a != "trainer=cpu" and not a.startswith("paths.output_dir=")]
    args += [
        "trainer=ddp_cpu",
        "+callbacks.fail._target_=test_run_folder.FailOnRank",
        "+callbacks.fail.rank=1",
        "+callbacks.fail.step=1",
    ]
    result = subprocess.run(
        [PYTHON, "train.py", *args],
        cwd=REPO,
        env=subprocess_env(MASTER_PORT=str(free_port())),
        capture_output=True,
        text=True,
        timeout=240,
    )
    out = result.stdout + result.stderr
    assert result.returncode == 2, out[-4000:]
    assert _error_lines(result.stderr) == ["error: (rank 1) bad sample on rank 1 at step 1: fix the data"], (
        out[-4000:]
    )
    assert "Traceback" not in out
