"""Aspect-ratio buckets (NovelAI / kohya style): train on whole images of any shape, one shape per batch.

A bucket is an output size (width, height) whose sides are multiples of `step` px and whose area is at most
`max_area` px^2 (default: `data.resolution`^2, so a step costs about what a square one does). An image goes
to the bucket whose aspect ratio is closest to its own (in log ratio: 2:1 and 1:2 are as far from 1:1), is
resized so that it covers the bucket and cropped to it (randomly in training, centred in validation), so a
3:1 panorama stays a panorama instead of losing two thirds of its width to a square crop.

Each loader worker keeps one buffer per bucket and emits a batch when a buffer holds `batch_size` samples;
at the end of a pass the rest go out as smaller batches, one per bucket in a fixed order (never two shapes
in one batch). With `data.epoch_length` a worker emits exactly as many batches of exactly the sizes it would
without buckets (so every rank takes the same number of steps) and drops what it still holds at the end.

Resuming stays exact: every batch reports, besides the raw samples its worker has read, the positions
(in that worker's raw stream) of the samples still waiting in its buffers and how many batches it has
emitted. A resumed worker decodes just those samples again (same seeds, same crops) and continues. A rank
resuming from another rank's checkpoint (DDP: rank 0 writes it) replays its own stream from the start
using only each sample's size (the `image_size` that `make_shards` records, else the image header) to find
its buffers after that many batches, assuming no sample was unreadable, as the plain pipeline assumes.

Sampling at other sizes needs nothing from here: `python sample.py height=320 width=192 ...`.
"""

from __future__ import annotations

import io
import itertools
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
from PIL import ExifTags, Image

from ldm.data.images import MIN_IMAGE_SIDE
from ldm.data.transforms import CropBox
from ldm.errors import UserError

Size = tuple[int, int]  # (width, height) in pixels (or latent cells, for cached latents)


@dataclass(frozen=True)
class BucketOptions:
    """`data.buckets.*`: which bucket sizes exist. Off by default (square crops, as before)."""

    enabled: bool = False
    max_area: int | None = None  # px^2 of the largest bucket; null = data.resolution^2
    step: int = 64  # px; both sides are multiples of this (a multiple of f x the UNet's downsampling)
    min_side: int | None = None  # px; null = step
    max_side: int | None = None  # px; null = bounded by max_area and max_ratio only
    max_ratio: float = 2.0  # longest over shortest side of a bucket; wider images are cropped to this

    def __post_init__(self) -> None:
        def whole(name: str, value, minimum: int) -> None:
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < minimum
            ):
                raise UserError(f"data.buckets.{name}={value!r}: must be a whole number >= {minimum} (px)")

        if not isinstance(self.enabled, bool):
            raise UserError(f"data.buckets.enabled={self.enabled!r}: must be true or false")
        whole("step", self.step, 1)
        whole("max_area", self.max_area, 1)
        for name in ("min_side", "max_side"):
            value = getattr(self, name)
            whole(name, value, 1)
            if value is not None and value % self.step:
                raise UserError(
                    f"data.buckets.{name}={value}: must be a multiple of data.buckets.step={self.step}; "
                    f"e.g. data.buckets.{name}={max(self.step, value // self.step * self.step)}"
                )
        ratio = self.max_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 1.0 <= ratio < math.inf:
            raise UserError(
                f"data.buckets.max_ratio={ratio!r}: must be a number >= 1 (2.0 allows 2:1 and 1:2)"
            )

    @classmethod
    def from_config(cls, value) -> BucketOptions | None:
        """A `data.buckets` mapping (or BucketOptions, or null) -> options, or None when off."""
        if value is None:
            return None
        if not isinstance(value, BucketOptions):
            if hasattr(value, "items"):
                value = {str(k): v for k, v in value.items()}
            else:
                raise UserError(
                    f"data.buckets={value!r}: expected a mapping like {{enabled: true, step: 64}}"
                )
            known = {f for f in cls.__dataclass_fields__}
            unknown = sorted(set(value) - known)
            if unknown:
                raise UserError(f"data.buckets has unknown key(s) {unknown}; known: {sorted(known)}")
            value = cls(**value)
        return value if value.enabled else None

    def signature(self) -> list:
        """What must match for a saved loader position to mean the same batches."""
        return [self.max_area, self.step, self.min_side, self.max_side, float(self.max_ratio)]


def bucket_sizes(
    max_area: int, step: int, min_side: int | None = None, max_side: int | None = None, max_ratio: float = 2.0
) -> list[Size]:
    """All (width, height) buckets, sorted from tallest to widest (kohya's `make_bucket_resolutions`).

    For every width w = min_side, min_side + step, ... <= max_side, the largest height that is a multiple of
    `step` with w * h <= max_area (and <= max_side), plus the transposed size and the largest square; sizes
    whose long / short side exceeds `max_ratio` are left out. E.g. max_area=256^2, step=64, max_ratio=2:
    [(192, 320), (256, 256), (320, 192)]. Raises UserError when no size fits.
    """
    low = min_side or step
    high = max_side or max(low, max_area // low // step * step)
    sizes: set[Size] = set()
    square = math.isqrt(max_area) // step * step
    if low <= square <= high:
        sizes.add((square, square))
    for width in range(low, high + 1, step):
        height = min(high, max_area // width // step * step)
        if height >= low:
            sizes.update({(width, height), (height, width)})
    sizes = {s for s in sizes if max(s) <= max_ratio * min(s) + 1e-9}
    if not sizes:
        raise UserError(
            f"data.buckets: no bucket fits max_area={max_area} px^2 with step={step}, min_side={low}, "
            f"max_side={high}, max_ratio={max_ratio}; raise max_area (or data.resolution) or lower min_side"
        )
    return sorted(sizes, key=lambda s: (s[0] / s[1], s[0]))


class BucketSet:
    """The bucket sizes for one resolution, and where an image of a given size goes and how it is cropped."""

    def __init__(self, options: BucketOptions, resolution: int) -> None:
        self.options = options
        area = options.max_area or resolution * resolution
        self.sizes = bucket_sizes(area, options.step, options.min_side, options.max_side, options.max_ratio)
        self._log_ratios = np.log([w / h for w, h in self.sizes])
        self.max_side = max(max(s) for s in self.sizes)

    def assign(self, width: int, height: int) -> Size:
        """The bucket whose aspect ratio is closest to width / height (in log ratio; ties: the first)."""
        return self.sizes[int(np.argmin(np.abs(self._log_ratios - math.log(width / height))))]

    def draft(self, width: int, height: int) -> int:
        """Pixels the shorter side of a (width x height) image needs so that resizing covers its bucket."""
        bw, bh = self.assign(width, height)
        return math.ceil(min(width, height) * max(bw / width, bh / height))

    def crop(
        self, width: int, height: int, crop: str, flip: bool, rng: np.random.Generator | None
    ) -> tuple[CropBox, Size]:
        """Where to crop a (width x height) image for its bucket, and the bucket.

        The box (source pixels) has the bucket's aspect ratio and the largest size that fits: the image,
        resized by max(bw / width, bh / height), covers the bucket exactly along one side. Both sides are
        computed and clamped to the image; `crop="random"` places it uniformly (whole pixels), "center" in
        the middle; `flip` mirrors it with probability 1/2 (only with an rng)."""
        bw, bh = self.assign(width, height)
        scale = max(bw / width, bh / height)
        box_w, box_h = min(float(width), bw / scale), min(float(height), bh / scale)
        room_x, room_y = int(width - box_w + 1e-6), int(height - box_h + 1e-6)  # whole pixels of slack
        if crop == "random" and rng is not None:
            left, top = rng.integers(0, room_x + 1), rng.integers(0, room_y + 1)
        elif crop in ("center", "random"):
            left, top = (width - box_w) / 2, (height - box_h) / 2
        else:
            raise ValueError(f"crop={crop!r}: use 'center' or 'random'")
        mirrored = bool(flip and rng is not None and rng.random() < 0.5)
        return CropBox(float(left), float(top), box_w, mirrored, height=box_h), (bw, bh)


def header_size(data: bytes) -> Size | None:
    """Upright (EXIF orientation applied) (width, height) from an image's header, without decoding it;
    None when unreadable or below MIN_IMAGE_SIDE (the pipeline skips such images)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:  # noqa: BLE001 - unreadable: decoding would skip it too
        return None
    if min(width, height) < MIN_IMAGE_SIDE:
        return None
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def recorded_size(raw: dict) -> Size | None:
    """The upright (width, height) that make_shards records in a sample's json ("image_size"), if any."""
    try:
        value = json.loads(raw["json"])["image_size"]
    except Exception:  # noqa: BLE001 - no record (older shards, other writers): sizes come from the image
        return None
    ok = isinstance(value, list) and len(value) == 2 and all(type(v) is int and v > 0 for v in value)
    return (value[0], value[1]) if ok else None


def peek_bucket(raw: dict, opts) -> Size | None:
    """A raw sample's bucket without decoding it (None: decoding would skip it), from its recorded size or its
    image header; cached latents: their shape. `opts`: the PipelineOptions (with buckets on)."""
    from ldm.data.pipeline import IMAGE_MEMBERS, LATENT_FIELDS, read_tensor  # (pipeline imports this module)

    try:
        if opts.latents:
            latent = next(t for n in LATENT_FIELDS if (t := read_tensor(raw, n)) is not None)
            return (int(latent.shape[-1]), int(latent.shape[-2]))
        if "image" in opts.keys:
            member = opts.image_key or next(m for m in IMAGE_MEMBERS if m in raw)
            size = recorded_size(raw) or header_size(raw[member])
        elif "segmap" in opts.keys:
            size = header_size(raw[opts.segmap_key])
        else:
            return (0, 0)
    except Exception:  # noqa: BLE001 - a missing or unreadable member: decoding would skip the sample
        return None
    return None if size is None else opts.bucket_set.assign(*size)


# --- batching ---------------------------------------------------------------------------------------------
class BucketBatcher:
    """One buffer per bucket; a batch is the first `need` samples of the first (by size) buffer holding that
    many. `need` is batch_size, or with a quota (data.epoch_length) the sizes the plain pipeline would emit:
    batch_size until fewer than that remain, then the rest, then nothing."""

    def __init__(self, batch_size: int, quota: int | None = None, emitted: int = 0, batches: int = 0) -> None:
        self.batch_size, self.quota, self.emitted, self.batches = batch_size, quota, emitted, batches
        self.buffers: dict[Size, list[tuple[int, dict | None]]] = {}

    def need(self) -> int:
        """Samples in the next batch; 0 when the quota is met."""
        if self.quota is None:
            return self.batch_size
        return max(0, min(self.batch_size, self.quota - self.emitted))

    @property
    def done(self) -> bool:
        return self.quota is not None and self.emitted >= self.quota

    def add(self, key: Size, position: int, sample: dict | None) -> None:
        self.buffers.setdefault(key, []).append((position, sample))

    def held(self) -> list[int]:
        """Raw-stream positions of the samples waiting in the buffers, ascending."""
        return sorted(p for buffer in self.buffers.values() for p, _ in buffer)

    def _take(self, key: Size, n: int) -> list[dict | None]:
        taken, self.buffers[key] = self.buffers[key][:n], self.buffers[key][n:]
        self.batches += 1
        self.emitted += len(taken)
        return [s for _, s in taken]

    def ready(self) -> Iterator[list[dict | None]]:
        """Full batches, as long as some buffer holds enough (lazy: stop pulling to stop emitting)."""
        while (need := self.need()) > 0:
            key = next((k for k in sorted(self.buffers) if len(self.buffers[k]) >= need), None)
            if key is None:
                return
            yield self._take(key, need)

    def leftovers(self) -> Iterator[list[dict | None]]:
        """At the end of a pass without a quota: every non-empty buffer as one (smaller) batch, by size."""
        for key in sorted(self.buffers):
            if self.buffers[key] and not self.done:
                yield self._take(key, len(self.buffers[key]))


Position = tuple  # (raw consumed, emitted) or (raw consumed, emitted, {"held": [...], "batches": n})


def bucketed_batches(
    open_raw: Callable[[int], Iterator[tuple[int, dict]]],
    decode: Callable[[dict, int], dict | None],
    peek: Callable[[dict], Size | None],
    batch_size: int,
    quota: int | None,
    start: Position | None,
) -> Iterator[tuple[list[dict], Position]]:
    """One worker's batches, each with the position to resume after it.

    `open_raw(p)`: (position, raw sample) from raw position p on; `decode(raw, position)`: the decoded sample
    with its bucket under "__bucket__" (None = skipped); `peek(raw)`: its bucket without decoding (None =
    would be skipped); `start`: the position to resume from (None: the start of the epoch). A position
    without "held" (another rank's) is first replayed with `peek` to find this worker's own.
    """
    consumed, emitted = (0, 0) if start is None else (int(start[0]), int(start[1]))
    extra = start[2] if start is not None and len(start) > 2 else None
    if extra is not None and "held" not in extra:
        consumed, emitted, extra = _replay(open_raw, peek, batch_size, quota, int(extra["batches"]))
    held = set((extra or {}).get("held", ()))
    batcher = BucketBatcher(batch_size, quota, emitted, int((extra or {}).get("batches", 0)))
    if batcher.done:
        return

    def out(batch: list, upto: int) -> tuple[list[dict], Position]:
        return batch, (upto, batcher.emitted, {"held": batcher.held(), "batches": batcher.batches})

    refilled = not held
    for position, raw in open_raw(min(held, default=consumed)):
        if position < consumed:  # resuming: decode again only what the buffers held
            if position in held and (sample := decode(raw, position)) is not None:
                batcher.add(sample["__bucket__"], position, sample)
            continue
        if not refilled:  # the buffers are as they were: emit what was due before reading on
            refilled = True
            yield from (out(b, consumed) for b in batcher.ready())
        if batcher.done:
            return
        sample = decode(raw, position)
        consumed = position + 1
        if sample is None:
            continue
        batcher.add(sample["__bucket__"], position, sample)
        yield from (out(b, consumed) for b in batcher.ready())
        if batcher.done:
            return
    yield from (out(b, consumed) for b in batcher.ready())
    if quota is None:
        yield from (out(b, consumed) for b in batcher.leftovers())


def _replay(open_raw, peek, batch_size: int, quota: int | None, batches: int) -> tuple[int, int, dict]:
    """(consumed, emitted, {"held", "batches"}) after `batches` batches, from bucket sizes alone."""
    batcher, consumed = BucketBatcher(batch_size, quota), 0
    for position, raw in open_raw(0):
        if batcher.batches >= batches:
            break
        consumed = position + 1
        key = peek(raw)
        if key is not None:
            batcher.add(key, position, None)
            for _ in itertools.islice(batcher.ready(), batches - batcher.batches):
                pass
    if batcher.batches < batches and quota is None:
        for _ in itertools.islice(batcher.leftovers(), batches - batcher.batches):
            pass
    return consumed, batcher.emitted, {"held": batcher.held(), "batches": batcher.batches}


def for_another_rank(position: Position) -> Position:
    """Another rank's saved position as this rank's starting point (DDP checkpoints hold rank 0's): the same
    batch count, assuming no skipped samples; with buckets the worker replays its stream to place it."""
    consumed, emitted, *extra = position
    if extra and extra[0]:
        return (emitted, emitted, {"batches": int(extra[0]["batches"])})
    return (emitted, emitted)
