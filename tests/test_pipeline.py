"""The Python API (ldm.pipeline.Pipeline): every task in one call, sample.py's images, no Lightning."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from ldm_fixtures import SIZE, build_sample_root
from PIL import Image

from ldm.errors import UserError
from ldm.pipeline import Pipeline, describe_sampler, sampler_function

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return build_sample_root(tmp_path_factory.mktemp("pipeline"))


def _run(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300, check=False
    )


def test_every_task_in_one_call(root):
    text = Pipeline.from_file(root / "txt2img" / "model.safetensors", device="cpu")
    assert text.tasks == ("txt2img", "img2img", "inpaint", "outpaint", "uncond")
    common = {"steps": 2, "n": 2}
    out = text.txt2img(["a red circle", "a blue square"], **common)
    assert len(out.images) == 4 and out.images[0].size == (SIZE, SIZE)
    assert [e["prompt"] for e in out.record["images"]] == ["a red circle"] * 2 + ["a blue square"] * 2
    assert out.record["parameters"]["sampler_name"] == "sample_ddim" and out.record["out_dir"] is None
    # PIL inputs and paths give the same images
    image = Image.open(root / "image.png")
    by_path = text.img2img(root / "image.png", "a blue square", strength=0.5, **common)
    by_pil = text.img2img(image, "a blue square", strength=0.5, **common)
    assert np.array_equal(np.asarray(by_path.images[1]), np.asarray(by_pil.images[1]))
    assert text.inpaint(image, Image.open(root / "mask.png"), "x", **common).images[0].size == (SIZE, SIZE)
    assert text.outpaint(image, [8, 0, 0, 0], "x", **common).images[0].size == (SIZE + 8, SIZE)  # PIL: (W, H)
    assert len(text.uncond(**common).images) == 2
    superres = Pipeline.from_file(root / "superres" / "model.safetensors", device="cpu")
    assert superres.superres(root / "lowres.png", **common).images[0].size == (SIZE, SIZE)
    semantic = Pipeline.from_file(root / "semantic" / "model.safetensors", device="cpu")
    assert semantic.semantic(root / "segmap.png", **common).images[0].size == (SIZE, SIZE)
    labels = Pipeline.from_file(root / "class" / "model.safetensors", device="cpu")
    out = labels.class_cond([0, 2], steps=2, n=1)
    assert [e["label"] for e in out.record["images"]] == [0, 2]
    with pytest.raises(UserError, match="task=semantic"):
        labels.semantic(root / "segmap.png", steps=2)


def test_api_and_cli_draw_the_same_images(root, tmp_path):
    pipe = Pipeline.from_file(root / "txt2img" / "model.safetensors", device="cpu")
    out = pipe.txt2img("a red circle", n=2, steps=3, seed=5, sampler="dpmpp_2m", cfg_scale=3.0)
    cli = subprocess.run(
        [
            sys.executable,
            "sample.py",
            f"ckpt={root / 'txt2img' / 'model.safetensors'}",
            "prompt=a red circle",
            "n=2",
            "steps=3",
            "seed=5",
            "sampler=dpmpp_2m",
            "cfg_scale=3",
            "device=cpu",
            f"out_dir={tmp_path}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert cli.returncode == 0, cli.stderr
    record = json.loads((tmp_path / "run.json").read_text())
    for i, entry in enumerate(record["images"]):  # the CLI process runs 2 threads, this one 1: float noise
        written = np.asarray(Image.open(tmp_path / entry["file"]).convert("RGB")).astype(int)
        assert np.abs(written - np.asarray(out.images[i]).astype(int)).max() <= 1
    assert record["seeds"] == out.record["seeds"] == [5, 6]


def test_sampling_imports_no_lightning(root, tmp_path):
    """sample.py and the Python API load, sample and write without importing pytorch_lightning."""
    ckpt = root / "class" / "model.safetensors"
    code = (
        "import runpy, sys\n"
        f"sys.argv = ['sample.py', 'task=class', 'ckpt={ckpt}', 'label=1', 'n=1', 'steps=2', "
        f"'device=cpu', 'out_dir={tmp_path}']\n"
        "try:\n    runpy.run_path('sample.py', run_name='__main__')\nexcept SystemExit as e:\n"
        "    assert not e.code, e.code\n"
        "from ldm.pipeline import Pipeline\n"
        f"Pipeline.from_file('{ckpt}', device='cpu').class_cond(0, steps=2)\n"
        "print(sorted(m for m in sys.modules if 'lightning' in m))\n"
    )
    proc = _run(code, REPO)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"
    assert (tmp_path / "run.json").is_file()


def test_readme_example_runs(root, tmp_path):
    """The README's Python example, as written, against a tiny model where it expects the demo's."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    match = re.search(r"<!-- pipeline-example -->\s*```python\n(.*?)```", readme, re.S)
    assert match, "README.md lost its pipeline example"
    model_dir = tmp_path / "outputs" / "txt2img" / "latest"
    model_dir.mkdir(parents=True)
    for f in ("model.safetensors", "config.yaml"):
        (model_dir / f).write_bytes((root / "txt2img" / f).read_bytes())
    code = match.group(1).replace("steps=20", "steps=2")
    proc = _run(code, tmp_path)
    assert proc.returncode == 0, proc.stderr
    files = sorted(p.name for p in tmp_path.glob("*.png"))
    assert files and all(Image.open(tmp_path / f).size == (SIZE, SIZE) for f in files)


def test_sampler_names_and_options():
    fn = sampler_function("euler_a", eta=0.5)
    assert describe_sampler(fn) == {"function": "sample_euler_ancestral", "eta": 0.5}
    assert describe_sampler(sampler_function("ddim")) == {"function": "sample_ddim"}
    with pytest.raises(UserError, match="sampler='dpm_fast'"):
        sampler_function("dpm_fast")
    with pytest.raises(UserError, match="dtype="):
        Pipeline(None, device="cpu", dtype=torch.int8)  # checked before anything is touched
