"""cache_latents: cached posteriors equal encoding the images directly; other autoencoders refused."""

import importlib.util
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from ldm.data.cache_latents import cache_latents, check_latent_manifest, main
from ldm.data.datamodule import ShardDataModule
from ldm.errors import UserError
from ldm.interop.checkpoint import save_safetensors
from ldm.models.first_stage import weights_identity

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("make_dataset", REPO / "data" / "make_dataset.py")
make_dataset = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_dataset)

DDCONFIG = dict(
    double_z=True,
    z_channels=3,
    resolution=32,
    in_channels=3,
    out_ch=3,
    ch=8,
    ch_mult=[1, 2],
    num_res_blocks=1,
    attn_resolutions=[],
    dropout=0.0,
)


def _save_autoencoder(folder: Path, seed: int, vq: bool = False) -> tuple[torch.nn.Module, Path]:
    if vq:
        cfg = dict(
            _target_="ldm.models.autoencoder.VQModel",
            n_embed=16,
            embed_dim=3,
            ddconfig=dict(DDCONFIG, double_z=False),
        )
    else:
        cfg = dict(_target_="ldm.models.autoencoder.AutoencoderKL", embed_dim=3, ddconfig=DDCONFIG)
    torch.manual_seed(seed)
    ae = instantiate(cfg).eval()
    path = save_safetensors(ae.state_dict(), folder / "model.safetensors", {"model": {"autoencoder": cfg}})
    return ae, path


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shapes")
    make_dataset.main(
        ["--out", str(out), "--resolution", "40", "--train", "10", "--val", "4", "--train-shards", "2"]
        + ["--val-shards", "1", "--workers", "1"]
    )
    return out


def _direct(shapes: Path, split: str) -> dict[str, torch.Tensor]:
    """Images as the DataModule's validation path sees them (centre crop to 32 px), by key."""
    dm = ShardDataModule(
        str(shapes / f"{split}-*.tar"),
        None,
        keys=["image", "segmap", "key"],
        resolution=32,
        crop="center",
        flip=False,
        shuffle_buffer=0,
        batch_size=100,
        num_workers=0,
    )
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    return {k: (img, seg) for k, img, seg in zip(batch["key"], batch["image"], batch["segmap"])}


def test_cache_round_trip_matches_direct_encoding(shapes, tmp_path):
    ae, ckpt = _save_autoencoder(tmp_path / "ae", seed=0)
    out = tmp_path / "latents"
    m = cache_latents(str(ckpt), str(shapes / "train-*.tar"), out, batch_size=4, shard_size=6, num_workers=2)
    cache_latents(str(ckpt), str(shapes / "val-*.tar"), out, batch_size=4, prefix="val", num_workers=0)
    m = json.loads((out / "manifest.json").read_text())
    assert m["splits"] == {"train": 10, "val": 4} and m["latent_shape"] == [3, 16, 16]
    assert (
        m["autoencoder"]["identity"] == weights_identity(ae) and m["autoencoder"]["config"]["embed_dim"] == 3
    )
    assert m["autoencoder"]["latent_std"] > 0 and {"latent_mean.npy", "latent_logvar.npy", "txt"} <= set(
        m["keys"]
    )
    assert sorted(p.name for p in out.glob("*.tar")) == [
        "train-000000.tar",
        "train-000001.tar",
        "val-000000.tar",
    ]

    dm = ShardDataModule(
        str(out / "train-*.tar"),
        str(out / "val-*.tar"),
        latents=True,
        batch_size=10,
        keys=["caption", "label", "segmap", "key"],
        num_workers=0,
        flip=False,
    )
    dm.setup("fit")
    assert len(dm.check_autoencoder(weights_identity(ae))) == 2
    batch = next(iter(dm.train_dataloader()))
    direct = _direct(shapes, "train")
    images = torch.stack([direct[k][0] for k in batch["key"]])
    with torch.no_grad():
        posterior = ae.encode(images)
        torch.testing.assert_close(
            batch["latent_mean"], posterior.mean, atol=2e-3, rtol=2e-3
        )  # float16 cache
        torch.testing.assert_close(batch["latent_logvar"], posterior.logvar, atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(
            ae.decode(batch["latent_mean"]), ae.decode(posterior.mean), atol=5e-3, rtol=0
        )
    assert torch.equal(
        batch["segmap"], torch.stack([direct[k][1] for k in batch["key"]])
    )  # cropped like the image
    assert all(" on " in c for c in batch["caption"]) and batch["label"].dtype == torch.int64


def test_mismatched_autoencoder_is_refused(shapes, tmp_path):
    ae, ckpt = _save_autoencoder(tmp_path / "ae", seed=0)
    other, _ = _save_autoencoder(tmp_path / "other", seed=1)
    out = tmp_path / "latents"
    cache_latents(str(ckpt), str(shapes / "val-*.tar"), out, prefix="val", num_workers=0)
    assert check_latent_manifest(str(out / "val-*.tar"), weights_identity(ae))["total"] == 4
    with pytest.raises(UserError, match=f"encoded by autoencoder {weights_identity(ae)}.*first_stage_ckpt"):
        check_latent_manifest(out, weights_identity(other))
    with pytest.raises(UserError, match="another autoencoder"):  # never mix two autoencoders in one cache
        cache_latents(
            str(tmp_path / "other" / "model.safetensors"), str(shapes / "val-*.tar"), out, prefix="x"
        )
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="without"):
        check_latent_manifest(tmp_path / "empty", weights_identity(ae))


def test_sample_mode_bfloat16_and_vq(shapes, tmp_path):
    ae, ckpt = _save_autoencoder(tmp_path / "ae", seed=0)
    assert (
        main(
            [
                "--ckpt",
                str(ckpt),
                "--shards",
                str(shapes / "val-*.tar"),
                "--out",
                str(tmp_path / "s"),
                "--mode",
                "sample",
                "--dtype",
                "bfloat16",
                "--workers",
                "0",
                "--prefix",
                "val",
            ]
        )
        == 0
    )
    dm = ShardDataModule(
        str(tmp_path / "s" / "val-*.tar"), None, latents=True, keys=["key"], batch_size=4, num_workers=0
    )
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"latent", "key"} and batch["latent"].shape == (4, 3, 16, 16)
    direct = _direct(shapes, "val")
    with torch.no_grad():
        posterior = ae.encode(torch.stack([direct[k][0] for k in batch["key"]]))
    err = (batch["latent"] - posterior.mean).abs() / posterior.std
    assert 0.3 < err.mean() < 1.5  # a posterior sample: about one std from the mean

    vq, vq_ckpt = _save_autoencoder(tmp_path / "vq", seed=0, vq=True)
    m = cache_latents(str(vq_ckpt), str(shapes / "val-*.tar"), tmp_path / "v", prefix="val", num_workers=0)
    assert m["mode"] == "sample" and "latent.npy" in m["keys"]
    with (tmp_path / "v" / "val-000000.tar").open("rb") as f:
        import tarfile

        with tarfile.open(fileobj=f) as tar:
            name = next(n for n in tar.getnames() if n.endswith("latent.npy"))
            key = name.split(".")[0]
            z = np.load(io.BytesIO(tar.extractfile(name).read()), allow_pickle=False)
    with torch.no_grad():
        ref = vq.encode_latent(direct[key][0][None])[0]
    torch.testing.assert_close(torch.from_numpy(z).float(), ref, atol=2e-3, rtol=2e-3)


def test_cached_caption_states_feed_the_text_conditioner(shapes, tmp_path):
    from ldm.conditioning import FrozenTextEncoder

    _, ckpt = _save_autoencoder(tmp_path / "ae", seed=0)
    out = tmp_path / "latents"
    m = cache_latents(
        str(ckpt),
        str(shapes / "val-*.tar"),
        out,
        prefix="val",
        num_workers=0,
        text_encoder="default",
        text_max_length=8,
    )
    dm = ShardDataModule(
        str(out / "val-*.tar"),
        None,
        latents=True,
        batch_size=4,
        keys=["caption", "caption_emb"],
        num_workers=0,
    )
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    encoder = FrozenTextEncoder(max_length=8)
    encoder.check_cache(m, dm.options.keys)  # same encoder and length: accepted
    assert batch["caption_emb"].shape == (4, 8, 384)
    cached = encoder(batch)  # the cached states, not a new encoding
    torch.testing.assert_close(cached, encoder.encode_prompts(batch["caption"]), atol=4e-3, rtol=4e-3)
    with pytest.raises(UserError, match="max_length 8"):
        FrozenTextEncoder(max_length=16).check_cache(m, dm.options.keys)
