"""`make demo` chains its stages through one folder's exact runs, never an experiment's moving `latest`."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")


def _dry(*args: str) -> list[str]:
    out = subprocess.run(["make", "-n", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return out.replace("\\\n", " ").splitlines()


def test_every_demo_stage_reads_and_writes_one_chain_folder():
    lines = _dry("demo")
    trains = [line for line in lines if "train.py" in line]
    stamp = r"outputs/demo/(\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d)/"
    stamps = {m for line in trains for m in re.findall(stamp, line)}
    assert len(trains) == 5 and len(stamps) == 1, stamps
    demo = f"outputs/demo/{stamps.pop()}"
    stages = [re.search(r"paths\.output_dir=(\S+)", line).group(1) for line in trains]
    names = ("autoencoder_kl", "txt2img", "class_cond", "semantic", "superres")
    assert stages == [f"{demo}/{s}" for s in names]
    for line in trains[1:4]:  # stage 2 uses the chain's own autoencoder
        assert f"first_stage_ckpt={demo}/autoencoder_kl/model.safetensors" in line
    # super-resolution in pixel space: no autoencoder, so it cannot pick up a wrong one
    assert "experiment=superres_pixel" in trains[4] and "first_stage_ckpt" not in trains[4]
    # no experiment's `latest`
    assert not [line for line in lines if re.search(r"outputs/(?!demo/)\w+/latest", line)]
    samples = [line for line in lines if "sample.py" in line]
    assert len(samples) == 8
    assert all(f"ckpt={demo}/" in s and f"out_dir={demo}/samples/" in s for s in samples)
    assert any(f"demo_summary.py --demo {demo}" in line for line in lines)
    # a stage never trains into a folder that already holds a run
    assert all(line.startswith(f"test ! -e {demo}/") for line in trains)


def test_single_steps_default_to_the_newest_chain_and_take_an_explicit_one():
    assert any("ckpt=outputs/demo/latest/txt2img/model.safetensors" in line for line in _dry("demo-sample"))
    lines = _dry("demo-tasks", "DEMO_DIR=outputs/demo/old")
    assert any("paths.output_dir=outputs/demo/old/superres" in line for line in lines)
