"""The fast loader paths change nothing: persistent workers, uint8 hand-over, the uint8_transfer resolver."""

import importlib.util
from pathlib import Path

import pytest
import torch

from ldm.data.datamodule import ShardDataModule
from ldm.data.loader import ResumableLoader, resolve_uint8_transfer
from ldm.data.masks import InpaintingMask
from ldm.data.pipeline import ShardStream
from ldm.errors import UserError

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("make_dataset", REPO / "data" / "make_dataset.py")
make_dataset = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_dataset)

N = 30  # samples in the fixture shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """30 samples at 24 px in 5 shards (6 each), so 2 workers get uneven shares of shards."""
    out = tmp_path_factory.mktemp("loader_speed")
    make_dataset.main(
        ["--out", str(out), "--resolution", "24", "--train", str(N), "--val", "0"]
        + ["--train-shards", "5", "--workers", "1"]
    )
    return out


def _dm(path: Path, **kw) -> ShardDataModule:
    opts = dict(keys=["image", "key"], batch_size=4, resolution=16, shuffle_buffer=8, num_workers=2)
    dm = ShardDataModule(str(path / "train-*.tar"), None, **dict(opts, **kw))
    dm.setup("fit")
    return dm


def _loader(dm: ShardDataModule, persistent: bool) -> ResumableLoader:
    stream = ShardStream(dm.train_urls, dm.options, dm.batch_size, train=True, seed=dm.seed, task=dm.task)
    return ResumableLoader(stream, dm.num_workers, persistent_workers=persistent)


def _pids(loader: ResumableLoader) -> list[int]:
    return [w.pid for w in loader.loader._iterator._workers]


def _assert_same(a: list[dict], b: list[dict], fields=("image",)) -> None:
    assert [x["key"] for x in a] == [x["key"] for x in b]
    for x, y in zip(a, b):
        for name in fields:
            assert x[name].dtype == y[name].dtype
            assert torch.equal(x[name], y[name]), name


def test_persistent_workers_give_the_batches_of_fresh_workers(shards):
    dm = _dm(shards, task=InpaintingMask())  # masks are drawn from (seed, epoch, worker, position)
    fresh, kept = _loader(dm, persistent=False), _loader(dm, persistent=True)
    fresh_epochs = [list(fresh) for _ in range(3)]
    kept_epochs = [list(kept)]
    pids = _pids(kept)
    kept_epochs += [list(kept) for _ in range(2)]
    assert _pids(kept) == pids and len(pids) == 2  # the same two processes served all three epochs
    assert kept.loader._iterator is not None and fresh.loader._iterator is None
    for a, b in zip(fresh_epochs, kept_epochs):
        _assert_same(a, b, ("image", "mask", "masked_image"))
    keys = [[k for batch in epoch for k in batch["key"]] for epoch in kept_epochs]
    for epoch in keys:  # coverage: every sample exactly once per epoch
        assert len(epoch) == N and len(set(epoch)) == N
    assert keys[0] != keys[1] and keys[1] != keys[2]  # a new shuffle each epoch reached the workers
    kept.close()
    assert kept.loader._iterator is None


@pytest.mark.parametrize("stop", [1, 4])
def test_resume_reaches_running_persistent_workers(shards, stop):
    """A position loaded while the workers are alive (after epoch 0) resumes epoch 1 exactly."""
    loader = _loader(_dm(shards), persistent=True)
    list(loader)  # epoch 0 starts the workers
    epoch1 = list(loader)
    state = loader.state_at(stop)
    assert state["epoch"] == 1 and state["batches"] == stop
    other = _loader(_dm(shards), persistent=True)
    list(other)  # epoch 0 on this loader too: its workers are running when the state arrives
    pids = _pids(other)
    other.load_state(state)
    rest = list(other)
    assert _pids(other) == pids
    _assert_same(rest, epoch1[stop:])
    assert len(rest) == len(epoch1) - stop
    # the next epoch starts from the beginning again (no stale offsets left in shared memory)
    epoch2_fresh = _loader(_dm(shards), persistent=False)
    [list(epoch2_fresh) for _ in range(2)]
    _assert_same(list(other), list(epoch2_fresh))


def test_uint8_batches_equal_float_batches_after_transfer(shards):
    """uint8 hand-over + on_after_batch_transfer == the float32 path, bit for bit (same crops, flips)."""
    u8, f32 = _dm(shards, uint8_transfer=True), _dm(shards, uint8_transfer=False)
    a, b = list(u8.train_dataloader()), list(f32.train_dataloader())
    assert len(a) == len(b) == 8  # 30 samples, 2 workers x 3 shards/2 shards -> 18 + 12 -> 5 + 3 batches
    for x in a:
        assert x["image"].dtype == torch.uint8 and x["image"].shape[1:] == (3, 16, 16)
    converted = [u8.on_after_batch_transfer(dict(x), 0) for x in a]
    _assert_same(converted, b)
    assert b[0]["image"].dtype == torch.float32
    lo, hi = min(float(x["image"].min()) for x in b), max(float(x["image"].max()) for x in b)
    assert -1.0 <= lo < -0.5 and 0.5 < hi <= 1.0  # the contract's range, and not a constant image
    # the conversion is x / 127.5 - 1 exactly: 0 -> -1, 255 -> 1
    edge = u8.on_after_batch_transfer(
        {"image": torch.tensor([0, 255], dtype=torch.uint8).view(1, 2, 1, 1)}, 0
    )
    assert edge["image"].flatten().tolist() == [-1.0, 1.0]


@pytest.mark.parametrize(
    ("value", "device", "expected"),
    [
        ("auto", torch.device("cuda", 1), True),
        ("auto", "cuda", True),
        ("auto", "gpu", True),
        ("auto", torch.device("cpu"), False),
        ("auto", "cpu", False),
        ("auto", "mps", False),
        ("auto", None, False),  # no trainer: nobody converts the uint8 images
        (True, "cpu", True),
        (False, "cuda", False),
        ("true", None, True),
        ("False", "cuda", False),
    ],
)
def test_uint8_transfer_resolver(value, device, expected):
    assert resolve_uint8_transfer(value, device) is expected


@pytest.mark.parametrize("value", ["yes", 1, None, "gpu"])
def test_uint8_transfer_resolver_refuses_other_values(value):
    with pytest.raises(UserError, match=r"data.uint8_transfer=.*use true, false or auto"):
        resolve_uint8_transfer(value, "cuda")


def test_prefetch_factor_is_checked(shards):
    dm = _dm(shards)
    stream = ShardStream(dm.train_urls, dm.options, 4, train=True)
    with pytest.raises(UserError, match=r"data.prefetch_factor=0: must be a whole number >= 1"):
        ResumableLoader(stream, 2, prefetch_factor=0)
    assert ResumableLoader(stream, 0, prefetch_factor=0).loader.prefetch_factor is None  # no workers


class _CountingStream(torch.utils.data.IterableDataset):
    """A stand-in for ShardStream: batch i is an image filled with i, allocated from the loader's pool."""

    def __init__(self, batches: int, nbytes: int = 1 << 16) -> None:
        super().__init__()
        self.batches, self.nbytes = batches, nbytes
        self.opts, self.urls, self.batch_size, self.train, self.skipped = None, [], 1, True, None
        self.epoch, self.rotation, self.rank, self.world_size, self.resume = 0, 0, 0, 1, {}
        self.seed, self.resampled, self.epoch_length, self.buffers = 0, False, None, None

    def __iter__(self):
        slots_used: set[int] = set()
        for i in range(self.batches):
            storage = self.buffers.storage(self.nbytes)
            slot = self.buffers.lent.get(storage.data_ptr())  # None: an unpooled buffer (all slots busy)
            image = torch.empty(0, dtype=torch.uint8).set_(storage, 0, (self.nbytes,)).fill_(i % 251)
            batch = {"image": image, "reused": slot is not None and slot in slots_used}
            slots_used.add(slot)
            batch.update(__buffers__=self.buffers.slots(batch), __worker__=0, __consumed__=i, __emitted__=i)
            yield batch


@pytest.mark.parametrize("keep", [False, True])
def test_pooled_batch_buffers_are_reused_only_once_released(keep):
    """Dropped batches' buffers come back; kept batches (and views of them) are never overwritten."""
    loader = ResumableLoader(_CountingStream(40), num_workers=1)
    kept, reused = [], 0
    for i, batch in enumerate(loader):
        assert int(batch["image"].min()) == int(batch["image"].max()) == i % 251
        reused += batch["reused"]
        if keep:
            kept.append(batch["image"][1:])  # a view keeps the buffer as busy as the batch
    for i, view in enumerate(kept):  # all still hold their own values: nothing was written over them
        assert int(view.min()) == int(view.max()) == i % 251
    if keep:
        assert reused == 0  # every buffer stayed busy: 8 pooled slots, then fresh ones
    else:
        assert reused >= 30  # of 40: a handful of slots cycle (prefetch keeps a few in flight)
    loader.close()
