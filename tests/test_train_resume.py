"""Faults through train.py: kill -9, SIGTERM and Ctrl-C mid-run, then `ckpt_path=last` resumes bit-exactly.

The reference is one uninterrupted run that checkpoints every step; an interrupted run resumed to step N
must hold exactly the reference's step-N state: weights, EMA, optimizer, scheduler and data position.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from train_helpers import (
    compose_train,
    load_ckpt,
    start_train,
    tiny_overrides,
)

import train

EXPERIMENT = "class_cond"  # condition dropout, noise and timesteps all drawn per step: a strict test
REFERENCE_STEPS = 16


def _overrides(data: Path, ae: Path, run_dir: Path, max_steps: int, ckpt_every: int = 1) -> list[str]:
    return tiny_overrides(EXPERIMENT, data, run_dir, ae, max_steps=max_steps, ckpt_every=ckpt_every)


def _train(overrides: list[str]) -> dict[str, float]:
    return train.train(compose_train(overrides))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_data, tiny_ae) -> Path:  # noqa: F811
    """The uninterrupted run: its checkpoints folder, with `step%06d.ckpt` after every step."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    _train(_overrides(tiny_data, tiny_ae, run_dir, REFERENCE_STEPS))
    return run_dir / "checkpoints"


def reference_at(reference: Path, step: int) -> dict:
    assert step <= REFERENCE_STEPS, f"the interrupted run got to step {step}, past the reference"
    return load_ckpt(reference / f"step{step:06d}.ckpt")


def assert_same_training_state(resumed: dict, expected: dict) -> None:
    """Step, every weight and buffer (UNet, EMA, latent scale), optimizer, LR scheduler, data position."""
    assert resumed["global_step"] == expected["global_step"]
    a, b = resumed["state_dict"], expected["state_dict"]
    assert a.keys() == b.keys()
    for group in ("unet.", "ema.", "conditioner.", "first_stage."):
        differ = [k for k in a if k.startswith(group) and not torch.equal(a[k], b[k])]
        assert not differ, f"{len(differ)} {group}* tensors differ, e.g. {differ[:3]}"
    (opt_a,), (opt_b,) = resumed["optimizer_states"], expected["optimizer_states"]
    assert opt_a["state"].keys() == opt_b["state"].keys()
    for i, state in opt_a["state"].items():
        for name, value in state.items():
            assert torch.equal(value, opt_b["state"][i][name]), f"AdamW state[{i}][{name}] differs"
    assert resumed["lr_schedulers"] == expected["lr_schedulers"]
    assert resumed["ShardDataModule"] == expected["ShardDataModule"]  # epoch, batches, worker positions


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"train.py exited early ({proc.returncode}):\n{out[-2000:]}\n{err[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no {path.name} after {timeout}s")
        time.sleep(0.02)


def _start_long_run(data: Path, ae: Path, run_dir: Path) -> subprocess.Popen:
    """`python train.py` on a run far longer than the test waits (checkpoints every 2 steps)."""
    return start_train(_overrides(data, ae, run_dir, max_steps=1000, ckpt_every=2))


def test_kill9_mid_run_then_resume_matches_uninterrupted(reference, tiny_data, tiny_ae, tmp_path):  # noqa: F811
    runs = tmp_path / "runs"
    proc = _start_long_run(tiny_data, tiny_ae, runs / "killed")
    # last.ckpt is written right after each periodic step%06d.ckpt: once step 6's exists, last >= 4
    _wait_for(runs / "killed" / "checkpoints" / "step000006.ckpt", proc)
    proc.kill()  # SIGKILL: no handler, no cleanup
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL

    last = load_ckpt(runs / "killed" / "checkpoints" / "last.ckpt")  # complete (atomic write), weights-only
    killed_at = last["global_step"]
    assert killed_at >= 4 and killed_at % 2 == 0
    assert_same_training_state(last, reference_at(reference, killed_at))

    stop = killed_at + 4
    _train(_overrides(tiny_data, tiny_ae, runs / "resumed", max_steps=stop) + ["ckpt_path=last"])
    resumed = load_ckpt(runs / "resumed" / "checkpoints" / "last.ckpt")
    assert_same_training_state(resumed, reference_at(reference, stop))


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_saves_at_a_step_boundary_and_resume_continues(
    signum,
    reference,
    tiny_data,  # noqa: F811
    tiny_ae,  # noqa: F811
    tmp_path,
):
    runs = tmp_path / "runs"
    proc = _start_long_run(tiny_data, tiny_ae, runs / "stopped")
    _wait_for(runs / "stopped" / "checkpoints" / "step000004.ckpt", proc)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]  # saved, but interrupted: SLURM requeue / schedulers see it
    assert "Traceback" not in err and "ckpt_path=last" in err

    last = load_ckpt(runs / "stopped" / "checkpoints" / "last.ckpt")
    stopped_at = last["global_step"]
    assert stopped_at >= 4 and f"interrupted_at_step={stopped_at}" in out
    progress = last["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]
    assert progress["ready"] == progress["processed"] == progress["completed"] == stopped_at  # whole steps
    assert (runs / "stopped" / "model.safetensors").is_file()  # exported on the way out
    assert_same_training_state(last, reference_at(reference, stopped_at))

    stop = stopped_at + 2
    metrics = _train(_overrides(tiny_data, tiny_ae, runs / "resumed", max_steps=stop) + ["ckpt_path=last"])
    assert "interrupted_at_step" not in metrics
    resumed = load_ckpt(runs / "resumed" / "checkpoints" / "last.ckpt")
    assert_same_training_state(resumed, reference_at(reference, stop))


def test_sigterm_during_validation_keeps_training_weights(reference, tiny_data, tiny_ae, tmp_path):  # noqa: F811
    """Validation runs on the EMA weights; a checkpoint taken then must still hold the training weights."""
    runs = tmp_path / "runs"
    signal_at_val = [
        "trainer.limit_val_batches=3",  # Lightning stops between validation batches, not after the last
        "+callbacks.signal._target_=train_helpers.SendSignal",
        "+callbacks.signal.step=4",
        f"+callbacks.signal.signum={int(signal.SIGTERM)}",
        "+callbacks.signal.where=val",
    ]
    metrics = _train(_overrides(tiny_data, tiny_ae, runs / "stopped", max_steps=100) + signal_at_val)
    assert metrics == {"interrupted_at_step": 4.0}
    last = load_ckpt(runs / "stopped" / "checkpoints" / "last.ckpt")
    assert_same_training_state(last, reference_at(reference, 4))

    _train(_overrides(tiny_data, tiny_ae, runs / "resumed", max_steps=6) + ["ckpt_path=last"])
    assert_same_training_state(
        load_ckpt(runs / "resumed" / "checkpoints" / "last.ckpt"), reference_at(reference, 6)
    )


def test_autoencoder_resume_continues_step_and_both_optimizers(tiny_data, tmp_path):  # noqa: F811
    runs = tmp_path / "runs"
    first = tiny_overrides("autoencoder_kl", tiny_data, runs / "first", None, max_steps=4)
    _train(first)  # the discriminator joins at step 1 (tiny_overrides sets disc_start=1)
    before = load_ckpt(runs / "first" / "checkpoints" / "last.ckpt")
    assert before["global_step"] == 4

    second = tiny_overrides("autoencoder_kl", tiny_data, runs / "second", None, max_steps=6)
    _train(second + ["ckpt_path=last"])
    after = load_ckpt(runs / "second" / "checkpoints" / "last.ckpt")
    assert after["global_step"] == 6  # 2 more batches, not 6 from scratch
    gen, disc = after["optimizer_states"]
    # Adam's per-parameter step counts: continued, not restarted (generator every batch, GAN from step 1)
    assert {float(s["step"]) for s in gen["state"].values()} == {6.0}
    assert {float(s["step"]) for s in disc["state"].values()} == {5.0}
    assert [s["last_epoch"] for s in after["lr_schedulers"]] == [6, 5]
    assert after["ShardDataModule"]["loader"]["batches"] == 6  # the data stream went on, too
    assert after["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]["processed"] == 6
