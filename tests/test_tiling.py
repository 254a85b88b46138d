"""Tiled VAE encode/decode (ldm.models.tiling, issue 15): blending, tolerance, memory, the codec's option."""

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from ldm_fixtures import autoencoder_config
from torch import nn

from ldm.errors import UserError
from ldm.interop.load import load_model
from ldm.models.tiling import (
    GlobalGroupNorm,
    TileSettings,
    edge_weights,
    largest_activation,
    ramp,
    tile_starts,
    tiled_apply,
    tiled_decode,
    tiled_encode,
)


def smooth_image(size: int, seed: int = 0) -> torch.Tensor:
    """(1, 3, size, size) in [-1, 1]: bicubic-upsampled noise, an image with structure at all places."""
    g = torch.Generator().manual_seed(seed)
    return F.interpolate(
        torch.randn(1, 3, size // 8, size // 8, generator=g), size=(size, size), mode="bicubic"
    )


class LocalDecoder(nn.Module):
    """A toy f=2 decoder with GroupNorm and a known receptive field (2 latent cells = 4 pixels)."""

    downsample_factor = 2

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1, self.norm, self.conv2 = (
            nn.Conv2d(4, 8, 3, padding=1),
            nn.GroupNorm(2, 8),
            nn.Conv2d(8, 3, 3, 1, 1),
        )

    def decode_latent(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv2(F.silu(self.norm(self.conv1(z))))
        return F.interpolate(h, scale_factor=2, mode="nearest")


def test_tile_geometry_and_weights():
    assert tile_starts(100, 32, 8) == [0, 24, 48, 68] and tile_starts(32, 32, 8) == [0]
    assert edge_weights(8).tolist() == pytest.approx([0, 0, 0.2, 0.4, 0.6, 0.8, 1, 1])
    for o in (1, 2, 5, 8, 16):  # a tile's ramp and its neighbour's mirror add up to exactly 1
        assert torch.equal(edge_weights(o) + edge_weights(o).flip(0), torch.ones(o))
    assert ramp(10, 0, 0).tolist() == [1.0] * 10
    # the blend itself adds nothing: a pointwise function tiles to exactly the untiled result
    x = torch.randn(1, 4, 37, 29)
    out = tiled_apply(lambda t: F.interpolate(t * 2 + 1, scale_factor=4, mode="nearest"), x, 12, 4, 4.0)
    torch.testing.assert_close(
        out, F.interpolate(x * 2 + 1, scale_factor=4, mode="nearest"), rtol=0, atol=1e-6
    )


def test_tiles_are_exact_with_global_norm_statistics_and_a_halo():
    """With the whole image's GroupNorm statistics and halo >= the receptive field, tiling is exact:
    what tiled decoding of a real VAE differs by is the statistics estimate and its receptive field."""
    dec = LocalDecoder().eval()
    z = torch.randn(1, 4, 40, 52)
    with torch.no_grad():
        whole = dec.decode_latent(z)
        with GlobalGroupNorm(dec) as norms:
            dec.decode_latent(z)  # record the whole image's statistics
            norms.mode = "use"
            tiled = tiled_apply(dec.decode_latent, z, 16, 8, 2.0)  # halo: 16 px // 4 = 4 px >= 4 px
            torch.testing.assert_close(tiled, whole, rtol=0, atol=2e-5)
        per_tile = tiled_apply(dec.decode_latent, z, 16, 8, 2.0)  # each tile's own statistics
    assert (per_tile - whole).abs().max() > 1e-3  # what GroupNorm per tile costs


@pytest.fixture(scope="module")
def sd_vae(sd_base):
    path, yaml, tokenizer = sd_base
    return load_model(path, config=yaml, text_encoder=str(tokenizer)).model.first_stage


def test_tiled_decode_and_encode_match_untiled_within_tolerance(sd_vae):
    """sd_base's VAE (SD 1.x structure, f=8, random weights), 96 px in 4 tiles of 64 px overlapping by 32,
    per-tile GroupNorm statistics. Measured (float32, CPU): decode max |diff| 3.05, mean 0.271 on images
    of std 0.448; encode max 0.84, mean 0.112 on latents of std 0.297. A random-weight VAE with tiles of
    8 latent cells is the worst case (its border effects reach across the tile). On the demo's trained
    KL autoencoder (f=4, a shapes image at 128 px, 96-px tiles overlapping by 32) mean |diff| was 0.04-0.05
    for decoding with per-tile statistics and 0.009-0.011 with the image's (norm="image"); not a test here,
    as that file changes with every `make demo`.
    """
    ae = sd_vae.autoencoder
    image = smooth_image(96)
    settings = TileSettings(mode="on", size=64, overlap=32, norm="tile")
    with torch.no_grad():
        z = ae.encode_latent(image)
        whole = ae.decode_latent(z)
        diff = (tiled_decode(ae, z, settings) - whole).abs()
        assert whole.std().item() == pytest.approx(0.448, abs=0.01)
        assert diff.max() < 3.3 and diff.mean() < 0.3
        diff = (tiled_encode(ae, image, settings) - z).abs()
        assert z.std().item() == pytest.approx(0.297, abs=0.01)
        assert diff.max() < 1.0 and diff.mean() < 0.13


def test_peak_activation_follows_the_tile_not_the_image():
    torch.manual_seed(0)
    ae = instantiate(autoencoder_config(ch_mult=(1, 2))).eval()  # f=2
    peaks = {}
    with torch.no_grad():
        for side in (32, 64):
            z = torch.randn(1, 4, side, side)
            for tile in (16, 32):
                settings = TileSettings(mode="on", size=tile, overlap=8, norm="tile")
                peaks[side, tile] = largest_activation(ae, lambda z=z, s=settings: tiled_decode(ae, z, s))
            peaks[side, "whole"] = largest_activation(ae, lambda z=z: ae.decode_latent(z))
    # the decoder's 64 channels upsampled to the tile's pixels, whatever the image size (64 or 128 px)
    assert peaks[32, 16] == peaks[64, 16] == 64 * 16 * 16
    assert peaks[32, 32] == peaks[64, 32] == 64 * 32 * 32
    assert peaks[64, "whole"] == 4 * peaks[32, "whole"] == 64 * 128 * 128


def test_codec_tiles_by_option(sd_vae):
    codec = sd_vae
    assert codec.tiling == TileSettings()  # auto, 512 px tiles, 128 px overlap
    assert not codec.tiling.applies(1024, 1024) and codec.tiling.applies(1032, 1024)
    assert codec.tiling.applies(512, 4096) is not False  # 2M pixels > 4 tiles
    z = torch.randn(1, 4, 12, 12, generator=torch.Generator().manual_seed(0))
    try:
        codec.tiling = TileSettings(mode="off", size=64, overlap=16)
        assert torch.equal(codec.decode(z), codec.autoencoder.decode_latent(z / codec.scale_factor))
        codec.tiling = TileSettings(mode="on", size=64, overlap=16)
        expected = tiled_decode(codec.autoencoder, z / codec.scale_factor, codec.tiling)
        assert torch.equal(codec.decode(z), expected)
        image = smooth_image(96).clamp(-1, 1)
        latents = tiled_encode(codec.autoencoder, image, codec.tiling) * codec.scale_factor
        assert torch.equal(codec.encode_pixels(image, sample=False), latents)
    finally:
        codec.tiling = TileSettings()


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"mode": "yes"}, "vae_tiling='yes'"),
        ({"size": 8}, "vae_tile_size=8"),
        ({"overlap": 300}, "vae_tile_overlap=300"),
        ({"norm": "batch"}, "vae_tile_norm='batch'"),
    ],
)
def test_settings_errors(kw, message):
    with pytest.raises(UserError, match=message):
        TileSettings(**kw)
