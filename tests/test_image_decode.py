"""One image decoder (ldm.data.images) for training shards, make_shards and sample.py inputs.

Every input is built here with PIL; the same bytes must give the same pixels on all three paths.
"""

import io
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldm.data.images import MIN_IMAGE_SIDE, ImageDecodeError, decode_image, decode_mask, decode_segmap
from ldm.data.make_shards import EncodeOptions, make_shards
from ldm.data.pipeline import PipelineOptions, ShardStream
from ldm.errors import UserError
from ldm.sampling.inputs import load_image, load_mask, load_segmap

RED, GREEN, BLUE, WHITE = (220, 30, 30), (30, 200, 40), (20, 40, 210), (255, 255, 255)


def upright_photo() -> Image.Image:
    """16 wide x 32 tall, four coloured blocks: any rotation or mirror changes it a lot."""
    arr = np.zeros((32, 16, 3), np.uint8)
    arr[:16, :8], arr[:16, 8:], arr[16:, :8], arr[16:, 8:] = RED, GREEN, BLUE, WHITE
    return Image.fromarray(arr)


def exif_jpeg(orientation: int) -> bytes:
    """The upright photo stored sideways, with the EXIF tag that turns it back upright."""
    stored = upright_photo().transpose(
        Image.Transpose.ROTATE_90 if orientation == 6 else Image.Transpose.ROTATE_270
    )
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    stored.save(buf, format="JPEG", quality=95, exif=exif)
    return buf.getvalue()


def png(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kw)
    return buf.getvalue()


def rgba_with_holes() -> bytes:
    """16x16: transparent left half hiding black, a half-transparent red column, opaque green right."""
    arr = np.zeros((16, 16, 4), np.uint8)
    arr[:, 8:] = (*GREEN, 255)
    arr[:, 6] = (*RED, 128)
    return png(Image.fromarray(arr, "RGBA"))


def write_tar(path: Path, samples: list[dict]) -> Path:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in samples:
            for ext, data in sample.items():
                if ext == "__key__":
                    continue
                info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def stream_samples(urls, resolution: int, keys=("image", "key"), skipped=None) -> list[dict]:
    """Samples as the training pipeline delivers them: image back to uint8 (H, W, 3)."""
    opts = PipelineOptions(resolution=resolution, crop="center", flip=False, keys=keys, shuffle_buffer=0)
    out = []
    for batch in ShardStream([str(u) for u in urls], opts, batch_size=1, train=False, skipped=skipped):
        sample = {k: v[0] for k, v in batch.items() if not k.startswith("__")}
        if "image" in sample:
            sample["image"] = ((sample["image"].permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()
        out.append(sample)
    return out


def sampling_pixels(path: Path) -> np.ndarray:
    return ((load_image(path)[0].permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()


# --- orientation --------------------------------------------------------------------------------------
@pytest.mark.parametrize("orientation", [6, 8])
def test_exif_rotated_jpeg_is_upright_in_training_make_shards_and_sampling(tmp_path, orientation):
    data = exif_jpeg(orientation)
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "photo.jpg").write_bytes(data)

    sampled = sampling_pixels(tmp_path / "src" / "photo.jpg")
    assert sampled.shape == (32, 16, 3)  # portrait, as the camera held it
    upright = np.asarray(upright_photo()).astype(int)
    assert np.abs(sampled.astype(int) - upright).mean() < 8  # JPEG error only
    assert np.abs(sampled.astype(int) - upright[::-1, ::-1]).mean() > 80  # not upside down
    assert np.array_equal(np.asarray(decode_image(data)), sampled)

    # training: the centre 16x16 crop of the upright image, exactly the same pixels
    trained = stream_samples([write_tar(tmp_path / "raw.tar", [{"__key__": "a", "jpg": data}])], 16)
    assert np.array_equal(trained[0]["image"], sampled[8:24])

    # make_shards keeping the bytes (tag kept, applied when read) -> the same training pixels
    make_shards(tmp_path / "src", tmp_path / "kept", shard_size=10)
    kept = stream_samples(sorted((tmp_path / "kept").glob("*.tar")), 16)
    assert np.array_equal(kept[0]["image"], sampled[8:24])

    # make_shards --resize: rotated before resizing, written upright without the tag
    for fmt in (None, "png"):
        out = tmp_path / f"resized-{fmt}"
        make_shards(tmp_path / "src", out, shard_size=10, opts=EncodeOptions(resize=8, format=fmt))
        with tarfile.open(next(out.glob("*.tar"))) as tar:
            member = next(m for m in tar.getmembers() if m.name.endswith((".jpg", ".png")))
            written = Image.open(io.BytesIO(tar.extractfile(member).read()))
            written.load()
        assert written.size == (8, 16) and written.getexif().get(0x0112) is None
        expected = decode_image(data).resize((8, 16), Image.Resampling.LANCZOS)
        diff = np.abs(np.asarray(written.convert("RGB")).astype(int) - np.asarray(expected).astype(int))
        assert diff.max() == 0 if fmt == "png" else diff.mean() < 12  # re-encoded JPEG: its error only


# --- transparency and modes ---------------------------------------------------------------------------
def test_transparency_is_composited_on_white_identically_everywhere(tmp_path):
    data = rgba_with_holes()
    src = tmp_path / "src"
    src.mkdir()
    (src / "logo.png").write_bytes(data)

    sampled = sampling_pixels(src / "logo.png")
    assert (sampled[:, :6] == 255).all()  # transparent pixels hid black: white now, not black
    assert (sampled[:, 8:] == GREEN).all()
    half = np.round(np.array(RED) * 128 / 255 + 255 * (1 - 128 / 255))
    assert np.abs(sampled[0, 6].astype(int) - half).max() <= 1  # "over" white, half alpha

    trained = stream_samples([write_tar(tmp_path / "raw.tar", [{"__key__": "a", "png": data}])], 16)
    assert np.array_equal(trained[0]["image"], sampled)
    for fmt in (None, "png", "jpg"):  # bytes kept; re-encoded as RGB already composited on white
        out = tmp_path / f"shards-{fmt}"
        make_shards(src, out, shard_size=10, opts=EncodeOptions(format=fmt))
        got = stream_samples(sorted(out.glob("*.tar")), 16)[0]["image"]
        if fmt == "jpg":
            assert np.abs(got.astype(int) - sampled.astype(int)).mean() < 8 and got[:, :4].min() > 235
        else:
            assert np.array_equal(got, sampled)


def test_modes_16bit_palette_cmyk_la_and_1bit(tmp_path):
    ramp = np.tile(np.linspace(0, 65535, 16).round().astype(np.uint16), (16, 1))
    sixteen = Image.fromarray(ramp)
    assert Image.open(io.BytesIO(png(sixteen))).mode in ("I;16", "I")
    got = np.asarray(decode_image(png(sixteen)))
    scaled = np.round(ramp.astype(np.int64) * 255 / 65535).astype(np.uint8)
    assert np.array_equal(got[..., 0], scaled)  # scaled to 8 bits, not clipped at 255
    assert got[0, 0, 0] == 0 and got[0, 8, 0] == 136 and got[0, 15, 0] == 255

    palette = Image.fromarray(np.array([[0, 1] * 4] * 8, np.uint8), "P")
    palette.putpalette([0, 0, 0, *RED] + [0] * 762)
    got = np.asarray(decode_image(png(palette, transparency=0)))
    assert (got[:, 0::2] == 255).all() and (got[:, 1::2] == RED).all()  # index 0 transparent -> white

    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red in CMYK
    buf = io.BytesIO()
    cmyk.save(buf, format="JPEG", quality=95)
    got = np.asarray(decode_image(buf.getvalue())).astype(int)
    assert np.abs(got - (255, 0, 0)).max() <= 6

    la = np.zeros((8, 8, 2), np.uint8)
    la[:, 4:] = (100, 255)
    got = np.asarray(decode_image(png(Image.fromarray(la, "LA"))))
    assert (got[:, :4] == 255).all() and (got[:, 4:] == 100).all()

    bits = Image.fromarray(np.eye(8, dtype=bool))
    assert bits.mode == "1"
    got = np.asarray(decode_image(png(bits)))
    assert got.shape == (8, 8, 3) and (got[..., 0] == np.eye(8) * 255).all()

    # sampling reads the same pixels as the decoder for each of them
    path = tmp_path / "p.png"
    path.write_bytes(png(palette, transparency=0))
    assert np.array_equal(sampling_pixels(path), np.asarray(decode_image(path)))


# --- masks and segmentation maps ---------------------------------------------------------------------
def test_opaque_black_rgba_and_la_masks_keep_everything(tmp_path, caplog):
    for mode, fill in (("RGBA", (0, 0, 0, 255)), ("LA", (0, 255))):
        path = tmp_path / f"black_{mode}.png"
        Image.new(mode, (16, 16), fill).save(path)
        with caplog.at_level(logging.WARNING):
            mask = load_mask(path, (16, 16))
        assert mask.shape == (1, 1, 16, 16) and float(mask.sum()) == 0.0  # 0 % regenerated
    assert "grey" not in caplog.text


def test_mask_with_varying_alpha_is_read_from_alpha(tmp_path):
    arr = np.zeros((16, 16, 4), np.uint8)  # black everywhere; painted (opaque) in the centre
    arr[4:12, 4:12, 3] = 255
    path = tmp_path / "painted.png"
    Image.fromarray(arr, "RGBA").save(path)
    mask = load_mask(path, (16, 16))[0, 0].numpy()
    expected = np.zeros((16, 16), np.float32)
    expected[4:12, 4:12] = 1
    assert np.array_equal(mask, expected) and np.array_equal(decode_mask(path), expected)


def test_gradient_mask_is_thresholded_at_128_with_one_warning(tmp_path, caplog):
    ramp = np.tile(np.arange(256, dtype=np.uint8)[::16], (16, 1))  # 0, 16, ..., 240
    path = tmp_path / "soft.png"
    Image.fromarray(ramp).save(path)
    with caplog.at_level(logging.WARNING, logger="ldm.data.images"):
        mask = load_mask(path, (16, 16))[0, 0].numpy()
    assert np.array_equal(mask, (ramp >= 128).astype(np.float32))
    warnings = [r.getMessage() for r in caplog.records if r.name == "ldm.data.images"]
    assert len(warnings) == 1
    assert f"mask={path}: 93.8 % of the mask's pixels (luminance) are grey" in warnings[0]
    assert "pixels >= 128 (of 255) are regenerated" in warnings[0]
    caplog.clear()
    binary = tmp_path / "binary.png"
    Image.fromarray(((ramp >= 128) * 255).astype(np.uint8)).save(binary)
    with caplog.at_level(logging.WARNING, logger="ldm.data.images"):
        load_mask(binary, (16, 16))
    assert not caplog.records


def test_segmap_keeps_palette_indices_and_refuses_colour(tmp_path):
    ids = np.arange(64, dtype=np.uint8).reshape(8, 8) % 4
    seg = Image.fromarray(ids, "P")
    seg.putpalette([0, 0, 0, 200, 10, 10, 10, 200, 10, 10, 10, 200] + [0] * 756)
    path = tmp_path / "seg.png"
    seg.save(path)
    assert np.array_equal(decode_segmap(path), ids.astype(np.int64))
    assert np.array_equal(load_segmap(path)[0].numpy(), ids)
    colour = tmp_path / "colour.png"
    seg.convert("RGB").save(colour)
    with pytest.raises(UserError, match=r"segmap=.*colour.png is a colour \(RGB\) image; save the class ids"):
        load_segmap(colour)


# --- sizes ----------------------------------------------------------------------------------------------
def test_images_below_the_minimum_side_are_refused_everywhere(tmp_path, caplog):
    tiny = png(Image.new("RGB", (1, 1), RED))
    good = png(Image.new("RGB", (16, 16), GREEN))
    with pytest.raises(ImageDecodeError, match=f"is 1x1 px; images need at least {MIN_IMAGE_SIDE} px"):
        decode_image(tiny)
    path = tmp_path / "dot.png"
    path.write_bytes(tiny)
    with pytest.raises(UserError, match=r"^image=.*dot.png is 1x1 px; images need at least 8 px per side"):
        load_image(path)
    with pytest.raises(UserError, match=r"^mask=.*dot.png is 1x1 px"):
        load_mask(path, (16, 16))

    # training: skipped and counted, naming the sample and the shard
    import multiprocessing as mp

    skipped = mp.Value("q", 0)
    shard = write_tar(
        tmp_path / "mixed.tar",
        [{"__key__": "a", "png": good}, {"__key__": "dot", "png": tiny}, {"__key__": "c", "png": good}],
    )
    with caplog.at_level(logging.WARNING):
        samples = stream_samples([shard], 16, skipped=skipped)
    assert [s["key"] for s in samples] == ["a", "c"] and skipped.value == 1
    assert f"png of sample 'dot' of shard {shard} is 1x1 px" in caplog.text

    src = tmp_path / "src"
    src.mkdir()
    (src / "dot.png").write_bytes(tiny)
    (src / "ok.png").write_bytes(good)
    manifest = make_shards(src, tmp_path / "out", shard_size=10)
    assert manifest["total"] == 1 and manifest["skipped"] == 1
    assert manifest["skipped_examples"][0].endswith("dot.png: too small (1x1 < 8)")


def test_big_rotated_jpeg_drafted_in_training_is_cropped_upright(tmp_path, caplog):
    """A large JPEG decodes at 1/8 scale (draft); the crop still uses the upright full-size geometry."""
    upright = upright_photo().resize((128, 256), Image.Resampling.NEAREST)
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    upright.transpose(Image.Transpose.ROTATE_90).save(buf, format="JPEG", quality=95, exif=exif)
    ids = np.zeros((256, 128), np.uint8)
    ids[128:] = 3  # bottom half of the upright image
    seg = png(Image.fromarray(ids))
    sideways = png(Image.fromarray(np.ascontiguousarray(ids.T)))  # the map saved as the raw pixels lie
    shard = write_tar(
        tmp_path / "big.tar",
        [
            {"__key__": "ok", "jpg": buf.getvalue(), "seg.png": seg},
            {"__key__": "bad", "jpg": buf.getvalue(), "seg.png": sideways},
        ],
    )
    with caplog.at_level(logging.WARNING):
        (sample,) = stream_samples([shard], 16, keys=("image", "segmap", "key"))
    assert (
        "sample 'bad' of shard" in caplog.text and "segmap is 256x128 but the image is 128x256" in caplog.text
    )
    image = sample["image"].astype(int)
    for (y, x), colour in {(2, 2): RED, (2, 13): GREEN, (13, 2): BLUE, (13, 13): WHITE}.items():
        assert np.abs(image[y, x] - colour).max() < 12
    assert (sample["segmap"][:8] == 0).all() and (sample["segmap"][8:] == 3).all()
