"""sample.py tasks end to end on tiny random models: files, sizes, seeds, inpainting and outpainting maths."""

import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from ldm_fixtures import F_AE, SIZE, build_sample_root
from PIL import Image

from ldm.errors import UserError
from ldm.interop.load import load_model
from ldm.samplers.base import generators_from_seeds, randn
from ldm.samplers.sigmas import StepSchedule, truncate_for_strength
from ldm.sampling import Settings, run_job
from ldm.sampling.inputs import load_image
from ldm.sampling.tasks import ClassCond, Img2Img, Inpaint, Outpaint, Txt2Img, Uncond, extend_canvas

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from sample import sample  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models on 2 shared cores: a second intra-op thread costs more in barriers than it saves."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """Tiny exported models (random weights) and input images, built once for this file."""
    return build_sample_root(tmp_path_factory.mktemp("sample"))


def run_sample(root: Path, model: str, *overrides: str) -> dict:
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(
            "sample",
            overrides=[
                f"ckpt={root / model / 'model.safetensors'}",
                f"out_dir={root / 'out' / model}",
                "steps=3",
                "progress=false",
                *overrides,
            ],
        )
    return sample(cfg)


def check_outputs(record: dict, n: int, size: tuple[int, int]) -> list[dict]:
    """n PNGs of `size` with their parameters, a grid, run.json: returns each image's parameters."""
    out = Path(record["out_dir"])
    assert json.loads((out / "run.json").read_text())["seeds"] == record["seeds"]
    assert len(record["images"]) == n
    params = []
    for entry in record["images"]:
        with Image.open(out / entry["file"]) as img:
            assert img.size == (size[1], size[0])
            params.append(json.loads(img.text["parameters"]))
    with Image.open(out / record["grid"]) as grid:
        assert grid.size[0] > size[1]
    assert record["timings"]["sample_s"] > 0 and record["timings"]["total_s"] >= record["timings"]["sample_s"]
    return params


def pixels(record: dict, i: int) -> np.ndarray:
    with Image.open(Path(record["out_dir"]) / record["images"][i]["file"]) as img:
        return np.asarray(img).astype(np.float32)


# -- every task end to end -----------------------------------------------------------------------------------


def test_txt2img_prompt_file_files_and_metadata(root):
    record = run_sample(
        root,
        "txt2img",
        f"prompt_file={root / 'prompts.txt'}",
        "n=2",
        "seed=7",
        "batch_size=3",
        "negative_prompt=blurry",
    )
    params = check_outputs(record, 4, (SIZE, SIZE))
    assert [p["prompt"] for p in params] == ["a red circle"] * 2 + ["a blue square"] * 2
    assert [p["seed"] for p in params] == [7, 8, 9, 10]
    assert {p["negative_prompt"] for p in params} == {"blurry"}
    assert params[0]["steps"] == 3 and params[0]["sampler_name"] == "sample_ddim" and params[0]["used_ema"]
    assert record["checkpoint"]["format"] == "export" and record["guidance"]
    # spacing=auto: SD's schedule (no zero-terminal SNR) keeps CompVis' leading spacing
    assert record["parameters"]["spacing"] == "leading" and params[0]["spacing"] == "leading"
    assert np.abs(pixels(record, 0) - pixels(record, 1)).mean() > 1  # different seeds, different images


def test_uncond_non_square_size_and_class_labels(root):
    record = run_sample(root, "uncond", "task=uncond", "n=2", "height=16", "width=24", "spacing=leading")
    check_outputs(record, 2, (16, 24))
    assert record["parameters"]["spacing"] == "leading"  # given explicitly: not replaced by auto
    # spacing=auto on a zero-terminal-SNR model: start at its pure-noise step (trailing, Lin et al. 2024)
    record = run_sample(root, "uncond_v_ztsnr", "task=uncond", "n=1")
    assert record["parameters"]["spacing"] == "trailing"
    assert np.isfinite(pixels(record, 0)).all() and pixels(record, 0).std() > 1  # not a flat image
    assert not record["guidance"]  # nothing to guide: no doubled batch
    record = run_sample(root, "class", "task=class", "label=[0,2]", "n=2")
    params = check_outputs(record, 4, (SIZE, SIZE))
    assert [p["label"] for p in params] == [0, 0, 2, 2]
    # each file says its class, so a folder of many labels stays sortable by class
    assert [e["file"] for e in record["images"]] == [
        "0000_label0_seed0.png",
        "0001_label0_seed1.png",
        "0002_label2_seed2.png",
        "0003_label2_seed3.png",
    ]
    assert all((Path(record["out_dir"]) / e["file"]).is_file() for e in record["images"])
    assert record["guidance"]  # the null class


def test_uncond_from_a_text_model_is_its_empty_prompt(root):
    # The empty prompt is the null condition: both guidance branches agree, so the scale cannot matter.
    a = run_sample(root, "txt2img", "task=uncond", "n=2", "cfg_scale=1")
    assert [p["prompt"] for p in check_outputs(a, 2, (SIZE, SIZE))] == ["", ""]
    first, second = pixels(a, 0), pixels(a, 1)  # read now: the next run writes to the same folder
    assert np.abs(first - second).mean() > 1  # different seeds, different images
    b = run_sample(root, "txt2img", "task=uncond", "n=2", "cfg_scale=7")
    assert np.abs(first - pixels(b, 0)).max() <= 1  # equal up to PNG rounding


def test_superres_upscales_by_the_models_factor(root):
    record = run_sample(root, "superres", "task=superres", f"image={root / 'lowres.png'}", "n=1")
    params = check_outputs(record, 1, (SIZE, SIZE))  # 8x8 in, x4 out
    assert params[0]["upscale"] == 4


def test_semantic_output_matches_segmap_size(root):
    record = run_sample(root, "semantic", "task=semantic", f"segmap={root / 'segmap.png'}", "n=2")
    check_outputs(record, 2, (SIZE, SIZE))


def test_img2img_starts_from_the_image_noised_to_strength(root):
    loaded = load_model(root / "txt2img" / "model.safetensors")
    with (
        torch.no_grad()
    ):  # eps = 0 everywhere: DDIM then keeps x where it started, so the output is the start
        loaded.model.unet.out[-1].weight.zero_()
        loaded.model.unet.out[-1].bias.zero_()
    init = loaded.model.first_stage.encode_pixels(load_image(root / "image.png"), sample=False)
    noise = randn((2, 4, SIZE // F_AE, SIZE // F_AE), generators_from_seeds([0, 1]))
    for strength in (0.3, 0.6):
        job = Img2Img(image=str(root / "image.png"), strength=strength, prompt="a red circle").build(
            loaded, n=2
        )
        assert job.size == (SIZE, SIZE) and job.strength == strength
        result = run_job(loaded, job, settings(steps=10))
        sigmas = truncate_for_strength(
            StepSchedule(steps=10)(loaded.model.loss.schedule.alphas_cumprod), strength
        )
        assert len(sigmas) == int(strength * 10) + 1  # SDEdit: only the last strength x steps run
        torch.testing.assert_close(result.latents, init + sigmas[0] * noise, rtol=1e-5, atol=1e-5)


def settings(**kw) -> Settings:
    from ldm.samplers import sample_ddim

    base = dict(
        sampler=sample_ddim,
        steps=StepSchedule(steps=kw.pop("steps", 4)),
        cfg_scale=3.0,
        batch_size=4,
        seed=0,
        progress=False,
    )
    return Settings(**{**base, **kw})


def reconstruction(loaded, path) -> torch.Tensor:
    """decode(encode(image)): what the autoencoder alone gives back."""
    with torch.no_grad():
        codec = loaded.model.first_stage
        return codec.decode(codec.encode_pixels(load_image(path), sample=False)).clamp(-1, 1)


# -- seeds --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "plms", "dpmpp_2m", "euler", "euler_a"])
def test_seeds_reproduce_images_whatever_the_batch_size(root, sampler):
    from omegaconf import OmegaConf

    loaded = load_model(root / "class" / "model.safetensors")
    fn = instantiate(OmegaConf.load(REPO / "conf" / "sampler" / f"{sampler}.yaml"))
    job = ClassCond(label=[1]).build(loaded, n=4, height=16, width=16)
    together = run_job(loaded, job, settings(sampler=fn, batch_size=4, steps=3))
    alone = run_job(loaded, job, settings(sampler=fn, batch_size=1, steps=3))
    # Same noise per image; the only difference left is float32 rounding: CPU GEMM kernels are chosen by
    # batch size, so the UNet's first Linear already differs by ~1e-7 between a batch of 8 and of 2.
    # Measured: images within ~5e-6, latents (|z| up to ~10) within ~1.5e-5; bounds with margin.
    torch.testing.assert_close(together.images, alone.images, rtol=0, atol=2e-5)
    torch.testing.assert_close(together.latents, alone.latents, rtol=1e-5, atol=5e-5)
    shifted = run_job(
        loaded,
        ClassCond(label=[1]).build(loaded, n=2, height=16, width=16),
        settings(sampler=fn, seed=2, steps=3),
    )
    torch.testing.assert_close(shifted.images, together.images[2:], rtol=0, atol=2e-5)  # image i = seed + i
    assert (together.images[0] - together.images[1]).abs().mean() > 1e-3


# -- inpainting and outpainting ------------------------------------------------------------------------------


class BlockAutoencoder(torch.nn.Module):
    """A perfectly local first stage: latent = 4x4 block means (+ a zero channel), decode = upsampling.

    The random CompVis decoder mixes the whole image (GroupNorm statistics, mid-block attention), so only
    a local decoder can show pixel by pixel what latent blending keeps.
    """

    latent_channels, downsample_factor = 4, F_AE

    def encode_latent(self, x, sample=False, generator=None):
        means = F.avg_pool2d(x, F_AE)  # (B, 3, h, w)
        return torch.cat([means, torch.zeros_like(means[:, :1])], dim=1)

    def decode_latent(self, z):
        return F.interpolate(z[:, :3], scale_factor=F_AE, mode="nearest")


def test_inpaint_by_blending_keeps_the_unmasked_area(root):
    loaded = load_model(root / "txt2img" / "model.safetensors")
    job = Inpaint(image=str(root / "image.png"), mask=str(root / "mask.png"), prompt="a blue square").build(
        loaded, n=2
    )
    assert job.blend_mask is not None and job.params["inpaint_mode"] == "blend"
    keep = F.max_pool2d(job.blend_mask, F_AE) == 0  # latent cells with no masked pixel
    # The kept latent cells are the image's latents exactly: the final step pastes them without noise.
    result = run_job(loaded, job, settings(steps=4))
    init = loaded.model.first_stage.encode_pixels(job.init_image, sample=False)
    torch.testing.assert_close(result.latents * keep, init.expand(2, -1, -1, -1) * keep, rtol=0, atol=1e-6)
    assert ((result.latents - init) * ~keep).abs().mean() > 0.1  # ... and the masked ones were regenerated
    # Pixels outside the mask are the input's own (pasted back), inside they are new.
    outside = (job.paste_mask == 0).expand_as(result.images)
    assert outside.float().mean() > 0.5
    assert torch.equal(result.images[outside], job.init_image.expand_as(result.images)[outside])
    # Without paste, with a local first stage: unmasked pixels are decode(encode(image)), masked ones new.
    job = Inpaint(
        image=str(root / "image.png"), mask=str(root / "mask.png"), prompt="a blue square", paste=False
    ).build(loaded, n=2)
    assert job.paste_mask is None
    loaded.model.first_stage.autoencoder = BlockAutoencoder()
    result = run_job(loaded, job, settings(steps=4))
    recon = reconstruction(loaded, root / "image.png")
    kept = F.interpolate(keep.float(), scale_factor=F_AE).bool().expand_as(result.images)
    assert kept.float().mean() > 0.5
    torch.testing.assert_close(result.images[kept], recon.expand_as(result.images)[kept], rtol=0, atol=1e-6)
    masked = job.blend_mask.bool().expand_as(result.images)
    assert (result.images - recon).abs()[masked].mean() > 0.1


def test_inpaint_and_outpaint_keep_the_input_pixels_through_the_png(root):
    """The written PNGs hold the input's pixels exactly outside the mask (the VAE round trip would not)."""
    source = np.asarray(Image.open(root / "image.png").convert("RGB"))
    mask = np.asarray(Image.open(root / "mask.png")) > 127
    record = run_sample(
        root, "inpaint", "task=inpaint", f"image={root / 'image.png'}", f"mask={root / 'mask.png'}", "n=1"
    )
    out = np.asarray(Image.open(Path(record["out_dir"]) / record["images"][0]["file"]).convert("RGB"))
    assert (
        np.array_equal(out[~mask], source[~mask]) and np.abs(out[mask] - source[mask].astype(int)).mean() > 1
    )
    record = run_sample(
        root, "txt2img", "task=outpaint", f"image={root / 'image.png'}", "pad=[8,0,16,4]", "n=1"
    )
    out = np.asarray(Image.open(Path(record["out_dir"]) / record["images"][0]["file"]).convert("RGB"))
    assert np.array_equal(out[0:SIZE, 8 : 8 + SIZE], source)


def test_feathered_paste_weights():
    from ldm.sampling.tasks import feathered

    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 4:12, 4:12] = 1
    assert torch.equal(feathered(mask, 0), mask)
    soft = feathered(mask, 2)
    assert soft[mask == 0].abs().max() == 0  # outside: the input's pixels exactly
    assert soft[0, 0, 8, 8] == 1 and 0 < soft[0, 0, 4, 8] < soft[0, 0, 5, 8] < soft[0, 0, 6, 8] <= 1


def test_inpaint_with_inpainting_model_uses_the_concat_condition(root, caplog):
    loaded = load_model(root / "inpaint" / "model.safetensors")
    with caplog.at_level(logging.WARNING):
        job = Inpaint(image=str(root / "image.png"), mask=str(root / "mask_small.png")).build(loaded, n=1)
    assert "resizing the mask" in caplog.text  # a 16x16 mask for a 32x32 image
    assert job.blend_mask is None and job.params["inpaint_mode"] == "concat"
    mask = job.shared["mask"]
    assert mask.shape == (1, 1, SIZE, SIZE) and mask[0, 0, 4:16, 12:28].all() and mask.sum() == 12 * 16
    assert (job.shared["masked_image"] * mask).abs().max() == 0  # the model never sees the masked pixels
    cond = loaded.model.conditioner.encode(job.inputs([0]), encode_fn=loaded.model.encode_fn)
    assert cond["concat"].shape == (1, 5, SIZE // F_AE, SIZE // F_AE)  # mask + 4 latent channels -> 9 in
    record = run_sample(
        root, "inpaint", "task=inpaint", f"image={root / 'image.png'}", f"mask={root / 'mask.png'}", "n=1"
    )
    check_outputs(record, 1, (SIZE, SIZE))


def test_outpaint_extends_the_canvas(root):
    record = run_sample(
        root,
        "txt2img",
        "task=outpaint",
        f"image={root / 'image.png'}",
        "pad=[8,0,16,4]",
        "prompt=a red circle",
        "n=2",
    )
    params = check_outputs(record, 2, (SIZE + 4, SIZE + 24))
    assert params[0]["pad"] == [8, 0, 16, 4] and params[0]["inpaint_mode"] == "blend"
    # With a local first stage: the original sits at (top 0, left 8) as decode(encode(image)).
    loaded = load_model(root / "txt2img" / "model.safetensors")
    loaded.model.first_stage.autoencoder = BlockAutoencoder()
    job = Outpaint(image=str(root / "image.png"), pad=[8, 0, 16, 4], prompt="a red circle").build(loaded, n=1)
    assert job.size == (SIZE + 4, SIZE + 24) and job.strength == 0.9
    images = run_job(loaded, job, settings(steps=4)).images
    source = job.init_image[..., 0:SIZE, 8 : 8 + SIZE]  # pasted back: the input, not its reconstruction
    torch.testing.assert_close(images[..., 0:SIZE, 8 : 8 + SIZE], source, rtol=0, atol=0)
    assert (images[..., :, :8] - job.init_image[..., :, :8]).abs().mean() > 0.05


def test_outpaint_canvas_fill_and_rounding():
    image = torch.linspace(-1, 1, 10).view(1, 1, 1, 10).expand(1, 3, 6, 10).clone()
    canvas, mask, pad = extend_canvas(image, [3, 0, 0, 1], multiple=4)
    assert pad == [3, 0, 3, 2]  # right/bottom grow so 13x8 becomes 16x8
    assert canvas.shape == (1, 3, 8, 16) and mask.shape == (1, 1, 8, 16)
    assert mask.sum() == 16 * 8 - 6 * 10
    torch.testing.assert_close(canvas[..., 0:6, 3:13], image)  # the image itself is untouched
    # The new columns continue the edge colours: left near -1, right near +1.
    assert canvas[0, 0, :6, :3].mean() < -0.5 and canvas[0, 0, :6, 13:].mean() > 0.5


def test_task_classes_check_the_model(root):
    loaded = load_model(root / "uncond" / "model.safetensors")
    assert len(Uncond().build(loaded, n=3)) == 3
    with pytest.raises(UserError, match="supports: uncond"):
        Txt2Img("txt2img", prompt="x").build(loaded, n=1)
    with pytest.raises(UserError, match="pad="):
        Outpaint(image="x.png", pad=[0, 0, 0, 0]).build(
            load_model(root / "txt2img" / "model.safetensors"), n=1
        )


def test_precision_progress_bar_and_guidance_options(root):
    loaded = load_model(root / "class" / "model.safetensors")
    job = ClassCond(label=[1]).build(loaded, n=2, height=16, width=16)
    fp32 = run_job(loaded, job, settings())
    assert fp32.guided
    torch.testing.assert_close(
        run_job(loaded, job, settings(progress=True)).images, fp32.images, rtol=0, atol=0
    )
    bf16 = run_job(loaded, job, settings(precision="bf16")).images  # autocast of the UNet
    assert 0 < (bf16 - fp32.images).abs().max() < 0.05
    unguided = run_job(loaded, job, settings(cfg_scale=1.0))
    assert not unguided.guided and (unguided.images - fp32.images).abs().max() > 1e-3


def test_negative_prompt_replaces_the_unconditional_text(root):
    loaded = load_model(root / "txt2img" / "model.safetensors")
    plain = Txt2Img("txt2img", prompt="a red circle").build(loaded, n=1)
    negative = Txt2Img("txt2img", prompt="a red circle", negative_prompt="blurry").build(loaded, n=1)
    assert negative.negative_prompt == "blurry" and negative.params["negative_prompt"] == "blurry"
    a, b = (run_job(loaded, job, settings(steps=2)).images for job in (plain, negative))
    assert (a - b).abs().max() > 1e-3
