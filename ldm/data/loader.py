"""A DataLoader over a ShardStream that strips bookkeeping, records progress and resumes mid-epoch.

Resume: each batch says which logical worker made it and how many raw samples that worker had read.
After `load_state(...)`, every worker skips its recorded number of raw (undecoded) samples and the
worker roles rotate so that physical worker 0 plays the worker that was next in the interrupted run;
the DataLoader's round-robin then reproduces the uninterrupted batch order exactly.
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from collections.abc import Callable, Iterator

import torch
from torch.utils.data import DataLoader

from ldm.data.pipeline import ShardStream, share
from ldm.data.shards import world_info
from ldm.errors import UserError

log = logging.getLogger(__name__)


class ResumableLoader:
    """Iterable of batch dicts (the shared contract) for one rank; one `iter()` per epoch."""

    def __init__(
        self,
        stream: ShardStream,
        num_workers: int = 0,
        timeout: float = 300.0,
        epoch_fn: Callable[[], int | None] | None = None,
        pin_memory: bool = False,
        prefetch_factor: int = 2,
        name: str = "train_shards",
    ) -> None:
        self.stream, self.num_workers, self.epoch_fn, self.name = stream, num_workers, epoch_fn, name
        self.loader = DataLoader(
            stream,
            batch_size=None,  # the stream batches inside the workers
            num_workers=num_workers,
            # A worker that dies raises at once (PyTorch checks worker status); one that hangs (a stuck
            # pipe: URL, a deadlocked decoder) raises after `timeout` seconds instead of blocking forever.
            timeout=timeout if num_workers > 0 else 0,
            # Fresh workers each epoch: they must see the new epoch number and any resume offsets.
            persistent_workers=False,
            pin_memory=pin_memory,
            prefetch_factor=prefetch_factor if num_workers > 0 else None,
        )
        self.epoch: int | None = None
        self._next_epoch = 0
        self.history: list[tuple[int, int, int]] = []  # (logical worker, raw consumed, emitted) per batch
        self._base: dict[int, tuple[int, int]] = {}  # offsets this epoch started from (after a resume)
        self._base_last: int | None = None
        self._base_batches = 0
        self._pending: dict | None = None
        self._discard = 0

    # --- sizes ------------------------------------------------------------------------------------
    def _workers(self) -> int:
        return max(self.num_workers, 1)

    def __len__(self) -> int:
        """Batches per epoch on this rank; only defined when `epoch_length` fixes it."""
        n = self.stream.epoch_length
        if not n:
            raise TypeError("length is only known when data.epoch_length is set")
        b = self.stream.batch_size
        return sum(-(-share(n, self._workers(), w) // b) for w in range(self._workers()))

    def signature(self) -> dict:
        """What must match for a saved position to mean the same samples."""
        s = self.stream
        urls = hashlib.sha256("\n".join(s.urls).encode()).hexdigest()[:16]
        return dict(
            num_workers=self._workers(),
            world_size=s.world_size,
            batch_size=s.batch_size,
            seed=s.seed,
            resampled=s.resampled,
            epoch_length=s.epoch_length,
            shuffle_buffer=s.opts.shuffle_buffer,
            urls=urls,
        )

    # --- iteration --------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict]:
        # A generator: nothing happens until the first batch is requested, so an `iter()` made only to
        # check iterability (Lightning does that) neither starts an epoch nor consumes a resume point.
        epoch = self.epoch_fn() if self.epoch_fn is not None else None
        self.epoch = self._next_epoch if epoch is None else int(epoch)
        self._next_epoch = self.epoch + 1
        s = self.stream
        s.epoch = self.epoch
        s.rank, s.world_size = world_info()
        self._start_epoch()
        yield from self._batches()

    def _start_epoch(self) -> None:
        s, pending, self._pending = self.stream, self._pending, None
        self.history, self._base, self._base_last, self._base_batches, self._discard = [], {}, None, 0, 0
        s.resume, s.rotation = {}, 0
        if pending is not None and pending.get("epoch") is not None and self.epoch < pending["epoch"]:
            self._pending = pending  # not there yet: keep it for its epoch
            return
        if pending is None or pending.get("epoch") != self.epoch or not pending.get("batches"):
            return
        if pending.get("signature") != self.signature():
            warnings.warn(
                f"data: the checkpoint's loader settings {pending.get('signature')} differ from now "
                f"({self.signature()}); skipping {pending['batches']} batches by reading them (not exact).",
                stacklevel=3,
            )
            self._discard = pending["batches"]
            return
        workers = {int(w): (int(c), int(e)) for w, (c, e) in pending["workers"].items()}
        if pending.get("rank", 0) != s.rank:  # rank 0's checkpoint: same schedule, assume no skipped samples
            workers = {w: (e, e) for w, (_, e) in workers.items()}
        self._base, self._base_last, self._base_batches = workers, pending["last_worker"], pending["batches"]
        s.resume = workers
        s.rotation = 0 if self._base_last is None else (self._base_last + 1) % self._workers()
        log.info("data: resuming epoch %d after %d batches", self.epoch, self._base_batches)

    def _batches(self) -> Iterator[dict]:
        produced, skipped_before = 0, self._skipped()
        bad_shards: list[str] = []  # truncated or corrupt, reported by the workers with their batches
        for batch in _plain_user_errors(self.loader):
            self.history.append(
                (batch.pop("__worker__"), batch.pop("__consumed__"), batch.pop("__emitted__"))
            )
            bad_shards += [u for u in batch.pop("__bad_shards__", []) if u not in bad_shards]
            produced += 1
            if self._discard:
                self._discard -= 1
                continue
            yield batch
        skipped = self._skipped() - skipped_before
        if skipped:  # the workers warned one by one; this is the per-epoch total in the main process
            log.warning(
                "data.%s: skipped %d bad sample(s) or shard read error(s) in epoch %s (%d so far)%s",
                self.name,
                skipped,
                self.epoch,
                self._skipped(),
                f"; truncated or corrupt shard(s): {', '.join(bad_shards)}" if bad_shards else "",
            )
        if produced == 0 and self._base_batches == 0 and not self.stream.train:
            log.warning("data.%s: rank %d has no validation data", self.name, self.stream.rank)
        elif produced == 0 and self._base_batches == 0:
            raise UserError(
                f"data.{self.name}: rank {self.stream.rank} read no usable sample this epoch ("
                f"{len(self.stream.urls)} shard(s), {self.stream.world_size} rank(s), "
                f"{self._workers()} worker(s)); "
                "check that the shards hold samples with the keys in data.keys"
            )

    def _skipped(self) -> int:
        counter = self.stream.skipped
        return 0 if counter is None else int(counter.value)

    # --- state ------------------------------------------------------------------------------------
    def state_at(self, batches: int | None = None) -> dict:
        """The position after `batches` batches of the current epoch (default: all delivered so far)."""
        done = len(self.history) + self._base_batches if batches is None else int(batches)
        seen = max(0, min(done - self._base_batches, len(self.history)))
        workers, last = dict(self._base), self._base_last
        for w, c, e in self.history[:seen]:
            workers[w], last = (c, e), w
        return dict(
            epoch=self.epoch,
            batches=self._base_batches + seen,
            workers={str(w): [c, e] for w, (c, e) in sorted(workers.items())},
            last_worker=last,
            rank=self.stream.rank,
            signature=self.signature(),
        )

    def load_state(self, state: dict) -> None:
        """Resume from `state_at()` output at the next `iter()` of the same epoch."""
        self._pending = dict(state) if state else None

    # Lightning treats an iterable with these as resumable; the real state lives in the DataModule.
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state_dict: dict) -> None:
        pass


def _plain_user_errors(loader: DataLoader) -> Iterator[dict]:
    """Re-raise a worker's UserError with just its message (PyTorch wraps it in the worker traceback)."""
    try:
        yield from loader
    except UserError as e:
        text = str(e)
        if "Original Traceback" in text and "UserError: " in text:
            raise UserError(text.rsplit("UserError: ", 1)[-1].strip()) from None
        raise


def default_pin_memory() -> bool:
    return torch.cuda.is_available()
