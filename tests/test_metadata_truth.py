"""A checkpoint's record is the truth (size, latent scale, schedule, EMA); wrong kinds of file are named."""

import copy
import json
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from ldm_fixtures import SIZE, build_sample_root, stage2_config
from safetensors.torch import load_file, save_file

from ldm.diffusion.schedules import NoiseSchedule
from ldm.errors import UserError
from ldm.interop import compvis
from ldm.interop.checkpoint import save_safetensors
from ldm.interop.load import load_model
from ldm.models.first_stage import codec_from_checkpoint
from ldm.samplers.sigmas import StepSchedule, sigma_to_timestep
from ldm.training.resume_check import check_resume_state


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return build_sample_root(tmp_path_factory.mktemp("truth"))


def _uncond_module(root: Path, **overrides):
    cfg = stage2_config(root / "ae" / "model.safetensors", {})
    cfg.update(overrides)
    return instantiate(copy.deepcopy(cfg)), cfg


def test_native_size_is_what_training_saw(root, tmp_path):
    """A model trained on cached 8x8 latents (f=4) samples 32 px, whatever data.resolution said (64)."""
    module, cfg = _uncond_module(root)
    batch = {"latent_mean": torch.randn(2, 4, 8, 8), "latent_logvar": torch.zeros(2, 4, 8, 8)}
    module._fixed_batch = batch  # what the first training step keeps for previews
    config = module.export_config({"model": cfg, "data": {"resolution": 64}})
    assert config["sample_size"] == [32, 32]
    save_safetensors(module.export_state_dict(), tmp_path / "model.safetensors", config)
    loaded = load_model(tmp_path / "model.safetensors")
    assert loaded.image_size == (32, 32)
    from ldm.sampling.tasks import Uncond

    assert Uncond().build(loaded, n=1).size == (32, 32)


def test_init_from_keeps_the_files_scale_factor(root, tmp_path, caplog):
    """init_from a file trained with scale_factor 0.18215 keeps it (a re-fit gave 3.43); refit on request."""
    source, cfg = _uncond_module(root)
    source.first_stage.scale_factor.fill_(0.18215)
    save_safetensors(source.export_state_dict(), tmp_path / "base.safetensors", None)
    cfg["first_stage"]["scale_factor"] = None  # the default: "fit from data"
    carried = instantiate(copy.deepcopy({**cfg, "init_from": str(tmp_path / "base.safetensors")}))
    assert float(carried.first_stage.scale_factor) == pytest.approx(0.18215)
    z = carried.latents({"latent": torch.randn(2, 4, 8, 8) * 5})  # a batch would have re-fitted it
    assert float(carried.first_stage.scale_factor) == pytest.approx(0.18215)
    assert z.std().item() == pytest.approx(5 * 0.18215, rel=0.2)
    refit = instantiate(
        copy.deepcopy({**cfg, "init_from": str(tmp_path / "base.safetensors"), "refit_scale_factor": True})
    )
    assert not refit.first_stage.scale_known
    assert "refit_scale_factor=true" in caplog.text


def test_spacing_follows_the_loaded_schedule():
    """An original file whose stored alphas_cumprod ends at zero SNR starts sampling at t=999 (trailing)."""
    ztsnr = NoiseSchedule(kind="scaled_linear", zero_terminal_snr=True).alphas_cumprod
    params = {"linear_start": 0.00085, "linear_end": 0.012}  # the yaml says plain SD v1
    loss = compvis.build_loss(params, {"alphas_cumprod": ztsnr})
    assert float(loss.schedule.alphas_cumprod[-1]) == 0.0
    from ldm.models.latent_diffusion import default_spacing

    spacing = default_spacing(loss.schedule.alphas_cumprod)
    assert spacing == "trailing"
    sigmas = StepSchedule(steps=10, spacing=spacing)(loss.schedule.alphas_cumprod)
    leading = StepSchedule(steps=10, spacing="leading")(loss.schedule.alphas_cumprod)
    # trailing starts at t=999 (sigma ~ 4096: pure noise); leading would start at t=901 (sigma 18.6)
    assert sigmas[0] > 1000 and leading[0] < 20
    assert int(sigma_to_timestep(loss.schedule.alphas_cumprod, leading[:1]).round()) == 901
    sd = compvis.build_loss(params, {})
    assert default_spacing(sd.schedule.alphas_cumprod) == "leading"


@pytest.mark.parametrize(
    "layout",
    [
        lambda n: "model_ema.diffusion_model" + n.replace(".", ""),  # LitEma (CompVis, Stability)
        lambda n: "model_ema.diffusion_model." + n,  # dots kept
        lambda n: "ema.model.diffusion_model." + n,  # re-saved by other tools
        lambda n: "model_ema.module.diffusion_model." + n,  # a DDP-wrapped EMA
    ],
)
def test_ema_shadows_found_in_every_layout(layout):
    names = ["input_blocks.0.0.weight", "out.2.bias"]
    state = {"model.diffusion_model." + n: torch.zeros(2) for n in names}
    state.update({layout(n): torch.ones(2) for n in names})
    state["model_ema.decay"] = torch.tensor(0.999)
    weights, used = compvis.unet_weights(state, names, use_ema=True)
    assert used and all(torch.equal(weights[n], torch.ones(2)) for n in names)


def test_ema_not_found_is_said(caplog):
    names = ["input_blocks.0.0.weight"]
    state = {
        "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2),
        "model_ema.other": torch.ones(2),
    }
    weights, used = compvis.unet_weights(state, names, use_ema=True)
    assert not used and torch.equal(weights[names[0]], torch.zeros(2))
    assert "none matches a UNet parameter" in caplog.text


def test_stage2_export_as_first_stage_is_named(root):
    with pytest.raises(UserError, match=r"is a text-to-image model, .*not an autoencoder"):
        codec_from_checkpoint(str(root / "txt2img" / "model.safetensors"))


def test_export_without_metadata_is_named(root, tmp_path):
    state = load_file(root / "class" / "model.safetensors")
    save_file(state, tmp_path / "stripped.safetensors")  # no metadata, no config.yaml beside it
    with pytest.raises(UserError, match="export whose config metadata was removed"):
        load_model(tmp_path / "stripped.safetensors")
    # ... and the run's config.yaml passed as config= brings it back
    loaded = load_model(tmp_path / "stripped.safetensors", config=root / "class" / "config.yaml")
    assert loaded.format == "export" and loaded.input_keys == ("label",)


def test_resume_from_another_experiments_checkpoint_is_one_line(root):
    module, _ = _uncond_module(root)
    other, _ = _uncond_module(root)
    state = {k: v for k, v in other.state_dict().items()}
    state["model.unet.input_blocks.0.0.weight"] = torch.zeros(32, 7, 3, 3)  # e.g. an inpainting UNet
    checkpoint = {"state_dict": state, "ldm_config": {"name": "inpaint"}}
    with pytest.raises(UserError) as err:
        check_resume_state(module, checkpoint)
    message = str(err.value)
    assert "experiment inpaint" in message and "model.unet.input_blocks.0.0.weight" in message
    assert "(32, 7, 3, 3) there and (32, 4, 3, 3) here" in message and "\n" not in message
    check_resume_state(module, {"state_dict": dict(module.state_dict())})  # its own checkpoint fits


def test_loaded_record_says_ema(root):
    loaded = load_model(root / "class" / "model.safetensors")
    assert loaded.describe()["used_ema"] is True
    assert json.loads(json.dumps(loaded.describe()))["image_size"] == SIZE
