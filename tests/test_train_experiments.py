"""Every `experiment=` composes and trains a few steps through `train.train`; entry-point errors are clear."""

from __future__ import annotations

import math
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image
from train_helpers import (
    EXPERIMENTS,
    PIXEL_SPACE,
    RESOLUTION,
    STAGE1,
    compose_train,
    load_ckpt,
    run_train,
    tiny_overrides,
)

import train
from ldm.interop.checkpoint import load_state_dict

STEPS = 4
# UNet input channels each recipe implies with a 4-channel latent (latent + concatenated conditions)
UNET_IN = {"inpaint": 9, "semantic": 10, "superres": 7, "superres_pixel": 51}


def test_every_experiment_file_is_covered():
    assert len(EXPERIMENTS) >= 9 and {"autoencoder_kl", "txt2img", "inpaint"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_trains_a_few_steps(experiment, tiny_data, tiny_ae, tmp_path):  # noqa: F811
    run_dir = tmp_path / "runs" / experiment / "run"
    cfg = compose_train(tiny_overrides(experiment, tiny_data, run_dir, tiny_ae, max_steps=STEPS))
    assert cfg.name == experiment
    metrics = train.train(cfg)

    # finite training and validation metrics
    loss_key = "train/g_loss" if experiment in STAGE1 else "train/loss"
    assert loss_key in metrics and "val/loss" in metrics, sorted(metrics)
    assert all(math.isfinite(v) for v in metrics.values()), metrics
    if experiment in PIXEL_SPACE:  # x0 of a residual scaled to std ~0.3: starts near its variance
        assert 0.0 < metrics["train/loss"] < 1.0
    elif experiment not in STAGE1:  # eps-prediction starts near the noise variance
        assert 0.2 < metrics["train/loss"] < 3.0

    # a resumable checkpoint of the final step (saved every 2 steps)
    ckpt = load_ckpt(run_dir / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == STEPS and ckpt["optimizer_states"] and "loops" in ckpt
    assert ckpt["ldm_config"]["name"] == experiment
    assert (run_dir / "config.yaml").is_file()
    assert (tmp_path / "runs" / experiment / "latest").resolve() == run_dir.resolve()

    # the export names the experiment and carries the right weights
    state, config = load_state_dict(run_dir / "model.safetensors")
    assert config["name"] == experiment
    if experiment in STAGE1:
        assert "encoder.conv_in.weight" in state and not any(k.startswith("loss.") for k in state)
        latent_channels = 4 if experiment == "autoencoder_kl" else 3
        assert state["quant_conv.weight"].shape[0] == latent_channels * (
            2 if experiment.endswith("kl") else 1
        )
    else:
        w_in = state["model.diffusion_model.input_blocks.0.0.weight"]
        assert w_in.shape[1] == UNET_IN.get(experiment, 4)
        assert torch.isfinite(state["scale_factor"]) and state["scale_factor"] > 0
        if experiment in PIXEL_SPACE:  # parameter-free first stage: nothing stored but its config
            assert not any(k.startswith("first_stage_model.") for k in state)
            assert config["first_stage_autoencoder"]["_target_"].endswith("SpaceToDepth")
            assert config["model"]["residual_over"] == "lowres"
        else:
            assert any(k.startswith("first_stage_model.") for k in state)
            assert config["first_stage_autoencoder"]["ddconfig"]["ch_mult"] == [1, 2]

    # image grids: a row of 4 images (32 px; the x4 low-res inputs 8 px) with 2 px padding, not blank
    grids = sorted((run_dir / "images").glob("train_*_step000002.png"))
    names = {p.name.split("_step")[0] for p in grids}
    assert {"train_inputs", "train_reconstructions" if experiment in STAGE1 else "train_samples"} <= names
    for path in grids:
        side = RESOLUTION // 4 if "lowres" in path.name else RESOLUTION
        pixels = np.asarray(Image.open(path).convert("RGB"))
        assert pixels.shape == (side + 4, 4 * (side + 2) + 2, 3), path.name
        assert pixels.std() > 1.0, f"{path.name} is blank"


def _combined(result: subprocess.CompletedProcess) -> str:
    return result.stdout + result.stderr


def test_unknown_experiment_lists_the_options(tmp_path):
    result = run_train(["experiment=nope"], LDM_ROOT=str(tmp_path))
    out = _combined(result)
    assert result.returncode != 0
    assert "Could not find 'experiment/nope'" in out
    assert all(name in out for name in EXPERIMENTS), out  # "Available options in 'experiment'"
    assert "Traceback" not in out


def test_unknown_config_key_is_named(tmp_path):
    result = run_train(["experiment=uncond", "trainer.max_stepz=3"], LDM_ROOT=str(tmp_path))
    out = _combined(result)
    assert result.returncode != 0
    assert "trainer.max_stepz" in out and "not in struct" in out
    assert "Traceback" not in out


def test_shard_spec_matching_nothing_is_one_error_line(tmp_path, tiny_ae):  # noqa: F811
    missing = tmp_path / "nowhere" / "train-*.tar"
    args = ["experiment=uncond", "logger=csv", f"first_stage_ckpt={tiny_ae}", f"data.train_shards={missing}"]
    result = run_train(args, LDM_ROOT=str(tmp_path))
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2, _combined(result)
    assert len(errors) == 1 and "train_shards" in errors[0] and str(missing) in errors[0], errors
    assert "Traceback" not in _combined(result)


def test_stage2_without_first_stage_says_how_to_get_one(tmp_path):
    # LDM_ROOT without outputs/autoencoder_kl/latest: no demo autoencoder to fall back on
    result = run_train(["experiment=txt2img", "logger=csv"], LDM_ROOT=str(tmp_path))
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2, _combined(result)
    assert len(errors) == 1, _combined(result)
    assert "first_stage_ckpt" in errors[0] and "experiment=autoencoder_kl" in errors[0]
    assert "Traceback" not in _combined(result)


def test_fsdp_trainer_config_builds_the_strategy():
    """trainer=fsdp composes and its strategy gets real classes for the wrap policy (runs need GPUs)."""
    import os

    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from pytorch_lightning.strategies import FSDPStrategy

    from ldm.modules.attention import SpatialTransformer
    from ldm.modules.unet import ResBlock

    conf = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")
    with initialize_config_dir(config_dir=conf, version_base="1.3"):
        cfg = compose("train", overrides=["experiment=txt2img", "trainer=fsdp"])
    strategy = instantiate(cfg.trainer.strategy)
    assert isinstance(strategy, FSDPStrategy)
    policy = strategy.kwargs["auto_wrap_policy"]  # torch's ModuleWrapPolicy over the named classes
    assert {ResBlock, SpatialTransformer} == set(policy._module_classes)
