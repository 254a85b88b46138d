"""Two-process DDP on CPU (gloo) through train.py: equal weights on both ranks, trained on disjoint data."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
from train_helpers import (
    PYTHON,
    REPO,
    free_port,
    load_ckpt,
    subprocess_env,
    tiny_overrides,
)

STEPS = 4
BATCH = 4


def _ddp_args(launcher: str, data: Path, ae: Path, runs_dir: Path, probe_dir: Path) -> list[str]:
    args = tiny_overrides("class_cond", data, runs_dir / "run", ae, max_steps=STEPS)
    args = [a for a in args if a != "trainer=cpu"]
    if launcher == "lightning":  # the `${now:...}` run folder: rank 1, started later, must find rank 0's
        args = [a for a in args if not a.startswith("paths.output_dir=")]
    # (torchrun starts the ranks together; each resolves `${now:...}` itself, so we pin the folder)
    return args + [
        "trainer=ddp_cpu",
        "data.keys=[image,label,key]",  # `key`: the sample ids each rank trained on
        "+callbacks.probe._target_=train_helpers.RankProbe",
        f"+callbacks.probe.out_dir={probe_dir}",
    ]


def _launch(launcher: str, args: list[str]) -> list[str]:
    if launcher == "torchrun":  # the multi-node form in the README, on one node
        torchrun = str(Path(PYTHON).with_name("torchrun"))
        return [torchrun, "--nproc-per-node", "2", "--master-port", str(free_port()), "train.py", *args]
    return [PYTHON, "train.py", *args]  # Lightning starts rank 1 itself (`trainer.devices=2`)


@pytest.mark.parametrize("launcher", ["lightning", pytest.param("torchrun", marks=pytest.mark.slow)], ids=str)
def test_ddp_ranks_share_weights_and_split_data(launcher, tiny_data, tiny_ae, tmp_path):  # noqa: F811
    runs_dir, probe_dir = tmp_path / "runs", tmp_path / "probe"
    env = subprocess_env(MASTER_PORT=str(free_port()))
    result = subprocess.run(
        _launch(launcher, _ddp_args(launcher, tiny_data, tiny_ae, runs_dir, probe_dir)),
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ranks = [torch.load(probe_dir / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert [p["world_size"] for p in ranks] == [2, 2]
    assert [p["global_step"] for p in ranks] == [STEPS, STEPS]

    # (a) identical weights on both ranks (gradients all-reduced), and training moved them
    for name in ("unet", "ema_unet"):
        a, b = ranks[0][name], ranks[1][name]
        assert a.keys() == b.keys() and len(a) > 50
        assert all(torch.equal(a[k], b[k]) for k in a), f"{name} differs between ranks"
    moved = [k for k in ranks[0]["unet"] if not torch.equal(ranks[0]["unet"][k], ranks[0]["unet_start"][k])]
    assert len(moved) > len(ranks[0]["unet"]) // 2

    # (b) each rank its own samples: full batches, no repeats, no sample on both ranks
    seen = [[key for batch in p["keys"] for key in batch] for p in ranks]
    for keys in seen:
        assert len(keys) == STEPS * BATCH and len(set(keys)) == len(keys)
    assert not set(seen[0]) & set(seen[1])

    # one run folder (rank 1 must not make its own), `latest` pointing at it, rank 0's weights saved
    run_dirs = [p for p in runs_dir.iterdir() if p.name != "latest"]
    assert len(run_dirs) == 1, sorted(p.name for p in runs_dir.iterdir())
    assert (runs_dir / "latest").resolve() == run_dirs[0].resolve()
    ckpt = load_ckpt(run_dirs[0] / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == STEPS
    for k, v in ranks[0]["unet"].items():
        assert torch.equal(ckpt["state_dict"]["model.unet." + k], v)
    assert (run_dirs[0] / "model.safetensors").is_file()
