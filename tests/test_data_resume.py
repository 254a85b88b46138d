"""Deterministic resume: the batches after a mid-epoch resume equal those of the uninterrupted run."""

import importlib.util
import io
import tarfile
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from ldm.data.datamodule import ShardDataModule
from ldm.data.masks import InpaintingMask

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("make_dataset", REPO / "data" / "make_dataset.py")
make_dataset = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_dataset)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    """40 train samples in 5 uneven shards (so workers run dry at different times), 2 of them damaged."""
    out = tmp_path_factory.mktemp("resume")
    make_dataset.main(
        ["--out", str(out), "--resolution", "16", "--train", "40", "--val", "0"]
        + ["--train-shards", "5", "--workers", "1"]
    )
    # damage two samples: resuming must count raw samples, not delivered ones
    src = out / "train-000001.tar"
    data = io.BytesIO()
    with tarfile.open(src) as fin, tarfile.open(fileobj=data, mode="w") as fout:
        for m in fin.getmembers():
            blob = fin.extractfile(m).read()
            if m.name in ("train_00000009.png", "train_00000012.png"):
                blob = blob[:30]
            m.size = len(blob)
            fout.addfile(m, io.BytesIO(blob))
    src.write_bytes(data.getvalue())
    # one more short shard: 3 samples, so the workers' shares differ
    make_dataset.main(
        [
            "--out",
            str(out / "extra"),
            "--resolution",
            "16",
            "--train",
            "3",
            "--val",
            "0",
            "--train-shards",
            "1",
            "--workers",
            "1",
            "--seed",
            "7",
        ]
    )
    (out / "extra" / "train-000000.tar").rename(out / "train-000005.tar")
    return out


def _dm(path: Path, **kw) -> ShardDataModule:
    kw = dict(
        dict(keys=["image", "key"], batch_size=3, resolution=16, shuffle_buffer=8, task=InpaintingMask()),
        **kw,
    )
    dm = ShardDataModule(str(path / "train-*.tar"), None, **kw)
    dm.setup("fit")
    return dm


def _assert_same(a: list[dict], b: list[dict]) -> None:
    assert [x["key"] for x in a] == [x["key"] for x in b]
    for x, y in zip(a, b):
        for name in ("image", "mask", "masked_image"):
            torch.testing.assert_close(x[name], y[name], rtol=0, atol=0)


@pytest.mark.parametrize("workers", [0, 3])
@pytest.mark.parametrize("stop", [1, 7, 12])
def test_loader_resume_is_exact(shapes, workers, stop):
    dm = _dm(shapes, num_workers=workers)
    loader = dm.train_dataloader()
    full = list(loader)  # epoch 0, uninterrupted
    assert sum(len(b["key"]) for b in full) == 41  # 43 samples minus the 2 damaged
    state = dm._train_loader.state_at(stop)
    resumed_dm = _dm(shapes, num_workers=workers)
    resumed_dm.load_state_dict({"loader": state})
    _assert_same(list(resumed_dm.train_dataloader()), full[stop:])


def test_resume_in_a_later_epoch_and_resampled(shapes):
    dm = _dm(shapes, num_workers=2, resampled=True, epoch_length=20)
    loader = dm.train_dataloader()
    list(loader)
    epoch1 = list(loader)
    state = loader.state_at(3)
    assert state["epoch"] == 1
    resumed_dm = _dm(shapes, num_workers=2, resampled=True, epoch_length=20)
    resumed_dm.load_state_dict({"loader": state})
    resumed = resumed_dm.train_dataloader()
    assert len(list(resumed)) == len(epoch1)  # epoch 0 again: the saved position waits for its epoch
    _assert_same(list(resumed), epoch1[3:])


def test_changed_settings_fall_back_to_skipping_batches(shapes):
    dm = _dm(shapes, num_workers=2)
    loader = dm.train_dataloader()
    full = list(loader)
    other = _dm(shapes, num_workers=0)  # another worker count: the saved offsets mean other samples
    other.load_state_dict({"loader": loader.state_at(5)})
    with pytest.warns(UserWarning, match="differ from now"):
        rest = list(other.train_dataloader())
    assert len(rest) == len(list(_dm(shapes, num_workers=0).train_dataloader())) - 5
    assert len(full) >= 5


class _Recorder(pl.LightningModule):
    """Trains a scalar on the images and records the sample keys of every training batch."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[tuple[int, list[str]]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append((self.current_epoch, list(batch["key"])))
        return ((batch["image"].mean() - self.w) ** 2).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _trainer(tmp_path: Path, **kw) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        max_epochs=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
        **kw,
    )


@pytest.mark.parametrize(
    "extra", [{}, {"resampled": True, "epoch_length": 30}], ids=["one-pass", "resampled"]
)
def test_lightning_checkpoint_resume(shapes, tmp_path, extra):
    """Checkpoint mid-epoch 1 with ModelCheckpoint, resume with ckpt_path: same batches as uninterrupted."""
    step = 19 if not extra else 13  # epoch 0 has 14 (one pass) or 10 (epoch_length 30) batches
    full_model = _Recorder()
    ckpt = pl.callbacks.ModelCheckpoint(
        dirpath=tmp_path / "ckpt", every_n_train_steps=step, save_top_k=-1, filename="{step}"
    )
    _trainer(tmp_path, callbacks=[ckpt]).fit(full_model, datamodule=_dm(shapes, num_workers=2, **extra))
    per_epoch = len([s for s in full_model.seen if s[0] == 0])
    assert per_epoch < step < 2 * per_epoch  # the checkpoint falls in the middle of epoch 1
    path = tmp_path / "ckpt" / f"step={step}.ckpt"
    state = torch.load(path, weights_only=True)["ShardDataModule"]
    assert state["loader"]["epoch"] == 1 and state["loader"]["batches"] == step - per_epoch

    resumed_model = _Recorder()
    _trainer(tmp_path).fit(resumed_model, datamodule=_dm(shapes, num_workers=2, **extra), ckpt_path=path)
    assert resumed_model.seen == full_model.seen[step:]
