"""Shard specs, manifests, rank/worker discovery and the seeds that make the data stream reproducible."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import tarfile
import warnings
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import braceexpand
import webdataset as wds
from webdataset.tariterators import base_plus_ext, url_opener

from ldm.errors import UserError

GLOB_CHARS = set("*?[")


def _expand_one(spec: str) -> list[str]:
    """One string spec -> URLs: `::`-separated parts, brace ranges, then globs for local paths."""
    urls: list[str] = []
    for part in spec.split("::"):
        part = part.strip()
        if not part:
            continue
        if part.startswith("pipe:") or "://" in part:  # remote/pipe specs: braces only, no filesystem checks
            urls.extend(braceexpand.braceexpand(part))
            continue
        for item in braceexpand.braceexpand(os.path.expanduser(part)):
            if GLOB_CHARS & set(item):
                urls.extend(sorted(glob.glob(item)))
            elif os.path.isdir(item):
                urls.extend(sorted(glob.glob(os.path.join(item, "*.tar"))))
            elif os.path.isfile(item):
                urls.append(item)
    return urls


def expand_shards(spec: str | Sequence[str] | None, name: str = "shards") -> list[str]:
    """Resolve a shard spec (path, glob, brace range, directory, `pipe:`/URL, `::`-joined or a list).

    Raises UserError naming the spec when it matches nothing, so training fails before it starts.
    """
    if spec is None or spec == "" or spec == []:
        raise UserError(
            f"data.{name} is empty: set it to your shards, e.g. '/data/train-{{000000..000099}}.tar'"
        )
    specs = [spec] if isinstance(spec, str) else [str(s) for s in spec]
    urls: list[str] = []
    for s in specs:
        found = _expand_one(s)
        if not found:
            hint = " (run `make data` to generate the embedded demo set)" if "shapes" in s else ""
            raise UserError(
                f"data.{name}={s!r} matches no shard files{hint}; check the path, glob or brace range"
            )
        urls.extend(found)
    return urls


def is_local(url: str) -> bool:
    return not (url.startswith("pipe:") or "://" in url)


def read_manifest(urls: Sequence[str]) -> dict[str, int]:
    """Per-shard sample counts from the `manifest.json` beside local shards ({} when there is none)."""
    counts: dict[str, int] = {}
    for folder in sorted({os.path.dirname(os.path.abspath(u)) for u in urls if is_local(u)}):
        path = Path(folder) / "manifest.json"
        if not path.is_file():
            continue
        try:
            manifest = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            warnings.warn(f"ignoring unreadable manifest {path}: {e}", stacklevel=2)
            continue
        for shard in manifest.get("shards", []):
            counts[os.path.join(folder, shard["name"])] = int(shard["count"])
    return counts


def shard_counts(urls: Sequence[str]) -> list[int] | None:
    """Sample count of each shard from its manifest, or None when any shard is not listed."""
    counts = read_manifest(urls)
    result = [counts.get(os.path.abspath(u)) if is_local(u) else None for u in urls]
    return None if any(c is None for c in result) else result  # type: ignore[return-value]


def world_info() -> tuple[int, int]:
    """(rank, world_size) from torch.distributed when initialised, else RANK/WORLD_SIZE, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def split_by_rank(urls: Iterable[str], rank: int, world_size: int) -> Iterator[str]:
    """Every world_size-th shard starting at rank: as `webdataset.split_by_node`, with explicit ids."""
    for i, url in enumerate(urls):
        if i % world_size == rank:
            yield url


def split_by_worker(urls: Iterable[str], worker: int, num_workers: int) -> Iterator[str]:
    """Every num_workers-th shard starting at worker: as `webdataset.split_by_worker`, with explicit ids.

    Explicit ids (instead of reading `get_worker_info()`) let a resumed run hand worker roles around so
    its first batch comes from the worker that was next in the interrupted run.
    """
    return split_by_rank(urls, worker, num_workers)


def check_split(num_shards: int, world_size: int, num_workers: int, name: str) -> None:
    """Warn when some (rank, worker) pairs would get no shard at all."""
    slots = world_size * max(num_workers, 1)
    if num_shards < slots:
        warnings.warn(
            f"data.{name}: {num_shards} shard(s) for {world_size} rank(s) x {max(num_workers, 1)} worker(s): "
            f"{slots - num_shards} worker(s) get no data. Write more, smaller shards "
            "(python -m ldm.data.make_shards --shard-size N) or lower data.num_workers; "
            "data.resampled=true also works (sampling with replacement).",
            stacklevel=2,
        )


def mix_seed(*parts: int | str) -> int:
    """A stable 63-bit seed from integers/strings (Python's hash() of str changes between processes)."""
    h = hashlib.blake2b(digest_size=8)
    for p in parts:
        h.update(str(p).encode())
        h.update(b"\x00")
    return int.from_bytes(h.digest(), "little") >> 1


# --- reading shards -------------------------------------------------------------------------------------
class ShardReadError(Exception):
    """A shard that is truncated or corrupt: the sample being read and the rest of the shard are lost."""

    def __init__(self, message: str, url: str) -> None:
        super().__init__(message)
        self.url = url


def _tar_members(url: str, fileobj) -> Iterator[tuple[str, str, bytes | None]]:
    """(key, suffix, data) per regular member; data None announces a member about to be read.

    Raises tarfile.ReadError when the archive stops without its end-of-archive block (a cut inside
    a header: `tarfile` itself ends such a stream silently).
    """
    stream = tarfile.open(fileobj=fileobj, mode="r|*")
    for info in stream:
        if not info.isreg() or (info.name.startswith("__") and info.name.endswith("__")):
            continue
        key, suffix = base_plus_ext(info.name)
        if key is None:
            continue
        yield key, suffix.lower(), None
        yield key, suffix.lower(), stream.extractfile(info).read()
        stream.members = []  # stream mode: keep no TarInfo list
    if stream.fileobj.tell() - stream.offset != tarfile.BLOCKSIZE:  # the end block was not read whole
        raise tarfile.ReadError("the archive ends early, without its end-of-archive block")


def tar_samples(
    src: Iterable[dict], handler: Callable[[BaseException], bool] = wds.reraise_exception
) -> Iterator[dict]:
    """Shard URLs -> raw samples {"__key__", "__url__", suffix: bytes}, as `wds.tarfile_to_samples`,
    but a truncated or corrupt shard is reported to `handler` as one `ShardReadError` naming the shard
    and the sample where it breaks; that incomplete sample is dropped, not passed on missing members."""
    for source in url_opener(src, handler=handler):
        url, current = source["url"], None
        try:
            for key, suffix, data in _tar_members(url, source["stream"]):
                if current is None or key != current["__key__"]:
                    if current is not None:
                        yield current
                    current = {"__key__": key, "__url__": url}
                if data is None:
                    continue
                if suffix in current:
                    handler(ValueError(f"shard {url}: sample {key!r} holds two {suffix!r} members"))
                    continue
                current[suffix] = data
        except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
            where = f"at sample {current['__key__']!r}" if current else "before its first sample"
            error = ShardReadError(
                f"shard {url} is truncated or corrupt {where} ({type(e).__name__}: {e}); "
                "skipped the rest of this shard",
                url,
            )
            if not handler(error):
                return
            continue
        finally:
            close = getattr(source["stream"], "close", None)
            if close is not None:
                close()
        if current is not None:
            yield current


tarfile_to_samples = wds.pipelinefilter(tar_samples)
