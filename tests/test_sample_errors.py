"""sample.py on bad input: one clear message per mistake (UserError -> one line, exit 2); the CLI."""

import copy
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import MissingConfigException
from hydra.utils import instantiate
from ldm_fixtures import autoencoder_config, stage2_config
from PIL import Image

from ldm.errors import UserError
from ldm.interop.checkpoint import save_safetensors

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from sample import sample  # noqa: E402

AUTOENCODER = autoencoder_config(16, (1, 1))
# A text model with a small BERT trained from scratch (no pretrained encoder to load: fast to start).
BERT = {
    "text": {
        "_target_": "ldm.conditioning.BERTEmbedder",
        "n_layer": 1,
        "n_embed": 32,
        "max_length": 8,
        "n_heads": 2,
        "dropout": 0.1,
    }
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sample_errors")
    torch.manual_seed(0)
    ae_path = save_safetensors(
        instantiate(AUTOENCODER).state_dict(),
        root / "ae" / "model.safetensors",
        {
            "model": {
                "_target_": "ldm.training.autoencoder_module.AutoencoderModule",
                "autoencoder": AUTOENCODER,
            }
        },
    )
    for name, conditioners, unet in (("text", BERT, {"context_dim": 32}), ("uncond", {}, {})):
        cfg = stage2_config(
            ae_path,
            copy.deepcopy(conditioners),
            scale_factor=1.0,
            ema_decay=0.0,
            attention_resolutions=[],
            channel_mult=[1],
            **unet,
        )
        module = instantiate(copy.deepcopy(cfg))
        config = module.export_config({"model": cfg, "data": {"resolution": 16}})
        save_safetensors(module.export_state_dict(), root / name / "model.safetensors", config)
    Image.fromarray(np.full((16, 16, 3), 200, np.uint8)).save(root / "image.png")
    Image.fromarray(np.full((8, 12), 255, np.uint8)).save(root / "mask_8x12.png")
    (root / "garbage.png").write_bytes(b"this is not a PNG file")
    data = (root / "image.png").read_bytes()
    (root / "truncated.png").write_bytes(data[: len(data) // 2])
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(root / "segmap.png")
    return root


def run(root: Path, model: str, *overrides: str) -> dict:
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(
            "sample",
            overrides=[
                f"ckpt={root / model / 'model.safetensors'}",
                f"out_dir={root / 'out'}",
                "steps=2",
                "n=1",
                "progress=false",
                *overrides,
            ],
        )
    return sample(cfg)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["task=img2img", "image=missing.png"], r"image=missing.png: no such file"),
        (["task=img2img", "image={root}/garbage.png"], r"garbage.png is not a readable image"),
        (["task=img2img", "image={root}/truncated.png"], r"truncated.png is not a readable image"),
        (["task=inpaint", "image={root}/image.png"], r"task=inpaint needs mask="),
        (["task=outpaint", "image={root}/image.png"], r"task=outpaint needs pad="),
        (["task=txt2img"], r"task=txt2img needs a prompt"),
        (["task=txt2img", "prompt=x", "height=9"], r"height=9: must be a positive multiple of 2"),
        (["task=txt2img", "prompt=x", "precision=fp8"], r"precision=fp8: use one of fp32, bf16, fp16"),
        (["task=img2img", "strength=2", "image={root}/image.png"], r"strength=2.0: must be in \(0, 1\]"),
        (["task=txt2img", "prompt=x", "spacing=random"], r"spacing='random' is not one of"),
        (
            ["task=semantic", "segmap={root}/segmap.png"],
            r"task=semantic needs a model conditioned on a segmentation map, but .* is conditioned on "
            r"text prompts \('caption'\); it supports: txt2img, img2img, inpaint, outpaint",
        ),
        (["task=superres", "image={root}/image.png"], r"supports: txt2img, img2img, inpaint, outpaint"),
    ],
)
def test_bad_input_on_a_text_model(root, overrides, message):
    with pytest.raises(UserError, match=message):
        run(root, "text", *(o.format(root=root) for o in overrides))


def test_task_the_unconditional_model_cannot_do(root):
    with pytest.raises(
        UserError, match=r"task=class needs a model conditioned on class labels.*supports: uncond"
    ):
        run(root, "uncond", "task=class", "label=1")


def test_stage1_autoencoder_and_missing_checkpoint(root):
    with pytest.raises(UserError, match=r"stage-1 autoencoder \(AutoencoderKL\).*needs a stage-2 model"):
        run(root, "ae")
    with pytest.raises(UserError, match="pass ckpt="):
        run(root, "text", "ckpt=null")


def test_mask_of_another_size_is_resized_with_a_warning(root, caplog):
    with caplog.at_level(logging.WARNING):
        record = run(
            root, "text", "task=inpaint", f"image={root / 'image.png'}", f"mask={root / 'mask_8x12.png'}"
        )
    assert "mask=" in caplog.text and "is 12x8 but the image is 16x16" in caplog.text
    with Image.open(Path(record["out_dir"]) / record["images"][0]["file"]) as img:
        assert img.size == (16, 16)


def test_unknown_task_lists_the_available_ones():
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        with pytest.raises(MissingConfigException) as info:
            compose("sample", overrides=["task=painting"])
    text = str(info.value) + str(getattr(info.value, "options", ""))
    assert "painting" in text and all(t in text for t in ("txt2img", "inpaint", "semantic", "uncond"))


# -- the command line ----------------------------------------------------------------------------------------


def cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "sample.py", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )


def test_cli_writes_images_and_says_where(root):
    out = root / "cli"
    proc = cli(
        "task=txt2img",
        f"ckpt={root / 'text' / 'model.safetensors'}",
        "prompt=a red circle",
        "n=4",
        "steps=2",
        f"out_dir={out}",
    )
    assert proc.returncode == 0, proc.stderr
    assert f"wrote 4 image(s), grid.png and run.json to {out}" in proc.stdout
    assert (
        len(list(out.glob("*_seed*.png"))) == 4
        and (out / "grid.png").is_file()
        and (out / "run.json").is_file()
    )


def main_in_process(monkeypatch, *args: str) -> int:
    """Run sample.py's Hydra entry point in this process (no interpreter start-up); returns the exit code."""
    import runpy

    monkeypatch.setattr(sys, "argv", ["sample.py", *args])
    with pytest.raises(SystemExit) as info:
        runpy.run_path(str(REPO / "sample.py"), run_name="__main__")  # as `python sample.py` runs it
    return info.value.code


def test_cli_user_error_is_one_line_and_exit_2(root, monkeypatch, capsys):
    code = main_in_process(
        monkeypatch,
        "task=semantic",
        f"ckpt={root / 'text' / 'model.safetensors'}",
        f"segmap={root / 'segmap.png'}",
        f"out_dir={root / 'cli_err'}",
        "hydra/job_logging=none",
    )
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: task=semantic needs")
    assert "it supports: txt2img, img2img, inpaint, outpaint" in lines[0]


def test_cli_unknown_task_lists_the_available_ones(root, monkeypatch, capsys):
    code = main_in_process(monkeypatch, "task=painting", f"ckpt={root / 'text' / 'model.safetensors'}")
    err = capsys.readouterr().err
    assert code == 1 and "Could not find 'task/painting'" in err
    assert "Available options" in err and all(t in err for t in ("txt2img", "outpaint", "superres", "class"))


def test_failed_run_leaves_no_empty_output_folder(tmp_path):
    bad = tmp_path / "garbage.safetensors"
    bad.write_bytes(b"not a checkpoint at all")
    out = tmp_path / "out"
    result = cli(f"ckpt={bad}", "prompt=x", f"out_dir={out}")
    assert result.returncode == 2 and "not a valid safetensors file" in result.stderr
    assert not out.exists()  # Hydra made it (.hydra/, sample.log) before the load failed; it is gone


def test_help_lists_only_this_scripts_config_groups():
    sample_help = cli("--help").stdout
    assert "task: class, img2img" in sample_help and "sampler: ddim" in sample_help
    assert "experiment:" not in sample_help and "trainer:" not in sample_help
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    train_help = subprocess.run(
        [sys.executable, "train.py", "--help"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    ).stdout
    assert "experiment: autoencoder_kl" in train_help and "trainer: cpu" in train_help
    assert "\ntask:" not in train_help
