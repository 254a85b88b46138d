"""Every original checkpoint family samples its natural task through the Python API and sample.py.

The tiny checkpoints in tests/goldens/<family>/ are in the original layout (made with the original code, see
tests/goldens/README.md); the per-family test files check parity, this one the user's path: one call (or
one command) from the file + its yaml to images of the right size, and the tasks each file says it supports.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_interop import tiny_clip_tokenizer

from ldm.pipeline import Pipeline

REPO = Path(__file__).resolve().parents[1]
GOLDENS = Path(__file__).resolve().parent / "goldens"
RNG = np.random.default_rng(0)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("family_inputs")
    tokenizer = root / "clip_tokenizer"
    tokenizer.mkdir()
    tiny_clip_tokenizer(tokenizer)
    Image.fromarray(RNG.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / "image.png")
    Image.fromarray(RNG.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(root / "small.png")
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 255
    Image.fromarray(mask).save(root / "mask.png")
    Image.fromarray(RNG.integers(0, 8, (32, 32), dtype=np.uint8), mode="L").save(root / "segmap.png")
    return {"tokenizer": tokenizer, **{p.stem: p for p in root.glob("*.png")}}


# family -> (text encoder, task, call keyword arguments, tasks the file supports, output (W, H))
FAMILIES = {
    "sd2": ("clip", "txt2img", {"prompt": "a red circle"}, "txt2img img2img inpaint outpaint uncond", None),
    "sd2_v": ("clip", "txt2img", {"prompt": "a red circle"}, "txt2img img2img inpaint outpaint uncond", None),
    "sd2_inpaint": ("clip", "inpaint", {"prompt": "x"}, "txt2img img2img inpaint outpaint uncond", (32, 32)),
    "sd_x4_upscaler": ("clip", "superres", {"prompt": "a cat", "noise_level": 30}, "superres", (16, 16)),
    "ldm_cin256": (None, "class", {"label": [3, 5]}, "class", None),
    "ldm_txt2img_1p4b": (
        "vocab",
        "txt2img",
        {"prompt": "a red circle"},
        "txt2img img2img inpaint outpaint uncond",
        None,
    ),
    "ldm_celeba_vq": (None, "uncond", {}, "uncond", None),
    "ldm_churches_kl": (None, "uncond", {}, "uncond", None),
    "ldm_bsr_sr": (None, "superres", {}, "superres", (32, 32)),
    "ldm_semantic": (None, "semantic", {}, "semantic", (32, 32)),
    "ldm_inpainting_big": (None, "inpaint", {}, "inpaint outpaint", (32, 32)),
}


def _text_encoder(kind: str | None, inputs: dict) -> str | None:
    return {
        "clip": str(inputs["tokenizer"]),
        "vocab": str(GOLDENS / "ldm_txt2img_1p4b" / "vocab"),
        None: None,
    }[kind]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_samples_through_the_python_api(family, inputs):
    encoder, task, kwargs, tasks, size = FAMILIES[family]
    weights = GOLDENS / ("sd2" if family == "sd2_v" else family) / "model.safetensors"
    pipe = Pipeline.from_file(
        weights,
        config=GOLDENS / family / "config.yaml",
        text_encoder=_text_encoder(encoder, inputs),
        device="cpu",
    )
    assert sorted(pipe.tasks) == sorted(tasks.split())
    call = {
        "txt2img": lambda: pipe.txt2img(kwargs["prompt"], **common),
        "inpaint": lambda: pipe.inpaint(inputs["image"], inputs["mask"], kwargs.get("prompt", ""), **common),
        "superres": lambda: pipe.superres(
            inputs["small"], kwargs.get("prompt"), noise_level=kwargs.get("noise_level"), **common
        ),
        "semantic": lambda: pipe.semantic(inputs["segmap"], **common),
        "class": lambda: pipe.class_cond(kwargs["label"], **common),
        "uncond": lambda: pipe.uncond(**common),
    }
    common = {"n": 2, "steps": 2, "seed": 3, "cfg_scale": 1.0 if task in ("uncond", "superres") else 3.0}
    out = call[task]()
    if "noise_level" in kwargs:  # the x4 upscaler: its augmentation level is recorded
        assert out.record["task_parameters"]["noise_level"] == kwargs["noise_level"]
    expected = size or (pipe.loaded.image_size,) * 2
    images = np.stack([np.asarray(im, dtype=np.float32) for im in out.images])
    assert len(out.images) == (4 if task == "class" else 2)
    assert out.images[0].size == tuple(expected)
    assert images.std() > 1.0  # not a constant image
    checkpoint = out.record["checkpoint"]
    assert checkpoint["format"] == "compvis" and set(checkpoint["tasks"]) == set(pipe.tasks)


@pytest.mark.parametrize("family", ["ldm_cin256", "sd_x4_upscaler"])
def test_family_samples_through_sample_py(family, inputs, tmp_path):
    encoder, task, kwargs, _, _ = FAMILIES[family]
    args = [
        f"task={task}",
        f"ckpt={GOLDENS / family / 'model.safetensors'}",
        f"config={GOLDENS / family / 'config.yaml'}",
    ]
    if encoder:
        args.append(f"text_encoder={_text_encoder(encoder, inputs)}")
    args += {
        "class": ["label=[3,5]"],
        "superres": [f"image={inputs['small']}", "prompt=a cat", "noise_level=30"],
    }[task]
    proc = subprocess.run(
        [sys.executable, "sample.py", *args, "n=1", "steps=2", "device=cpu", f"out_dir={tmp_path}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    record = json.loads((tmp_path / "run.json").read_text())
    assert record["task"] == task and len(record["images"]) == (2 if task == "class" else 1)
    assert "this model's tasks: " + ", ".join(record["checkpoint"]["tasks"]) in proc.stdout
