"""txt2img's two-pass hires fix (ldm.sampling.tasks.Hires, issue 15) on the tiny SD-structured model."""

from pathlib import Path

import pytest
import torch

from ldm.errors import UserError
from ldm.interop.load import load_model
from ldm.pipeline import Pipeline, sampler_function
from ldm.samplers.sigmas import StepSchedule
from ldm.sampling import tasks as T
from ldm.sampling.runner import Settings, run_job

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["a red circle", "a circle"]


@pytest.fixture(scope="module")
def loaded(sd_base):
    path, yaml, tokenizer = sd_base
    return load_model(path, config=yaml, text_encoder=str(tokenizer))


def settings(loaded, **kw) -> Settings:
    base = {
        "sampler": sampler_function("ddim"),
        "steps": StepSchedule(steps=4, spacing=loaded.model.default_spacing),
        "cfg_scale": 3.0,
        "seed": 7,
        "batch_size": 2,
        "progress": False,
    }
    return Settings(**{**base, **kw})


@pytest.fixture(scope="module")
def first_pass(loaded):
    """The plain native-size txt2img run (64 px) that hires starts from."""
    plain = T.Txt2Img(prompt=PROMPTS)
    job = plain.build(loaded, n=1)
    return plain, job, run_job(loaded, job, settings(loaded))


def test_second_pass_is_img2img_of_the_upscaled_first_pass(loaded, first_pass):
    task = T.Txt2Img(prompt=PROMPTS, hires={"scale": 2, "strength": 0.5})
    job = task.build(loaded, n=1)
    assert job.size == (128, 128)
    result = task.sample(loaded, job, settings(loaded))
    assert result.images.shape == (2, 3, 128, 128) and result.latents.shape == (2, 4, 16, 16)
    assert result.seeds == [7, 8]
    record = job.params["hires"]
    assert record["first_pass_size"] == [64, 64] and record["second_pass"] == "img2img"
    assert record["second_pass_steps"] == 2 and record["upscale"].startswith("bicubic")
    plain, native, first = first_pass
    upscaled = T.upscale_pixels(first.images, (128, 128))
    for i in range(2):  # image i = img2img of its own upscaled first-pass image, seed 7 + i
        one = plain.job(
            loaded, (128, 128), [native.per_image[i]], init_image=upscaled[i : i + 1], strength=0.5
        )
        expected = run_job(loaded, one, settings(loaded, seed=7 + i, batch_size=1)).images
        assert torch.equal(result.images[i : i + 1], expected)
    # the second pass changed the upscaled images
    assert (result.images - upscaled).abs().mean() > 0.01


def test_strength_zero_returns_the_upscaled_first_pass(loaded, first_pass):
    task = T.Txt2Img(prompt=PROMPTS, hires={"scale": 1.5, "strength": 0, "steps": 6})
    job = task.build(loaded, n=1)
    assert job.size == (96, 96)
    result = task.sample(loaded, job, settings(loaded))
    _, _, first = first_pass
    assert torch.equal(result.images, T.upscale_pixels(first.images, (96, 96)))
    assert result.latents.shape == (2, 4, 12, 12)
    assert job.params["hires"]["second_pass"] == "none (strength 0)"
    assert job.params["hires"]["second_pass_steps"] == 0


def test_hires_steps_sets_the_second_schedule(loaded):
    task = T.Txt2Img(prompt="a red circle", hires={"scale": 1.25, "strength": 0.5, "steps": 6})
    job = task.build(loaded, n=1)
    assert job.size == (80, 80)
    result = task.sample(loaded, job, settings(loaded, steps=StepSchedule(steps=2)))
    assert result.images.shape == (1, 3, 80, 80) and job.params["hires"]["second_pass_steps"] == 3


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"scale": 0.5}, "hires.scale=0.5"),
        ({"scale": "2x"}, "hires.scale=2x"),
        ({"scale": 2, "strength": 1.5}, "hires.strength=1.5"),
        ({"scale": 2, "steps": 0}, "hires.steps=0"),
        ({"scale": 2, "denoise": 0.3}, "unknown keys \\['denoise'\\]"),
        ("2", "hires='2'"),
    ],
)
def test_hires_option_errors(value, message):
    with pytest.raises(UserError, match=message):
        T.Hires.parse(value)


def test_hires_option_values():
    assert T.Hires.parse(None) is None and T.Hires.parse({"scale": None, "strength": 0.5}) is None
    assert T.Hires.parse({"scale": 1}) is None
    assert T.Hires.parse({"scale": 2, "strength": None}) == T.Hires(2.0, 0.5, None)


def test_sample_config_composes_hires(sd_base):
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from ldm.config_checks import check_sample_config

    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
        overrides = [f"ckpt={sd_base[0]}", f"config={sd_base[1]}", "prompt=a red circle"]
        cfg = compose("sample", overrides=[*overrides, "hires.scale=2", "hires.strength=0.3"])
    check_sample_config(cfg)
    task = instantiate(cfg.task, _convert_="all")
    assert isinstance(task, T.Txt2Img) and task.hires == T.Hires(2.0, 0.3, None)
    assert cfg.vae_tiling == "auto" and cfg.vae_tile_size == 512 and cfg.vae_tile_overlap == 128


def test_pipeline_records_the_hires_pass(sd_base):
    path, yaml, tokenizer = sd_base
    pipe = Pipeline.from_file(path, config=yaml, text_encoder=str(tokenizer), device="cpu")
    out = pipe.txt2img("a red circle", hires={"scale": 2, "strength": 0.5}, steps=4, n=1)
    assert out.images[0].size == (128, 128) and out.record["size"] == {"height": 128, "width": 128}
    hires = out.record["task_parameters"]["hires"]
    assert hires["first_pass_size"] == [64, 64] and hires["second_pass_steps"] == 2
