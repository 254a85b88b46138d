"""ldm.evaluate: numbers that can be trusted (issue 12 item 4), image sources, the cache, the CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from ldm_fixtures import save_tiny_autoencoder
from PIL import Image

from ldm.errors import UserError
from ldm.evaluate import cli, run, scores, sources
from ldm.evaluate.features import INCEPTION_FILE, INCEPTION_URL, TinyFeatures, extract, inception
from ldm.evaluate.report import compare_runs


def shapes(n: int = 96, size: int = 32, seed: int = 0) -> torch.Tensor:
    """uint8 (n, 3, size, size): a filled disc of a random colour, place and radius on a random background."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    out = torch.empty(n, 3, size, size)
    for i in range(n):
        bg, fg = torch.rand(3, 1, 1, generator=g), torch.rand(3, 1, 1, generator=g)
        cy, cx = (torch.rand(2, generator=g) * size * 0.6 + size * 0.2).tolist()
        r = float(torch.rand(1, generator=g)) * size * 0.25 + size * 0.1
        disc = ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r).float()
        out[i] = bg * (1 - disc) + fg * disc
    return (out * 255).round().to(torch.uint8)


def blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    if sigma == 0:
        return images
    radius = int(math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-(x**2) / (2 * sigma**2))
    k = (k / k.sum()).view(1, 1, 1, -1).expand(3, 1, 1, -1)
    y = F.conv2d(F.pad(images.float(), (radius, radius, 0, 0), mode="reflect"), k, groups=3)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="reflect"), k.transpose(2, 3), groups=3)
    return y.round().clamp(0, 255).to(torch.uint8)


def noise(images: torch.Tensor, std: float, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (images.float() + std * 255 * torch.randn(images.shape, generator=g)).round().clamp(0, 255).byte()


def scipy_fid(a: torch.Tensor, b: torch.Tensor) -> float:
    """An independent FID: numpy statistics, scipy.linalg.sqrtm (Heusel et al. 2017, eq. 6)."""
    a, b = a.numpy(), b.numpy()
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean.real))


@pytest.fixture(scope="module")
def real_set():
    images = shapes()
    return images, extract(TinyFeatures(), images)


# --- item 4: numbers that can be trusted ------------------------------------------------------------------
def test_fid_of_a_set_against_itself_is_zero(real_set):
    _, feats = real_set
    assert abs(scores.fid(feats, feats)) < 1e-9  # measured: 1.7e-12


def kid_by_hand(x: np.ndarray, y: np.ndarray) -> float:
    """Binkowski et al. 2018's unbiased MMD^2 with k(a, b) = (a.b / D + 1)^3, over the whole sets."""
    d, m = x.shape[1], len(x)
    kxx, kyy, kxy = ((x @ x.T) / d + 1) ** 3, ((y @ y.T) / d + 1) ** 3, ((x @ y.T) / d + 1) ** 3
    off = lambda k: (k.sum() - np.trace(k)) / (m * (m - 1))  # noqa: E731
    return float(off(kxx) + off(kyy) - 2 * kxy.mean())


def test_kid_equals_the_unbiased_mmd_computed_by_hand(real_set):
    images, feats = real_set
    fake = extract(TinyFeatures(), noise(images, 0.2))
    mean, std = scores.kid(feats, fake, subsets=1, subset_size=len(feats))  # one subset: the whole sets
    assert mean == pytest.approx(kid_by_hand(feats.numpy(), fake.numpy()), abs=1e-9) and std == 0
    # a set against itself: the estimator's cross term keeps the diagonal, so it is slightly negative
    assert scores.kid(feats, feats, 1, len(feats))[0] == pytest.approx(kid_by_hand(*[feats.numpy()] * 2))


def test_fid_equals_scipy_sqrtm_on_the_same_features(real_set):
    images, feats = real_set
    for other in (noise(images, 0.1), blur(images, 1.0), shapes(seed=5)):
        fake = extract(TinyFeatures(), other)
        ours, independent = scores.fid(feats, fake), scipy_fid(feats, fake)
        assert ours > 1e-3 and ours == pytest.approx(independent, abs=1e-3)


def test_fid_and_kid_grow_monotonically_with_blur_and_noise(real_set):
    images, feats = real_set
    net = TinyFeatures()
    for degrade, levels in ((blur, (0.0, 0.7, 1.5, 3.0)), (noise, (0.0, 0.05, 0.15, 0.4))):
        fids, kids = [], []
        for level in levels:
            fake = extract(net, degrade(images, level))
            fids.append(scores.fid(feats, fake))
            kids.append(scores.kid(feats, fake, subsets=20, subset_size=50)[0])
        assert fids[0] < 1e-3 and all(a < b for a, b in zip(fids, fids[1:])), (degrade.__name__, fids)
        assert all(a < b for a, b in zip(kids, kids[1:])), (degrade.__name__, kids)


def test_kid_is_seeded(real_set):
    images, feats = real_set
    fake = extract(TinyFeatures(), noise(images, 0.1))
    assert scores.kid(feats, fake, 10, 40, seed=3) == scores.kid(feats, fake, 10, 40, seed=3)


def test_fid_needs_two_images_per_side(real_set):
    _, feats = real_set
    with pytest.raises(UserError, match="at least 2 images"):
        scores.fid(feats, feats[:1])


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A random CLIPModel (32-d, 1 layer, 32 px) + processor saved to a local folder, built offline."""
    from test_interop import tiny_clip_tokenizer
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    folder = tmp_path_factory.mktemp("tiny_clip")
    tokenizer = tiny_clip_tokenizer(folder)
    text = dict(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=1, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=1)
    config = CLIPConfig(text_config=text, vision_config={**vision, "image_size": 32, "patch_size": 8})
    config.projection_dim = 16
    torch.manual_seed(0)
    CLIPModel(config).eval().save_pretrained(folder)
    crop = {"height": 32, "width": 32}
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=crop)
    CLIPProcessor(image_processor=processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def test_clip_score_is_100_cos_computed_by_hand(tiny_clip):
    from transformers import CLIPModel, CLIPProcessor

    images = shapes(n=4, size=48, seed=2)
    prompts = ["a red circle", "circle", "red", "a circle le"]
    result = scores.clip_score(images, prompts, tiny_clip)

    model, processor = CLIPModel.from_pretrained(tiny_clip), CLIPProcessor.from_pretrained(tiny_clip)
    with torch.no_grad():
        pixels = processor(images=list(images), return_tensors="pt")["pixel_values"]
        img = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        tok = processor(text=prompts, return_tensors="pt", padding=True)
        txt = model.text_projection(model.text_model(**tok).pooler_output)
    cos = F.cosine_similarity(img, txt, dim=-1).double()
    assert result["per_image"] == pytest.approx((100 * cos).tolist(), abs=1e-4)
    assert result["clip_score"] == pytest.approx(max(100 * float(cos.mean()), 0.0), abs=1e-4)
    assert len(set(round(v, 3) for v in result["per_image"])) == 4  # four different pairs, four values


def test_clip_score_wants_one_prompt_per_image_and_a_local_folder(tiny_clip, tmp_path):
    with pytest.raises(UserError, match="one prompt per image: 2 images, 1 prompts"):
        scores.clip_score(shapes(n=2), ["a"], tiny_clip)
    with pytest.raises(UserError, match=f"--clip-model {tmp_path}: not a local CLIP folder"):
        scores.clip_score(shapes(n=1), ["a"], tmp_path)


# --- reconstructions ---------------------------------------------------------------------------------------
def test_reconstruction_scores_known_values():
    x = shapes(n=8, size=32)
    shifted = (x.int() + 10).clamp(max=255).byte()
    mse = ((shifted.double() - x.double()) / 255).pow(2).flatten(1).mean(1)
    expected = float((10 * torch.log10(1 / mse)).mean())
    got = scores.reconstruction_scores(x, shifted)
    assert got["psnr"] == pytest.approx(expected, abs=1e-5)  # torchmetrics keeps float32 sums
    same = scores.reconstruction_scores(x, x)
    assert same["ssim"] == pytest.approx(1.0, abs=1e-6) and same["psnr"] > 80
    assert scores.reconstruction_scores(x, blur(x, 2.0))["ssim"] < got["ssim"] < 1.0


def test_bicubic_baseline_is_near_exact_on_smooth_images_and_poor_on_noise():
    ramp = torch.linspace(0, 255, 64).view(1, 1, 1, 64).expand(4, 3, 64, 64).round().byte()
    up = run.bicubic_upscale(run.downsample(ramp, 4), 64)
    assert up.shape == ramp.shape
    assert scores.reconstruction_scores(ramp, up)["psnr"] > 35
    rough = torch.randint(0, 256, (4, 3, 64, 64), generator=torch.Generator().manual_seed(0)).byte()
    assert scores.reconstruction_scores(rough, run.bicubic_upscale(run.downsample(rough, 4), 64))["psnr"] < 12


def test_autoencoder_evaluation_reconstructs_with_the_posterior_mode(tmp_path):
    from ldm.models.first_stage import load_autoencoder

    path = save_tiny_autoencoder(tmp_path)
    reference = sources.ImageSet(images=shapes(n=6, size=32), source="shapes")
    record = run.evaluate_autoencoder(path, reference, extractor=TinyFeatures())
    ae, _ = load_autoencoder(path)
    with torch.no_grad():
        dec = ae(run.to_float(reference.images), sample_posterior=False)[0]
    expected = scores.reconstruction_scores(reference.images, run.to_uint8(dec))
    assert record["metrics"]["psnr"] == pytest.approx(expected["psnr"], abs=1e-9)
    assert record["metrics"]["ssim"] == pytest.approx(expected["ssim"], abs=1e-9)
    assert record["metrics"]["rfid"] > 0 and record["reference"]["n"] == 6


# --- sources and the cache ---------------------------------------------------------------------------------
def _write_pngs(folder, images, names):
    folder.mkdir(parents=True, exist_ok=True)
    for image, name in zip(images, names):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / name)


def test_sample_py_folder_gives_prompts_and_skips_the_grid(tmp_path):
    images = shapes(n=3, size=32)
    names = ["0000_seed0.png", "0001_seed1.png", "0002_seed2.png"]
    _write_pngs(tmp_path, images, names + ["grid.png"])
    entries = [{"file": n, "seed": i, "prompt": f"p{i}"} for i, n in enumerate(names)]
    (tmp_path / "run.json").write_text(json.dumps({"images": entries}))
    got = sources.read_images(tmp_path)
    assert torch.equal(got.images, images) and got.prompts == ["p0", "p1", "p2"]
    assert sources.read_images(tmp_path, size=16).images.shape == (3, 3, 16, 16)


def test_shards_are_read_with_captions(tiny_data):
    got = sources.read_images(f"{tiny_data}/val-*.tar", limit=5)
    assert got.images.shape == (5, 3, 32, 32) and got.images.dtype == torch.uint8
    assert all(isinstance(p, str) and p for p in got.prompts) and all(isinstance(v, int) for v in got.labels)


def test_reference_features_are_cached_and_a_hit_reads_no_image(tmp_path, monkeypatch):
    _write_pngs(tmp_path / "ref", shapes(n=20, size=32), [f"{i:03d}.png" for i in range(20)])
    generated = sources.ImageSet(images=noise(shapes(n=20, size=32, seed=3), 0.1), source="gen")
    first = run.evaluate_generated(generated, tmp_path / "ref", TinyFeatures(), cache_dir=tmp_path / "c")
    assert first["reference"]["cached"] is False and first["reference"]["n"] == 20

    def no_reading(*a, **k):
        raise AssertionError("the reference set was read despite its cache")

    monkeypatch.setattr(run, "read_images", no_reading)
    second = run.evaluate_generated(generated, tmp_path / "ref", TinyFeatures(), cache_dir=tmp_path / "c")
    assert second["reference"]["cached"] is True
    assert (
        second["metrics"]["fid"] == first["metrics"]["fid"]
        and second["metrics"]["kid"] == first["metrics"]["kid"]
    )
    # another feature network (or image size, or a changed file) is another cache entry
    with pytest.raises(AssertionError, match="was read"):
        run.evaluate_generated(generated, tmp_path / "ref", TinyFeatures(seed=1), cache_dir=tmp_path / "c")
    assert len(list((tmp_path / "c").glob("ref-*.safetensors"))) == 1


# --- the standard Inception: no download, a clear message --------------------------------------------------
def test_missing_inception_weights_name_the_file_url_and_option(tmp_path):
    with pytest.raises(UserError) as e:
        inception(None)
    message = str(e.value)
    assert INCEPTION_FILE in message and INCEPTION_URL in message and "--inception-weights" in message
    with pytest.raises(UserError, match=f"{tmp_path / 'nope.pth'} does not exist"):
        inception(tmp_path / "nope.pth")


def test_random_weight_inception_when_torch_fidelity_is_importable():
    try:
        import torch_fidelity.feature_extractor_inceptionv3  # noqa: F401
    except ImportError:
        with pytest.raises(UserError, match="needs torch-fidelity"):
            inception(random_weights=True)
        return
    net = inception(random_weights=True, seed=0)
    images = shapes(n=2, size=64)
    feats = net(images)
    assert feats.shape == (2, 2048) and torch.equal(feats, inception(random_weights=True, seed=0)(images))


# --- the command line --------------------------------------------------------------------------------------
def test_cli_prints_a_table_and_one_json_record(tmp_path, capsys):
    _write_pngs(tmp_path / "ref", shapes(n=12, size=32), [f"{i:03d}.png" for i in range(12)])
    _write_pngs(
        tmp_path / "gen", blur(shapes(n=12, size=32, seed=4), 1.0), [f"{i:03d}.png" for i in range(12)]
    )
    args = ["--generated", str(tmp_path / "gen"), "--reference", str(tmp_path / "ref"), "--features", "tiny"]
    args += ["--cache-dir", str(tmp_path / "c"), "--kid-subsets", "10", "--out", str(tmp_path / "r.json")]
    assert cli.main(args) == 0
    out = capsys.readouterr().out.splitlines()
    record = json.loads(out[-1])
    assert record == json.loads((tmp_path / "r.json").read_text())
    feats = extract(TinyFeatures(), sources.read_images(tmp_path / "ref").images)
    fake = extract(TinyFeatures(), sources.read_images(tmp_path / "gen").images)
    assert record["metrics"]["fid"] == pytest.approx(scores.fid(feats, fake), abs=1e-9)
    assert out[0].split() == ["metric", "value", "better"] and out[2].split()[0] == "fid"
    assert record["features"] == TinyFeatures().identity and record["features"].startswith(
        "tiny-64-seed0-size32:"
    )
    assert record["environment"]["cpus"] >= 1


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert cli.main(["--generated", str(tmp_path), "--reference", str(tmp_path)]) == 2
    assert "weights-inception-2015-12-05" in capsys.readouterr().err
    assert cli.main(["--runs", str(tmp_path / "none*")]) == 2
    assert "no run folders found" in capsys.readouterr().err


def test_runs_comparison_reads_each_runs_metrics_csv(tmp_path):
    for name, loss in (("a", 0.5), ("b", 0.25)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.csv").write_text(
            f"step,train/loss,val/loss,eval/fid\n1,0.9,,\n2,{loss},{loss * 2},\n4,,,{loss * 10}\n"
        )
    (tmp_path / "latest").symlink_to(tmp_path / "b")
    summaries, text = compare_runs([str(tmp_path / "*")])
    assert [s["run"].rsplit("/", 1)[-1] for s in summaries] == ["a", "b"]  # `latest` is not a second run
    assert summaries[1] == {
        "run": str(tmp_path / "b"),
        "steps": 4,
        "train/loss": 0.25,
        "val/loss": 0.5,
        "eval/fid": 2.5,
    }
    lines = text.splitlines()
    assert lines[0].split() == ["run", "steps", "eval/fid", "train/loss", "val/loss"]
    assert lines[2].split()[1:] == ["4", "5.0000", "0.5000", "1.0000"]


def test_superres_is_compared_with_bicubic_upscaling(tiny_data, tiny_ae, tmp_path):
    from train_helpers import compose_train, tiny_overrides

    import train

    run_dir = tmp_path / "superres"
    overrides = tiny_overrides("superres", tiny_data, run_dir, tiny_ae, max_steps=1)
    train.train(compose_train(overrides + ["callbacks.image_logger.every_n_steps=0"]))
    reference = sources.read_images(f"{tiny_data}/val-*.tar", limit=3)
    record = run.evaluate_superres(
        run_dir / "model.safetensors", reference, factor=4, extractor=TinyFeatures(), device="cpu", steps=2
    )
    assert record["kind"] == "superres" and record["reference"]["n"] == 3
    assert set(record["metrics"]) == set(record["bicubic"]) == {"psnr", "ssim", "rfid"}
    bicubic = run.bicubic_upscale(run.downsample(reference.images, 4), 32)
    assert record["bicubic"] == run.compare(reference.images, bicubic, extractor=TinyFeatures())
    assert record["bicubic"]["psnr"] > 15 and math.isfinite(record["metrics"]["psnr"])


def test_lpips_takes_the_given_vgg_and_torchmetrics_linear_layers(tmp_path):
    from safetensors.torch import save_file

    from ldm.models.lpips import LPIPS

    torch.manual_seed(0)
    vgg = {f"net.{k}": v.contiguous() for k, v in LPIPS().net.state_dict().items()}  # stand-in VGG16 weights
    save_file(vgg, tmp_path / "vgg.safetensors")
    net = scores.lpips_network(tmp_path / "vgg.safetensors")
    lin = torch.load(scores.bundled_lpips_lin(), map_location="cpu", weights_only=True)
    assert torch.equal(net.lin3.model[1].weight, lin["lin3.model.1.weight"])
    assert torch.equal(getattr(net.net.slice2, "5").weight, vgg["net.slice2.5.weight"])
    x, y = shapes(n=4), blur(shapes(n=4), 1.5)
    by_hand = float(net(run.to_float(x), run.to_float(y)).mean())
    assert (
        scores.reconstruction_scores(x, y, net)["lpips"] == pytest.approx(by_hand, abs=1e-7) and by_hand > 0
    )
    assert scores.reconstruction_scores(x, x, net)["lpips"] == 0.0
    with pytest.raises(UserError, match="--lpips-vgg"):
        scores.lpips_network(None)
