"""Text in other encodings (captions, sidecars, listings, prompt files) and truncated tar shards."""

import io
import logging
import multiprocessing as mp
import tarfile

import numpy as np
import pytest
from PIL import Image

import ldm.data.text
from ldm.data.datamodule import ShardDataModule
from ldm.data.make_shards import make_shards
from ldm.data.pipeline import PipelineOptions, ShardStream
from ldm.data.text import decode_text
from ldm.sampling.inputs import read_prompts

LATIN1 = "café crème, 25 °C".encode("latin-1")


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch):
    monkeypatch.setattr(ldm.data.text, "_warned", set())  # "warn once" per test


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (16, 16, 3), np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _tar(path, samples: list[tuple[str, dict[str, bytes]]]):
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def _stream(urls, keys=("caption", "key"), skipped=None) -> list[dict]:
    opts = PipelineOptions(resolution=16, crop="center", flip=False, keys=keys, shuffle_buffer=0)
    stream = ShardStream([str(u) for u in urls], opts, batch_size=1, train=False, skipped=skipped)
    return [{k: v[0] for k, v in b.items() if not k.startswith("__")} for b in stream]


# --- text ------------------------------------------------------------------------------------------------
def test_decode_text_utf8_bom_and_cp1252_fallback(caplog):
    assert decode_text("naïve".encode(), "a") == "naïve"
    assert decode_text(b"\xef\xbb\xbfhello", "b") == "hello"  # UTF-8 BOM dropped
    assert decode_text("hi é".encode("utf-16"), "c") == "hi é"  # UTF-16 with its BOM
    with caplog.at_level(logging.WARNING, logger="ldm.data.text"):
        assert decode_text(b"\x80 5 \x93ok\x94", "d.txt") == "€ 5 “ok”"  # cp1252, not Latin-1's controls
        assert decode_text(b"x\x81", "e.txt") == "x\x81"  # undefined in cp1252: Latin-1
        decode_text(b"\xe9", "d.txt")  # the same file again: no second warning
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert messages[0].startswith("d.txt is not UTF-8 (byte 0x80 at position 0): read as cp1252")


def test_latin1_caption_in_a_shard_is_read_with_one_warning_per_shard(tmp_path, caplog):
    shard = _tar(
        tmp_path / "s.tar",
        [("a", {"png": _png(0), "txt": LATIN1}), ("b", {"png": _png(1), "txt": LATIN1 + b"!"})],
    )
    with caplog.at_level(logging.WARNING):
        samples = _stream([shard])
    assert [s["caption"] for s in samples] == ["café crème, 25 °C", "café crème, 25 °C!"]
    warnings = [r.getMessage() for r in caplog.records if r.name == "ldm.data.text"]
    assert len(warnings) == 1
    assert warnings[0].startswith(f"caption of sample 'a' of shard {shard} is not UTF-8 (byte 0xe9")


def test_make_shards_reads_latin1_sidecars_and_listings_and_writes_utf8(tmp_path, caplog):
    src = tmp_path / "src"
    src.mkdir()
    (src / "one.png").write_bytes(_png(0))
    (src / "one.txt").write_bytes(LATIN1)
    (src / "two.png").write_bytes(_png(1))
    (src / "two.txt").write_bytes(b"\xef\xbb\xbfplain")  # UTF-8 with a BOM
    with caplog.at_level(logging.WARNING):
        make_shards(src, tmp_path / "out", shard_size=10)
    assert f"{src / 'one.txt'} is not UTF-8" in caplog.text
    with tarfile.open(next((tmp_path / "out").glob("*.tar"))) as tar:
        texts = sorted(tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".txt"))
    assert texts == [LATIN1.decode("latin-1").encode("utf-8"), b"plain"]

    listing = tmp_path / "list.csv"
    listing.write_bytes(b"path,caption\nsrc/one.png," + LATIN1.replace(b",", b"") + b"\n")
    manifest = make_shards(listing, tmp_path / "out_csv", shard_size=10)
    assert manifest["total"] == 1
    caption = _stream(sorted((tmp_path / "out_csv").glob("*.tar")))[0]["caption"]
    assert caption == "café crème 25 °C"


def test_prompt_file_in_latin1_names_the_file(tmp_path, caplog):
    path = tmp_path / "prompts.txt"
    path.write_bytes(b"\xef\xbb\xbfa red ball\n\n" + LATIN1 + b"\n")
    with caplog.at_level(logging.WARNING):
        prompts = read_prompts(None, path, "txt2img", required=True)
    assert prompts == ["a red ball", "café crème, 25 °C"]  # no BOM, no UnicodeDecodeError
    assert f"{path} is not UTF-8 (byte 0xe9" in caplog.text


# --- truncated shards -----------------------------------------------------------------------------------
def _cut_shards(tmp_path):
    """Three shards of four samples: one cut inside an image, one inside a header, one intact."""
    samples = [(f"k{i}", {"png": _png(i), "txt": f"caption {i}".encode()}) for i in range(12)]
    shards = [_tar(tmp_path / f"s{n}.tar", samples[4 * n : 4 * n + 4]) for n in range(3)]
    with tarfile.open(shards[0]) as tar:
        cut_data = tar.getmember("k2.png")
    with tarfile.open(shards[1]) as tar:
        cut_header = tar.getmember("k6.txt")
    shards[0].write_bytes(shards[0].read_bytes()[: cut_data.offset_data + 100])
    shards[1].write_bytes(shards[1].read_bytes()[: cut_header.offset + 200])
    return shards


def test_truncated_shards_are_reported_by_name_and_sample_and_skipped(tmp_path, caplog):
    shards = _cut_shards(tmp_path)
    skipped = mp.Value("q", 0)
    with caplog.at_level(logging.WARNING):
        samples = _stream(shards, keys=("image", "caption", "key"), skipped=skipped)
    # the cut samples (k2, and k6 whose caption may be missing) are dropped, never "missing a member"
    assert [s["key"] for s in samples] == ["k0", "k1", "k4", "k5", "k8", "k9", "k10", "k11"]
    assert skipped.value == 2
    assert f"shard {shards[0]} is truncated or corrupt at sample 'k2' (ReadError" in caplog.text
    assert f"shard {shards[1]} is truncated or corrupt at sample 'k6' (ReadError" in caplog.text
    assert "has no" not in caplog.text


def test_the_epoch_summary_names_the_truncated_shards(tmp_path, caplog):
    shards = _cut_shards(tmp_path)
    dm = ShardDataModule(
        [str(s) for s in shards], None, keys=["image", "key"], batch_size=2, num_workers=0, shuffle_buffer=0
    )
    dm.setup("fit")
    with caplog.at_level(logging.WARNING, logger="ldm.data.loader"):
        keys = [k for batch in dm.train_dataloader() for k in batch["key"]]
    assert len(keys) == 8 and dm.skipped == 2
    summary = [r.getMessage() for r in caplog.records if r.name == "ldm.data.loader"]
    assert len(summary) == 1
    assert summary[0].endswith(f"; truncated or corrupt shard(s): {shards[0]}, {shards[1]}")
