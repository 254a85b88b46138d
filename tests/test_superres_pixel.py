"""Pixel-space residual super-resolution (experiment=superres_pixel): SpaceToDepth is lossless, the model
diffuses image - bicubic(lowres), and an untrained model (zero-initialised output conv, x0 prediction) returns
exactly the bicubic upscale through every path (LatentDiffusion.sample, export + Pipeline, evaluate)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from train_helpers import compose_train, tiny_overrides

import train
from ldm.conditioning import SuperResConditioner
from ldm.conditioning.conditioner import Conditioner
from ldm.diffusion.loss import DiffusionLoss
from ldm.diffusion.schedules import NoiseSchedule
from ldm.errors import UserError
from ldm.evaluate.run import bicubic_upscale
from ldm.interop.checkpoint import load_state_dict
from ldm.models.autoencoder import SpaceToDepth
from ldm.models.first_stage import space_to_depth_codec
from ldm.models.latent_diffusion import LatentDiffusion
from ldm.modules.unet import UNetModel
from ldm.pipeline import Pipeline
from ldm.samplers import sample_ddim
from ldm.samplers.sigmas import StepSchedule


def test_space_to_depth_is_lossless():
    x = torch.randn(2, 3, 16, 24)
    s2d = SpaceToDepth(4)
    z = s2d.encode_latent(x)
    assert z.shape == (2, 48, 4, 6) and s2d.latent_channels == 48 and s2d.downsample_factor == 4
    assert torch.equal(s2d.decode_latent(z), x)
    # block (0, 0) of channel 0 holds the top-left 4x4 pixels, row by row
    assert torch.equal(z[0, :16, 0, 0], x[0, 0, :4, :4].reshape(-1))


def test_pixel_first_stage_refuses_a_checkpoint():
    with pytest.raises(UserError, match="first_stage_ckpt=ae.safetensors .*pixel space"):
        space_to_depth_codec(4, path="ae.safetensors")


def tiny_residual_model(residual_over: str | None = "lowres") -> LatentDiffusion:
    unet = UNetModel(
        in_channels=48 + 3,
        out_channels=48,
        model_channels=32,
        num_res_blocks=1,
        attention_resolutions=[],
        channel_mult=[1, 2],
        num_head_channels=32,
    )
    return LatentDiffusion(
        unet=unet,
        conditioner=Conditioner({"lowres": SuperResConditioner(upscale=1.0)}),
        first_stage=space_to_depth_codec(4, scale_factor=10.0),
        loss=DiffusionLoss(NoiseSchedule(zero_terminal_snr=True), parameterization="x0"),
        residual_over=residual_over,
    )


def test_untrained_residual_model_samples_the_bicubic_upscale():
    torch.manual_seed(0)
    model = tiny_residual_model().eval()
    lowres = torch.rand(2, 3, 8, 12) * 2 - 1
    out = model.sample({"lowres": lowres}, [0, 1], 1.0, sample_ddim, StepSchedule(4, spacing="trailing"))
    bicubic = F.interpolate(lowres, size=(32, 48), mode="bicubic", align_corners=False).clamp(-1, 1)
    assert out.shape == (2, 3, 32, 48)
    torch.testing.assert_close(out, bicubic, atol=1e-5, rtol=0)


def test_training_target_is_the_residual_over_bicubic():
    model = tiny_residual_model()
    lowres = torch.rand(2, 3, 8, 8) * 2 - 1
    bicubic = F.interpolate(lowres, size=(32, 32), mode="bicubic", align_corners=False).clamp(-1, 1)
    detail = torch.zeros_like(bicubic)
    detail[:, :, 5, 7] = 0.25  # one pixel the low-res input cannot show
    z = model.latents({"image": bicubic + detail, "lowres": lowres})
    assert z.shape == (2, 48, 8, 8)
    # the residual is the detail alone (scaled by 10), placed where SpaceToDepth puts pixel (5, 7)
    expected = 10.0 * F.pixel_unshuffle(detail, 4)
    torch.testing.assert_close(z, expected, atol=1e-5, rtol=0)


def test_unknown_residual_base_is_refused():
    with pytest.raises(UserError, match="residual_over='highres'"):
        tiny_residual_model(residual_over="highres")


def test_superres_pixel_export_samples_bicubic_until_trained(tiny_data, tmp_path, capsys):
    # lr 1e-12: the output conv stays ~zero, so the x0 model predicts no residual: every path gives bicubic
    run_dir = tmp_path / "runs" / "superres_pixel" / "run"
    overrides = tiny_overrides("superres_pixel", tiny_data, run_dir, None, max_steps=2)
    overrides += ["model.optim.lr=1e-12", "model.ema_decay=0"]
    train.train(compose_train(overrides))
    export = run_dir / "model.safetensors"
    _, config = load_state_dict(export)
    assert config["model"]["residual_over"] == "lowres"

    rng = np.random.default_rng(0)
    low = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    pipe = Pipeline.from_file(export, device="cpu")
    image = pipe.superres(Image.fromarray(low), n=1, steps=3, cfg_scale=1.0).images[0]
    got = torch.from_numpy(np.array(image)).permute(2, 0, 1)
    want = bicubic_upscale(torch.from_numpy(low).permute(2, 0, 1)[None], 32)[0]
    assert got.shape == (3, 32, 32)
    assert (got.int() - want.int()).abs().max() <= 1  # float rounding at the uint8 edge

    # no original / diffusers layout adds the bicubic base back: `export` keeps ldm's layout (which still
    # loads with residual_over) and --format diffusers (text-to-image only) is refused with the reason
    from ldm.interop.export import main as export_main

    out = tmp_path / "exported.safetensors"
    assert export_main([str(run_dir), str(out)]) == 0
    again = Pipeline.from_file(out, device="cpu").superres(Image.fromarray(low), n=1, steps=3, cfg_scale=1.0)
    assert np.array_equal(np.array(again.images[0]), np.array(image))
    capsys.readouterr()
    assert export_main([str(run_dir), str(tmp_path / "diffusers"), "--format", "diffusers"]) == 2
    assert "SuperResConditioner" in capsys.readouterr().err
    assert not (tmp_path / "diffusers").exists()
