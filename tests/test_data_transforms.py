"""Task transforms: mask coverage, outpainting regions, super-resolution degradations, semantic maps."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ldm.data.degradations import SuperResolution, gaussian_blur
from ldm.data.masks import InpaintingMask, OutpaintingMask
from ldm.data.transforms import RNG_KEY, Compose, SemanticMap
from ldm.errors import UserError


def _sample(h=64, w=64, seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.rand(3, h, w, generator=g) * 2 - 1, RNG_KEY: np.random.default_rng(seed)}


@pytest.mark.parametrize(
    ("lo", "hi", "size"), [(0.1, 0.5, 64), (0.3, 0.35, 64), (0.02, 0.06, 96), (0.6, 0.9, 256)]
)
def test_inpainting_coverage_stays_in_range(lo, hi, size):
    gen = InpaintingMask(lo, hi)
    rng = np.random.default_rng(1)
    cover = np.array([gen.make_mask(size, size, rng).mean() for _ in range(60)])
    assert cover.min() >= lo and cover.max() <= hi
    assert cover.std() > 0  # target drawn per sample ...
    if hi - lo >= 0.2:  # ... over the whole range
        assert cover.min() < lo + 0.25 * (hi - lo) and cover.max() > hi - 0.25 * (hi - lo)


def _corners(m: np.ndarray) -> int:
    """2x2 windows with 1 or 3 masked pixels: few for unions of boxes, many along slanted strokes."""
    s = m[:-1, :-1] + m[1:, :-1] + m[:-1, 1:] + m[1:, 1:]
    return int(((s == 1) | (s == 3)).sum())


def test_inpainting_boxes_and_strokes_differ_in_shape():
    rng = np.random.default_rng(0)
    boxes = [InpaintingMask(0.2, 0.4, box_prob=1.0).make_mask(64, 64, rng) for _ in range(10)]
    strokes = [InpaintingMask(0.2, 0.4, box_prob=0.0).make_mask(64, 64, rng) for _ in range(10)]
    for m in boxes + strokes:
        assert set(np.unique(m)) <= {0.0, 1.0}
    assert max(_corners(m) for m in boxes) <= 60  # a few rectangles: 4 corners each (+ overlaps)
    assert min(_corners(m) for m in strokes) > 100  # brush strokes: slanted, curved edges


def test_mask_transform_contract_and_determinism():
    out = InpaintingMask(0.1, 0.5)(_sample())
    assert out["mask"].shape == (1, 64, 64) and out["mask"].dtype == torch.float32
    torch.testing.assert_close(out["masked_image"], out["image"] * (1 - out["mask"]))
    assert torch.all(out["masked_image"][out["mask"].expand(3, -1, -1) > 0] == 0)
    again = InpaintingMask(0.1, 0.5)(_sample())
    assert torch.equal(out["mask"], again["mask"])  # same sample rng -> same mask


@pytest.mark.parametrize("mode", ["center", "left", "right", "top", "bottom"])
def test_outpainting_keeps_the_requested_region(mode):
    gen = OutpaintingMask(0.3, 0.6, modes=[mode])
    rng = np.random.default_rng(0)
    for _ in range(5):
        m = gen.make_mask(60, 80, rng)
        keep = 1 - m
        assert 0.3 - 0.03 <= keep.mean() <= 0.6 + 0.03
        ys, xs = np.nonzero(keep)
        assert keep[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1].all()  # one kept rectangle
        side = {
            "left": xs.min() == 0 and np.ptp(ys) == 59,
            "right": xs.max() == 79 and np.ptp(ys) == 59,
            "top": ys.min() == 0 and np.ptp(xs) == 79,
            "bottom": ys.max() == 59 and np.ptp(xs) == 79,
            "center": abs((ys.min() + ys.max()) / 2 - 29.5) <= 1
            and abs((xs.min() + xs.max()) / 2 - 39.5) <= 1,
        }
        assert side[mode]


@pytest.mark.parametrize("scale", [4, 8])
def test_superresolution_bicubic_lowres(scale):
    s = _sample(64, 64)
    out = SuperResolution(scale=scale)(s)
    assert out["lowres"].shape == (3, 64 // scale, 64 // scale)
    ref = F.interpolate(s["image"][None], scale_factor=1 / scale, mode="bicubic", antialias=True)[0]
    torch.testing.assert_close(out["lowres"], ref.clamp(-1, 1))


def test_superresolution_degradations():
    image = torch.zeros(3, 64, 64)
    image[:, :, 32:] = 1.0  # a sharp edge
    sample = {"image": image, RNG_KEY: np.random.default_rng(0)}
    clean = SuperResolution(scale=4).degrade(image, np.random.default_rng(0))
    blurred = SuperResolution(scale=4, blur_sigma=2.0).degrade(image, np.random.default_rng(0))
    noisy = SuperResolution(scale=4, noise_std=0.1).degrade(image, np.random.default_rng(0))
    jpeg = SuperResolution(scale=4, jpeg_quality=[10, 10]).degrade(image, np.random.default_rng(0))
    edge = lambda x: (x[:, :, 8] - x[:, :, 7]).abs().mean()  # noqa: E731
    assert edge(blurred) < 0.6 * edge(clean)  # the edge got softer
    assert 0.05 < (noisy - clean).std() < 0.15
    assert 0 < (jpeg - clean).abs().mean() and jpeg.shape == clean.shape
    assert jpeg.min() >= -1 and jpeg.max() <= 1
    out = SuperResolution(scale=4, blur_sigma=[0.5, 1.0], noise_std=[0, 0.05], jpeg_quality=[40, 90])(sample)
    assert out["lowres"].shape == (3, 16, 16)
    with pytest.raises(UserError, match="not divisible"):
        SuperResolution(scale=8).degrade(torch.zeros(3, 60, 60), np.random.default_rng(0))


def test_gaussian_blur_preserves_mean_and_matches_sigma():
    x = torch.zeros(1, 41, 41)
    x[0, 20, 20] = 1.0
    y = gaussian_blur(x, 2.0)
    assert abs(float(y.sum()) - 1.0) < 1e-5
    r = torch.arange(41.0) - 20
    var = float((y[0].sum(0) * r**2).sum())
    assert abs(var - 4.0) < 0.05


def test_semantic_map_one_hot_and_range_check():
    seg = torch.tensor([[0, 1], [2, 5]])
    out = SemanticMap(num_classes=6, one_hot=True)({"segmap": seg})
    assert out["segmap"].dtype == torch.int64 and out["segmap_onehot"].shape == (6, 2, 2)
    assert torch.equal(out["segmap_onehot"].argmax(0), seg) and torch.all(out["segmap_onehot"].sum(0) == 1)
    with pytest.raises(ValueError, match="class id 5"):
        SemanticMap(num_classes=4)({"segmap": seg})
    clipped = SemanticMap(num_classes=4, ignore_out_of_range=True)({"segmap": seg})
    assert clipped["segmap"].tolist() == [[0, 1], [2, 0]]


def test_compose_runs_in_order():
    out = Compose([SuperResolution(4), InpaintingMask(0.2, 0.3)])(_sample())
    assert {"lowres", "mask", "masked_image"} <= set(out)
