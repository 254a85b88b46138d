"""LightningDataModule over WebDataset shards (`conf/data/*.yaml` instantiate `ShardDataModule`)."""

from __future__ import annotations

import copy
import logging
import multiprocessing as mp
import warnings
from collections.abc import Callable, Sequence
from dataclasses import fields
from numbers import Integral

import pytorch_lightning as pl
import webdataset as wds

from ldm.data.loader import ResumableLoader, default_pin_memory, resolve_uint8_transfer
from ldm.data.pipeline import MissingFieldError, PipelineOptions, ShardStream, decode_sample, image_to_float
from ldm.data.shards import check_split, expand_shards, is_local, shard_counts, tarfile_to_samples, world_info
from ldm.data.transforms import Compose
from ldm.errors import UserError

log = logging.getLogger(__name__)


def build_task(task) -> Callable[[dict], dict] | None:
    """A task transform from an object, a `_target_` config, or a list of them (applied in order)."""
    if task is None:
        return None
    if callable(task):
        return task
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(task, (list, tuple, ListConfig)):
        return Compose([build_task(t) for t in task])
    if isinstance(task, (dict, DictConfig)):
        from hydra.utils import instantiate

        cfg = OmegaConf.create(task) if isinstance(task, dict) else task
        if "_target_" not in cfg:
            raise UserError(
                f"data.task needs a _target_ (e.g. ldm.data.masks.InpaintingMask); got {dict(cfg)}"
            )
        return instantiate(cfg)
    raise UserError(f"data.task={task!r}: expected null, a _target_ config or a list of them")


def check_shards(urls: Sequence[str], opts: PipelineOptions, name: str, max_shards: int = 3) -> None:
    """Read the first sample of the first local shards: fail now on empty data or a key that is missing."""
    counts = shard_counts(urls)
    if counts is not None and sum(counts) == 0:
        raise UserError(f"data.{name}: the manifest lists 0 samples in {len(urls)} shard(s) ({urls[0]}, ...)")
    local = [u for u in urls if is_local(u)][:max_shards]
    for url in local:
        errors: list[BaseException] = []
        stream = wds.DataPipeline(wds.SimpleShardList([url]), tarfile_to_samples(handler=errors.append))
        raw = next(iter(stream), None)
        if raw is None:
            continue
        try:
            decode_sample(raw, opts, train=False, rng=None)
        except MissingFieldError as e:
            raise UserError(f"data.{name}: {e}") from None
        except Exception as e:  # a corrupt first sample is skipped during training like any other
            log.warning("data.%s: first sample of %s is unreadable (%s); it will be skipped", name, url, e)
        return
    if local and len(local) == len(urls):
        raise UserError(
            f"data.{name}: no readable sample in {len(urls)} shard(s) ({urls[0]}, ...); are they empty?"
        )
    if local:
        warnings.warn(f"data.{name}: the first {len(local)} shards hold no readable sample", stacklevel=2)


def _whole(name: str, value, minimum: int | None = None) -> int:
    """An integer option of the data config (a bool, a string or 2.5 is a mistake, not a number)."""
    whole = isinstance(value, Integral) and not isinstance(value, bool)
    if not whole or (minimum is not None and value < minimum):
        bound = "a whole number" + ("" if minimum is None else f" >= {minimum}")
        raise UserError(f"data.{name}={value}: must be {bound}.")
    return int(value)


class ShardDataModule(pl.LightningDataModule):
    """Train/val batches from WebDataset shards, per the shared batch contract; resumable mid-epoch.

    Loader settings are arguments; decoding/augmentation options (resolution, crop, flip, keys,
    caption_key, label_key, segmap_key, image_key, num_classes, latents, shuffle_buffer, buckets) go to
    `PipelineOptions` through **options, so Hydra configs stay flat (`data.resolution=128`).
    `buckets` (a mapping, `data.buckets.enabled=true`): aspect-ratio buckets, see ldm.data.buckets; train
    and val batches then hold one bucket's shape each and resume exactly as without.
    """

    def __init__(
        self,
        train_shards: str | Sequence[str] | None,
        val_shards: str | Sequence[str] | None = None,
        batch_size: int = 16,
        num_workers: int = 2,
        task=None,  # a callable(sample) -> sample, a _target_ config or a list of them; null = none
        seed: int = 0,  # the stream is a function of (seed, epoch, rank, worker)
        resampled: bool = False,  # sample shards with replacement (multi-node: pair with epoch_length)
        epoch_length: int | None = None,  # samples per rank per epoch; equal batch counts on all ranks
        val_batch_size: int | None = None,  # default: batch_size
        timeout: float = 300.0,  # seconds a loader worker may take for one batch before we error out
        persistent_workers: bool = True,  # keep loader workers between epochs (no fork, import per epoch)
        prefetch_factor: int = 2,  # batches each worker prepares ahead
        pin_memory: bool | str = "auto",  # page-locked batches for fast host-to-GPU copies; auto = with CUDA
        **options,
    ) -> None:
        super().__init__()
        names = {f.name for f in fields(PipelineOptions)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise UserError(
                f"data: unknown option(s) {unknown}; known: {sorted(names | {'train_shards', 'val_shards'})}"
            )
        if options.get("keys") is not None:
            options["keys"] = list(options["keys"])
        options.setdefault("uint8_transfer", "auto")  # uint8 hand-over when training on a CUDA GPU
        resolve_uint8_transfer(options["uint8_transfer"], None)  # a bad value fails here, before any work
        self.options = PipelineOptions(**options)
        self.train_spec, self.val_spec = train_shards, val_shards
        self.batch_size = _whole("batch_size", batch_size, 1)
        self.num_workers = _whole("num_workers", num_workers, 0)
        self.val_batch_size = _whole("val_batch_size", val_batch_size or batch_size, 1)
        self.seed, self.resampled, self.timeout = _whole("seed", seed), bool(resampled), float(timeout)
        self.epoch_length = _whole("epoch_length", epoch_length, 1) if epoch_length else None
        self.persistent_workers = bool(persistent_workers)
        self.prefetch_factor = _whole("prefetch_factor", prefetch_factor, 1)
        if not (isinstance(pin_memory, bool) or pin_memory == "auto"):
            raise UserError(
                f"data.pin_memory={pin_memory!r}: use true, false or auto (auto = when CUDA is present)"
            )
        self.pin_memory = default_pin_memory() if pin_memory == "auto" else pin_memory
        if self.timeout <= 0:
            raise UserError(f"data.timeout={timeout}: must be > 0 seconds per batch; e.g. data.timeout=300.")
        if self.resampled and not self.epoch_length:
            raise UserError(
                "data.resampled=true never runs out of data: set data.epoch_length (samples per rank)"
            )
        self.task = build_task(task)
        self.train_urls: list[str] | None = None
        self.val_urls: list[str] | None = None
        self._train_loader: ResumableLoader | None = None
        self._pending: dict | None = None
        self._skipped = mp.Value("q", 0)  # bad samples skipped, summed over all workers of this rank

    def __getstate__(self) -> dict:
        """Picklable (ddp_spawn, deepcopy): the shared counter travels as its value."""
        state = self.__dict__.copy()
        state["_skipped"] = int(self._skipped.value)
        state["_train_loader"] = None  # holds worker processes; rebuilt by train_dataloader()
        return state

    def __setstate__(self, state: dict) -> None:
        skipped = state.pop("_skipped", 0)
        self.__dict__.update(state)
        self._skipped = mp.Value("q", int(skipped))

    # --- setup ------------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        """Resolve and check the shard specs before training starts (UserError on nothing to read)."""
        if stage in (None, "fit") and self.train_urls is None:
            self.train_urls = expand_shards(self.train_spec, "train_shards")
            check_shards(self.train_urls, self.options, "train_shards")
            rank, world = world_info()
            if not self.resampled:
                check_split(len(self.train_urls), world, self.num_workers, "train_shards")
                if world > 1 and not self.epoch_length:
                    warnings.warn(
                        "data: ranks read different shards, so they may get different batch counts and DDP "
                        "can stall at the epoch end; set data.epoch_length (samples per rank per epoch).",
                        stacklevel=2,
                    )
        if stage in (None, "fit", "validate") and self.val_spec and self.val_urls is None:
            self.val_urls = expand_shards(self.val_spec, "val_shards")
            check_shards(self.val_urls, self.options, "val_shards")

    # --- loaders ----------------------------------------------------------------------------------
    def _current_epoch(self) -> int | None:
        trainer = self._trainer_or_none()
        return None if trainer is None else trainer.current_epoch

    def _trainer_or_none(self):
        return getattr(self, "trainer", None)

    def _stream_options(self) -> PipelineOptions:
        """The options with `uint8_transfer` resolved for where the trainer puts batches (auto: CUDA)."""
        trainer = self._trainer_or_none()
        device = None if trainer is None else trainer.strategy.root_device
        opts = copy.copy(self.options)
        opts.uint8_transfer = resolve_uint8_transfer(self.options.uint8_transfer, device)
        return opts

    def _loader(self, stream: ShardStream, epoch_fn, name: str) -> ResumableLoader:
        return ResumableLoader(
            stream,
            self.num_workers,
            self.timeout,
            epoch_fn,
            self.pin_memory,
            self.prefetch_factor,
            name=name,
            persistent_workers=self.persistent_workers,
        )

    def train_dataloader(self) -> ResumableLoader:
        if self.train_urls is None:
            self.setup("fit")
        stream = ShardStream(
            self.train_urls,
            self._stream_options(),
            self.batch_size,
            train=True,
            seed=self.seed,
            resampled=self.resampled,
            epoch_length=self.epoch_length,
            task=self.task,
            skipped=self._skipped,
        )
        loader = self._loader(stream, self._current_epoch, "train_shards")
        if self._pending is not None:
            loader.load_state(self._pending)
            self._pending = None
        self._train_loader = loader
        return loader

    def val_dataloader(self) -> ResumableLoader | list:
        if self.val_spec and self.val_urls is None:
            self.setup("validate")
        if not self.val_urls:
            return []  # Lightning skips validation
        stream = ShardStream(
            self.val_urls,
            self._stream_options(),
            self.val_batch_size,
            train=False,
            seed=self.seed,
            task=self.task,
        )
        return self._loader(stream, None, "val_shards")

    def check_autoencoder(self, identity: str) -> list[dict]:
        """Latent mode: refuse caches made by another autoencoder (UserError); returns their manifests.

        `identity` is `ldm.models.first_stage.weights_identity(autoencoder)` of the run's first stage.
        """
        from ldm.data.cache_latents import check_latent_manifest

        if not self.options.latents:
            return []
        self.setup("fit")
        specs = [u for u in (self.train_urls, self.val_urls) if u]
        return [check_latent_manifest(urls, identity) for urls in specs]

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        """With uint8_transfer: images become float32 in [-1,1] here, on the training device."""
        if isinstance(batch, dict) and "image" in batch:
            batch["image"] = image_to_float(batch["image"])
        return batch

    # --- bookkeeping ------------------------------------------------------------------------------
    @property
    def skipped(self) -> int:
        """Bad samples (corrupt, truncated, missing a key) skipped so far on this rank, all workers."""
        return int(self._skipped.value)

    def state_dict(self) -> dict:
        """Where the training stream stands: Lightning stores this in checkpoints."""
        loader = self._train_loader
        if loader is None or loader.epoch is None:
            return {"loader": self._pending} if self._pending else {}
        trainer, done = self._trainer_or_none(), None
        if trainer is not None and trainer.state.fn == "fit":
            # Batches trained on in this epoch; the loader itself has already prefetched further ahead.
            done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return {"loader": loader.state_at(done), "skipped": self.skipped}

    def load_state_dict(self, state_dict: dict) -> None:
        """Resume the training stream where `state_dict()` left it (applied at the next epoch start)."""
        self._skipped.value = int(state_dict.get("skipped", 0))
        self._pending = state_dict.get("loader")
        if self._train_loader is not None and self._pending is not None:
            self._train_loader.load_state(self._pending)
            self._pending = None
