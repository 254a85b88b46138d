"""The WebDataset stream: shards -> raw samples -> decoded, cropped, task-transformed batches.

Each (rank, worker) reads its own slice of the shard list and batches inside the worker, so a batch is
a deterministic function of (seed, epoch, rank, worker, position). Every batch carries private
bookkeeping (`__worker__`, `__consumed__`, `__emitted__`, with buckets `__buckets__`) that `ResumableLoader`
strips and keeps to resume mid-epoch without decoding the samples it skips. Aspect-ratio buckets
(`data.buckets`, ldm.data.buckets) crop each image to its bucket and batch one bucket at a time.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import math
import random
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from ldm.data.buckets import BucketOptions, BucketSet, bucketed_batches, peek_bucket, recorded_size
from ldm.data.images import ImageDecodeError, decode_segmap, open_image, to_rgb
from ldm.data.shards import ShardReadError, mix_seed, split_by_rank, split_by_worker, tarfile_to_samples
from ldm.data.text import decode_text
from ldm.data.transforms import RNG_KEY, choose_crop, crop_resize, to_tensor
from ldm.errors import UserError

log = logging.getLogger(__name__)

IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp")  # tried in this order when image_key is null
LATENT_FIELDS = ("latent_mean", "latent_logvar", "latent")  # stored as <name>.npy, or <name>.pth (bfloat16)
FIELDS = ("image", "caption", "label", "segmap", "caption_emb", "key")
MAX_CONSECUTIVE_ERRORS = 200  # this many bad samples in a row is a config mistake, not corrupt data
# More than this share of a worker's samples unusable (after MIN_SAMPLES_FOR_SKIP_CHECK read) stops the run:
# training on a silently shrunken data set is not what was asked for. Each distinct cause is shown
# SKIP_EXAMPLES times, then only counted.
MAX_SKIP_FRACTION = 0.05
MIN_SAMPLES_FOR_SKIP_CHECK = 40
SKIP_EXAMPLES = 3


class SampleError(Exception):
    """A sample that cannot be used (corrupt member, missing key): skipped with a warning and counted."""


class MissingFieldError(SampleError):
    """A sample lacks a member the config asks for (names the key and the shard)."""


@dataclass
class PipelineOptions:
    """How samples are decoded and augmented (the flat `data.*` keys other than loader settings)."""

    resolution: int = 64  # output side: shortest side resized to this, then a square crop
    crop: str = "random"  # random | center (validation always centre-crops)
    flip: bool = True  # random horizontal flip in training (not applied to cached latents)
    keys: Sequence[str] = ("image", "caption")  # fields: image caption label segmap caption_emb key
    image_key: str | None = None  # member holding the image; null = first of jpg/jpeg/png/webp
    caption_key: str = "txt"  # member (txt) or JSON field (json.caption)
    label_key: str = "cls"  # member (cls) or JSON field (json.label)
    segmap_key: str = "seg.png"  # single-channel PNG of class ids
    num_classes: int | None = None  # segmap classes incl. background; a larger id is a bad sample
    latents: bool = False  # latent shards from ldm.data.cache_latents: no image decoding
    shuffle_buffer: int = 1000  # samples held for shuffling in each worker (0 = no shuffling)
    # Ship "image" as uint8 (B,3,H,W) and let ShardDataModule.on_after_batch_transfer make it float on
    # the device: 4x less shared memory and host-to-GPU traffic. Only for training through Lightning
    # (a bare DataLoader then yields uint8); ignored when a task transform needs float images.
    # ShardDataModule resolves "auto" (its default) to true when the trainer's device is a CUDA GPU.
    uint8_transfer: bool | str = False
    # Aspect-ratio buckets (ldm.data.buckets): a `data.buckets` mapping; off (null / enabled: false) = the
    # square crops above. With latents=true, batches group by the cached latents' shape.
    buckets: Any = None

    def __post_init__(self) -> None:
        self.keys = tuple(self.keys)
        self.buckets = BucketOptions.from_config(self.buckets)  # None when off
        unknown = [k for k in self.keys if k not in FIELDS]
        if unknown:
            raise UserError(f"data.keys has {unknown}; choose from {list(FIELDS)}")
        if self.crop not in ("random", "center"):
            raise UserError(f"data.crop={self.crop!r}: use 'random' or 'center'")
        if self.resolution <= 0:
            raise UserError(f"data.resolution={self.resolution}: must be a positive number of pixels")
        self.bucket_set = (
            None if not self.buckets or self.latents else BucketSet(self.buckets, self.resolution)
        )


def _members(raw: dict) -> str:
    return ", ".join(sorted(k for k in raw if not k.startswith("__")))


def _where(raw: dict) -> str:
    return f"sample {raw.get('__key__')!r} of shard {raw.get('__url__')}"


def read_field(raw: dict, spec: str, name: str):
    """A member's bytes (`txt`) or a JSON field (`json.caption`, nested with more dots)."""
    if spec.startswith("json.") and spec not in raw:
        if "json" not in raw:
            raise MissingFieldError(
                f"{_where(raw)} has no 'json' member for data.{name}_key={spec!r} (members: {_members(raw)})"
            )
        meta = raw.get("__json__")
        if meta is None:
            text = decode_text(raw["json"], f"json of {_where(raw)}", warn_once=str(raw.get("__url__")))
            meta = raw["__json__"] = json.loads(text)
        value = meta
        for part in spec.split(".")[1:]:
            if not isinstance(value, dict) or part not in value:
                raise MissingFieldError(
                    f"{_where(raw)}: its json has no field {spec[5:]!r} (data.{name}_key)"
                )
            value = value[part]
        return value
    if spec not in raw:
        raise MissingFieldError(
            f"{_where(raw)} has no {spec!r} member for data.{name}_key (members: {_members(raw)})"
        )
    return raw[spec]


def read_tensor(raw: dict, name: str) -> torch.Tensor | None:
    """`<name>.npy` (pickled objects refused) or `<name>.pth` (a plain tensor, weights_only) as float32."""
    if f"{name}.npy" in raw:
        array = np.lib.format.read_array(io.BytesIO(raw[f"{name}.npy"]), allow_pickle=False)
        return torch.from_numpy(array.astype(np.float32))
    if f"{name}.pth" in raw:
        tensor = torch.load(io.BytesIO(raw[f"{name}.pth"]), weights_only=True, map_location="cpu")
        if not isinstance(tensor, torch.Tensor):
            raise SampleError(f"{_where(raw)}: {name}.pth holds a {type(tensor).__name__}, not a tensor")
        return tensor.float()
    return None


def decode_sample(
    raw: dict, opts: PipelineOptions, train: bool, rng: np.random.Generator | None, uint8: bool = False
) -> dict:
    """Raw tar members -> contract fields of one sample: image (3,R,R) in [-1,1], segmap (R,R) int64, ...

    `uint8=True` leaves "image" as the (R,R,3) uint8 array; `collate` converts a whole batch in one pass.
    With buckets (`opts.bucket_set`) the image is (3,h,w) for its bucket (w, h), also kept in "__bucket__".
    """
    out: dict = {"__key__": raw.get("__key__"), "__url__": raw.get("__url__")}
    box, source_size, size, buckets = None, None, opts.resolution, opts.bucket_set
    if opts.latents:
        for name in LATENT_FIELDS:
            tensor = read_tensor(raw, name)
            if tensor is not None:
                out[name] = tensor
        if "latent_mean" not in out and "latent" not in out:
            raise MissingFieldError(
                f"{_where(raw)} has no latent_mean or latent .npy/.pth (members: {_members(raw)})"
            )
        if opts.buckets is not None:  # batches group by the cached latents' (width, height)
            latent = out.get("latent_mean", out.get("latent"))
            out["__bucket__"] = (int(latent.shape[-1]), int(latent.shape[-2]))
    elif "image" in opts.keys:
        member = opts.image_key or next((m for m in IMAGE_MEMBERS if m in raw), None)
        if member is None or member not in raw:
            want = opts.image_key or "/".join(IMAGE_MEMBERS)
            raise MissingFieldError(f"{_where(raw)} has no image member {want!r} (members: {_members(raw)})")
        recorded, draft = None, opts.resolution
        if buckets is not None:  # the size make_shards recorded gives the exact draft; else the largest
            recorded = recorded_size(raw)
            draft = buckets.draft(*recorded) if recorded else buckets.max_side
        name = f"{member} of {_where(raw)}"
        try:  # upright (EXIF), transparency on white, >= MIN_IMAGE_SIDE px: see ldm.data.images
            opened = open_image(raw[member], name, draft=draft)
            if recorded is not None and opened.size != recorded:  # a wrong record: size the draft safely
                opened = open_image(raw[member], name, draft=buckets.max_side)
        except ImageDecodeError as e:
            raise SampleError(str(e)) from None
        img, source_size = to_rgb(opened.image), opened.size
        if buckets is None:
            box = choose_crop(*source_size, opts.crop if train else "center", opts.flip and train, rng)
        else:
            box, size = buckets.crop(*source_size, opts.crop if train else "center", opts.flip and train, rng)
            out["__bucket__"] = size
        scale = (img.size[0] / source_size[0], img.size[1] / source_size[1])  # per side: drafts round each
        img = crop_resize(img, box, size, Image.Resampling.BICUBIC, scale)
        out["image"] = np.asarray(img) if uint8 else to_tensor(img)
    if "segmap" in opts.keys:
        out["segmap"] = _decode_segmap(raw, opts, box, source_size, size, train, rng)
        if buckets is not None and "__bucket__" not in out:  # a map without an image: its own bucket
            out["__bucket__"] = (int(out["segmap"].shape[-1]), int(out["segmap"].shape[-2]))
    if "caption" in opts.keys:
        value = read_field(raw, opts.caption_key, "caption")
        if isinstance(value, bytes):  # UTF-8, else cp1252 with one warning per shard (ldm.data.text)
            value = decode_text(value, f"caption of {_where(raw)}", warn_once=str(raw.get("__url__")))
        out["caption"] = str(value).strip()
    if "label" in opts.keys:
        out["label"] = int(read_field(raw, opts.label_key, "label"))
    if "key" in opts.keys:  # the sample's __key__, for debugging and exact-order tests
        out["key"] = str(raw.get("__key__"))
    if "caption_emb" in opts.keys:  # text-encoder states cached by cache_latents --text-encoder
        emb = read_tensor(raw, "caption_emb")
        if emb is None:
            raise MissingFieldError(f"{_where(raw)} has no caption_emb.npy/.pth (members: {_members(raw)})")
        out["caption_emb"] = emb
    return out


def _cause(exn: BaseException, raw: dict | None) -> str:
    """A skip's cause without the sample's name or numbers, to group repeats of one problem."""
    text = str(exn)
    if raw is not None:
        text = text.replace(_where(raw), "")
    text = re.sub(r"<[^<>]* at 0x[0-9a-fA-F]+>", "<object>", text)  # e.g. "<_io.BytesIO object at 0x7f...>"
    return f"{type(exn).__name__}: " + re.sub(r"\d+", "#", text).strip()[:160]


def _decode_segmap(
    raw: dict, opts: PipelineOptions, box, source_size, size, train: bool, rng
) -> torch.Tensor:
    try:  # class ids as stored (palette indices, grey values), upright: see ldm.data.images
        ids = decode_segmap(read_field(raw, opts.segmap_key, "segmap"), f"segmap of {_where(raw)}")
    except ImageDecodeError as e:
        raise SampleError(str(e)) from None
    seg = Image.fromarray(ids.astype(np.int32), "I")
    if box is None and not opts.latents:  # no image loaded: crop the map on its own
        source_size, crop, flip = seg.size, opts.crop if train else "center", opts.flip and train
        if opts.bucket_set is None:
            box = choose_crop(*seg.size, crop, flip, rng)
        else:
            box, size = opts.bucket_set.crop(*seg.size, crop, flip, rng)
    if box is not None:  # same crop and flip as the image, nearest-neighbour so ids stay ids
        (w, h), (iw, ih) = seg.size, source_size
        if abs(h * iw - w * ih) > max(iw, ih):  # not the image's shape at another scale
            raise SampleError(
                f"{_where(raw)}: segmap is {w}x{h} but the image is {iw}x{ih} (upright, after its EXIF "
                "orientation); save the map with the image's shape"
            )
        seg = crop_resize(seg, box, size, Image.Resampling.NEAREST, (w / iw, h / ih))
    arr = np.asarray(seg).astype(np.int64)
    if opts.num_classes is not None and arr.max(initial=0) >= opts.num_classes:
        raise SampleError(
            f"{_where(raw)}: segmap has class id {arr.max()} >= data.num_classes={opts.num_classes}"
        )
    return torch.from_numpy(arr)


def _empty(shape: tuple[int, ...], dtype: torch.dtype, buffers=None) -> torch.Tensor:
    """An output buffer; inside a loader worker in shared memory (as torch's default_collate does), so
    handing the batch to the main process costs no second copy. `buffers` (`ldm.data.loader.SharedBuffers`,
    set by the loader): reuse a buffer the main process has released instead of faulting in fresh pages."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    storage = torch.UntypedStorage._new_shared(nbytes) if buffers is None else buffers.storage(nbytes)
    return torch.empty(0, dtype=dtype).set_(storage, 0, shape)


def _stack(values: list[torch.Tensor], buffers=None) -> torch.Tensor:
    out = _empty((len(values), *values[0].shape), values[0].dtype, buffers)
    # np.stack is a plain memcpy; torch.stack crawled with busy intra-op threads (see to_tensor)
    np.stack([v.numpy() for v in values], out=out.numpy())
    return out


def _images(values: list[np.ndarray], uint8: bool, buffers=None) -> torch.Tensor:
    """(H,W,3) uint8 arrays -> (B,3,H,W): float32 in [-1,1], or uint8 as a channels-last view.

    uint8: one memcpy per image into a (B,H,W,3) buffer, returned as its (B,3,H,W) permuted view (a
    transposing copy here cost ~4x the memcpy); `image_to_float` makes it contiguous on the device.
    """
    h, w, _ = values[0].shape
    if uint8:
        out = _empty((len(values), h, w, 3), torch.uint8, buffers)
        np.stack(values, out=out.numpy())
        return out.permute(0, 3, 1, 2)
    out = _empty((len(values), 3, h, w), torch.float32, buffers)
    dst = out.numpy()
    for b, x in enumerate(values):
        for c in range(3):
            np.multiply(x[:, :, c], np.float32(1 / 127.5), out=dst[b, c], casting="unsafe")
    dst -= np.float32(1.0)
    return out


def image_to_float(image: torch.Tensor) -> torch.Tensor:
    """uint8 (B,3,H,W) of any strides -> contiguous float32 in [-1,1] (the contract), on the batch's device.

    The same float32 arithmetic as `collate`'s float path (x * float32(1/127.5) - 1): bit-identical.
    """
    if image.dtype != torch.uint8:
        return image
    if image.device.type == "cpu":  # numpy: single-threaded and predictable in a busy main process
        out = np.empty(tuple(image.shape), np.float32)
        np.multiply(image.numpy(), np.float32(1 / 127.5), out=out, casting="unsafe")
        out -= np.float32(1.0)
        return torch.from_numpy(out)
    return image.contiguous().float().mul_(1 / 127.5).sub_(1.0)


def collate(samples: list[dict], uint8_images: bool = False, buffers=None) -> dict:
    """Stack tensors, turn ints into int64 tensors and keep strings as lists; drop `__` keys."""
    batch: dict = {}
    for key in samples[0]:
        if key.startswith("__"):
            continue
        values = [s[key] for s in samples]
        if isinstance(values[0], np.ndarray) and values[0].dtype == np.uint8 and key == "image":
            batch[key] = _images(values, uint8_images, buffers)
        elif isinstance(values[0], torch.Tensor):
            batch[key] = _stack(values, buffers)
        elif isinstance(values[0], (bool, int, np.integer)):
            batch[key] = torch.tensor(values, dtype=torch.int64)
        elif isinstance(values[0], float):
            batch[key] = torch.tensor(values, dtype=torch.float32)
        else:
            batch[key] = values
    return batch


def _guard_empty(shards, progress: list[int], limit: int = 100) -> Callable[[], Iterator[dict]]:
    """Resampling never runs out of shards: stop with an error when `limit` in a row held nothing."""

    def source() -> Iterator[dict]:
        empty = 0
        for item in shards:
            before = progress[0]
            yield item  # resumed once the previous shard has been read to its end
            empty = empty + 1 if progress[0] == before else 0
            if empty >= limit:
                raise UserError(f"{limit} shards in a row held no readable sample (last: {item['url']})")

    return source


def share(total: int, parts: int, index: int) -> int:
    """The index-th of `parts` near-equal integer shares of `total`."""
    return total // parts + (1 if index < total % parts else 0)


class ShardStream(torch.utils.data.IterableDataset):
    """Batches from WebDataset shards for one rank; worker roles and resume offsets set by the loader."""

    def __init__(
        self,
        urls: Sequence[str],
        opts: PipelineOptions,
        batch_size: int,
        train: bool,
        seed: int = 0,
        resampled: bool = False,
        epoch_length: int | None = None,
        task: Callable[[dict], dict] | None = None,
        skipped=None,
    ) -> None:
        super().__init__()
        self.urls, self.opts, self.batch_size, self.train = list(urls), opts, batch_size, train
        self.seed, self.resampled, self.epoch_length, self.task = seed, resampled, epoch_length, task
        self.skipped = skipped  # multiprocessing.Value shared with the workers (or None)
        self.epoch, self.rank, self.world_size = 0, 0, 1  # set by the loader before each epoch
        self.rotation = 0  # physical worker p plays logical worker (p + rotation) % num_workers
        self.resume: dict[int, tuple] = {}  # logical worker -> (raw consumed, emitted[, bucket buffers])
        self.buffers = None  # in loader workers: ldm.data.loader.SharedBuffers for the batch tensors
        self._errors_in_a_row = 0
        self._bad_shards: list[str] = []  # truncated/corrupt shards not yet reported in a batch
        self._read = 0  # samples this worker tried to decode, and how many of them were skipped, by cause
        self._skips: dict[str, list[str]] = {}

    # --- where this worker's samples come from -------------------------------------------------
    def _worker(self) -> tuple[int, int]:
        info = torch.utils.data.get_worker_info()
        if info is None:
            return 0, 1
        return (info.id + self.rotation) % info.num_workers, info.num_workers

    def _shard_passes(self, worker: int, num_workers: int, progress: list[int]) -> Iterator[dict]:
        """This worker's shards, one pass (or repeated passes when epoch_length caps the epoch)."""
        order = list(self.urls)
        if self.train:  # same order on every rank, so the rank slices stay disjoint
            random.Random(mix_seed(self.seed, self.epoch, "shards")).shuffle(order)
        mine = list(split_by_worker(split_by_rank(order, self.rank, self.world_size), worker, num_workers))
        passes = itertools.count() if self.epoch_length else range(1)
        for rep in passes:  # repeated passes (epoch_length) reuse this worker's shards: all before any twice
            if rep > 0:
                random.Random(mix_seed(self.seed, self.epoch, self.rank, worker, rep)).shuffle(mine)
            before = progress[0]
            for url in mine:
                yield {"url": url}
            if progress[0] == before:
                return  # nothing read in a whole pass (no shards, empty or unreadable): stop, don't spin

    def raw_samples(self, worker: int, num_workers: int) -> Iterator[dict]:
        """Undecoded samples for (rank, worker) in their shuffled order; deterministic in the epoch."""
        progress = [0]

        def count(src: Iterator[dict]) -> Iterator[dict]:
            for sample in src:
                progress[0] += 1
                yield sample

        if self.resampled:  # with replacement, independently per (rank, worker): no splitting needed
            shards = wds.ResampledShards(
                self.urls,
                seed=mix_seed(self.seed, "resampled") & 0x7FFFFFFF,
                worker_seed=lambda: mix_seed(self.rank, worker) & 0x7FFFFFFF,
                deterministic=True,
            )
            shards.epoch = self.epoch - 1  # its __iter__ increments before seeding
            shards = _guard_empty(shards, progress)
        else:
            shards = lambda: self._shard_passes(worker, num_workers, progress)  # noqa: E731  (a source stage)
        stages = [shards, tarfile_to_samples(handler=self._on_error), count]
        if self.train and self.opts.shuffle_buffer > 1:
            rng = random.Random(mix_seed(self.seed, self.epoch, self.rank, worker, "samples"))
            stages.append(
                wds.shuffle(self.opts.shuffle_buffer, initial=min(100, self.opts.shuffle_buffer), rng=rng)
            )
        return iter(wds.DataPipeline(*stages))

    # --- errors ---------------------------------------------------------------------------------
    def _on_error(self, exn: BaseException, raw: dict | None = None) -> bool:
        """webdataset-style handler: warn, count and continue; give up after a long run of failures."""
        if isinstance(exn, UserError):
            raise exn
        self._errors_in_a_row += 1
        if self.skipped is not None:
            with self.skipped.get_lock():
                self.skipped.value += 1
        where = f" ({_where(raw)})" if raw is not None and not isinstance(exn, SampleError) else ""
        if isinstance(exn, ShardReadError):  # also named in the loader's per-epoch summary
            self._bad_shards.append(exn.url)
            log.warning("%s", exn)
        else:
            examples = self._skips.setdefault(_cause(exn, raw), [])
            examples.append(_where(raw) if raw is not None else str(exn))
            if len(examples) <= SKIP_EXAMPLES:
                last = len(examples) == SKIP_EXAMPLES
                more = " (further skips for this cause are counted, not shown)" if last else ""
                log.warning("skipping bad sample%s: %s: %s%s", where, type(exn).__name__, exn, more)
            self._check_skip_share()
        if self._errors_in_a_row >= MAX_CONSECUTIVE_ERRORS:
            raise UserError(
                f"{self._errors_in_a_row} samples in a row could not be used; the last: {exn}{where}. "
                "Check data.keys / data.*_key against the members of your shards."
            )
        return True

    def _check_skip_share(self) -> None:
        """UserError when more than MAX_SKIP_FRACTION of this worker's samples were unusable."""
        skipped = sum(len(v) for v in self._skips.values())
        if self._read < MIN_SAMPLES_FOR_SKIP_CHECK or skipped <= MAX_SKIP_FRACTION * self._read:
            return
        cause, examples = max(self._skips.items(), key=lambda kv: len(kv[1]))
        raise UserError(
            f"{skipped} of the {self._read} samples read so far could not be used "
            f"({100 * skipped / self._read:.0f}% > {100 * MAX_SKIP_FRACTION:.0f}%); most often "
            f"({len(examples)}x): {cause}, e.g. {', '.join(examples[:3])}. Fix or drop those files "
            "(python -m ldm.data.make_shards re-encodes a folder), or check data.keys / data.*_key against "
            "your shards."
        )

    # --- the stream -----------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict]:
        worker, num_workers = self._worker()
        start = self.resume.get(worker)
        quota = share(self.epoch_length, num_workers, worker) if self.epoch_length else None
        if self.opts.buckets is not None:  # per-bucket buffers: ldm.data.buckets
            batches = bucketed_batches(
                lambda first: itertools.islice(enumerate(self.raw_samples(worker, num_workers)), first, None),
                lambda raw, position: self._decode(raw, worker, position),
                lambda raw: peek_bucket(raw, self.opts),
                self.batch_size,
                quota,
                start,
            )
            for samples, (consumed, emitted, extra) in batches:
                yield self._finish(samples, worker, consumed, emitted, extra)
            return
        consumed, emitted = start[:2] if start else (0, 0)
        if quota is not None and emitted >= quota:
            return
        raw_stream = self.raw_samples(worker, num_workers)
        if consumed:
            raw_stream = itertools.islice(raw_stream, consumed, None)  # skipped undecoded: cheap
        batch: list[dict] = []
        for raw in raw_stream:
            sample = self._decode(raw, worker, consumed)
            consumed += 1
            if sample is None:
                continue
            batch.append(sample)
            emitted += 1
            if len(batch) == self.batch_size or emitted == quota:
                yield self._finish(batch, worker, consumed, emitted)
                batch = []
            if emitted == quota:
                return
        if batch:
            yield self._finish(batch, worker, consumed, emitted)

    def _decode(self, raw: dict, worker: int, position: int) -> dict | None:
        """The sample at `position` of this worker's raw stream, task applied; None when skipped (counted)."""
        epoch = self.epoch if self.train else -1  # validation draws the same masks every epoch
        rng = np.random.default_rng([self.seed, epoch + 1, self.rank, worker, position])
        self._read += 1
        try:
            sample = decode_sample(raw, self.opts, self.train, rng, uint8=self.task is None)
            if self.task is not None:
                sample[RNG_KEY] = rng
                sample = self.task(sample)
        except UserError:
            raise
        except Exception as exn:  # corrupt image, missing member, bad segmap: skip and count
            self._on_error(exn, raw)
            return None
        self._errors_in_a_row = 0
        sample.setdefault("__bucket__", (0, 0))
        return sample

    def _finish(self, samples: list[dict], worker: int, consumed: int, emitted: int, buckets=None) -> dict:
        batch = collate(samples, uint8_images=self.opts.uint8_transfer, buffers=self.buffers)
        if self.buffers is not None:  # which pooled buffers the batch uses, for the main process to free
            batch["__buffers__"] = self.buffers.slots(batch)
        batch.update(__worker__=worker, __consumed__=consumed, __emitted__=emitted)
        if buckets is not None:  # samples waiting in the bucket buffers, and this worker's batch count
            batch["__buckets__"] = buckets
        if self._bad_shards:  # handed to the main process with the next batch of this worker
            batch["__bad_shards__"], self._bad_shards = self._bad_shards, []
        return batch
