"""Loader throughput vs the raw decode limit on the same JPEG shards, with the same number of processes.

    python bench/bench_dataloader.py [--n 1500] [--size 384] [--resolution 256] [--workers 2] [--task inpaint]

"raw" = PIL decode + shortest-side resize + centre crop of the very same JPEG bytes in a tight loop,
one process per worker (the ceiling for any loader that decodes with PIL). "ldm" = ShardDataModule
(tar reading, decode, random crop, flip, tensor conversion, optional task transform, batching and
the hand-over from worker processes). Goal: ldm >= 90% of raw.

The shards are written as `ldm.data.make_shards` writes them (`mtime=0`: plain ustar headers; a float
mtime makes tarfile add a PAX header per member, which doubles tar parsing). Each round runs raw and the
loaders back to back and takes each loader's ratio to that round's raw speed; the table gives the median
ratio over the rounds (the machine may be shared: ratios within a round are what is comparable).
The "epoch 2" column is the next epoch of the same loader, timed from `iter()` including its first
batch: with persistent workers (the default) there is no new fork/import, only the shuffle-buffer fill.
"""

from __future__ import annotations

import argparse
import io
import multiprocessing as mp
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_jpeg_shards(folder: Path, n: int, size: int, shard_size: int = 250) -> list[bytes]:
    """n JPEGs (100 distinct shapes scenes, upscaled, with grain so they do not compress to nothing)."""
    import webdataset as wds

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
    from make_dataset import make_sample

    rng = np.random.default_rng(0)
    distinct = []
    for i in range(min(n, 100)):
        s = make_sample(0, "train", i, 64)
        img = np.asarray(
            s["image"].resize((size, int(size * 0.75)), Image.Resampling.BICUBIC), dtype=np.int16
        )
        img = np.clip(img + rng.integers(-12, 13, img.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=90)
        distinct.append((buf.getvalue(), s["caption"]))
    images = []
    # mtime=0 as ldm.data.make_shards / cache_latents write shards (plain ustar headers, no PAX records)
    with wds.ShardWriter(str(folder / "bench-%06d.tar"), maxcount=shard_size, verbose=0, mtime=0) as writer:
        for i in range(n):
            data, caption = distinct[i % len(distinct)]
            writer.write({"__key__": f"{i:08d}", "jpg": data, "txt": caption})
            images.append(data)
    return images


def _raw_worker(args: tuple[list[bytes], int, float]) -> tuple[int, float]:
    blobs, resolution, start_at = args
    while time.time() < start_at:  # all processes start together
        time.sleep(0.001)
    t0 = time.perf_counter()
    for data in blobs:
        img = Image.open(io.BytesIO(data))
        img.draft("RGB", (resolution, resolution))
        img = img.convert("RGB")
        side = min(img.size)
        left, top = (img.width - side) // 2, (img.height - side) // 2
        img.resize(
            (resolution, resolution), Image.Resampling.BICUBIC, box=(left, top, left + side, top + side)
        )
    return len(blobs), time.perf_counter() - t0


def _cpu() -> float:
    """CPU seconds of this process plus its finished children (pool/loader workers are reaped on exit)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def bench_raw(blobs: list[bytes], resolution: int, workers: int) -> tuple[float, float]:
    """(samples/s, samples per CPU-second) of decode+resize alone, split over `workers` processes."""
    parts = [blobs[i::workers] for i in range(workers)]
    cpu0 = _cpu()
    with mp.get_context("fork").Pool(workers) as pool:
        start_at = time.time() + 0.5
        results = pool.map(_raw_worker, [(p, resolution, start_at) for p in parts])
        pool.close()
        pool.join()
    cpu = _cpu() - cpu0
    n = sum(k for k, _ in results)
    return n / max(t for _, t in results), n / cpu


def bench_loader(
    folder: Path, resolution: int, workers: int, batch_size: int, task: str | None, uint8: bool = False
) -> tuple[float, float, float, float]:
    """(samples/s after the first batch, samples per CPU-second overall, seconds to the first batch,
    samples/s of the second epoch of the same loader including its start)."""
    from ldm.data.datamodule import ShardDataModule

    task_obj = None
    if task == "inpaint":
        from ldm.data.masks import InpaintingMask

        task_obj = InpaintingMask()
    elif task == "superres":
        from ldm.data.degradations import SuperResolution

        task_obj = SuperResolution(4)
    dm = ShardDataModule(
        str(folder / "bench-*.tar"),
        None,
        batch_size=batch_size,
        num_workers=workers,
        resolution=resolution,
        keys=["image", "caption"],
        task=task_obj,
        uint8_transfer=uint8,
    )
    dm.setup("fit")
    cpu0, t0 = _cpu(), time.perf_counter()
    loader = dm.train_dataloader()
    batches = iter(loader)
    first = len(next(batches)["caption"])
    t1 = time.perf_counter()
    n = sum(len(b["caption"]) for b in batches)
    t2 = time.perf_counter()
    # Steady state: worker start-up (fork, first shuffle-buffer fill) happens once and is reported
    # apart; the raw loop's process start-up is excluded the same way.
    n2 = sum(len(b["caption"]) for b in loader)  # epoch 2: persistent workers, restarted streams
    t3 = time.perf_counter()
    loader.close()
    cpu = _cpu() - cpu0
    return n / (t2 - t1), (n + first + n2) / cpu, t1 - t0, n2 / (t3 - t2)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=1000, help="images in the benchmark shards")
    p.add_argument("--size", type=int, default=512, help="width of the stored JPEGs (4:3)")
    p.add_argument("--resolution", type=int, default=256, help="training crop side")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--task", choices=["none", "inpaint", "superres"], default="none")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds; medians are reported")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        t0 = time.perf_counter()
        blobs = make_jpeg_shards(folder, a.n, a.size)
        print(
            f"# {a.n} JPEGs {a.size}x{int(a.size * 0.75)} -> {a.resolution}px crops, {a.workers} worker(s), "
            f"batch {a.batch_size}, task {a.task} (data written in {time.perf_counter() - t0:.1f}s)"
        )
        task = None if a.task == "none" else a.task
        names = ["raw PIL decode+resize", "ldm, float32 batches"]
        if task is None:
            names.append("ldm, uint8_transfer=true")
        runs: dict[str, list[tuple[float, ...]]] = {name: [] for name in names}
        startup = []
        for _ in range(a.repeats):  # interleaved, so each round sees one machine load
            for name in names:
                if name.startswith("raw"):
                    speed, per_cpu = bench_raw(blobs, a.resolution, a.workers)
                    runs[name].append((speed, per_cpu, speed))
                else:
                    speed, per_cpu, first, epoch2 = bench_loader(
                        folder, a.resolution, a.workers, a.batch_size, task, "uint8" in name
                    )
                    runs[name].append((speed, per_cpu, epoch2))
                    startup.append(first)
    raw = runs[names[0]]
    med = statistics.median
    print(f"{'':28s}{'samples/s':>11s}{'per CPU-s':>11s}{'ratio':>8s}{'CPU ratio':>11s}{'epoch 2':>10s}")
    for name in names:
        rs = runs[name]
        ratio = med(r[0] / w[0] for r, w in zip(rs, raw))
        cpu_ratio = med(r[1] / w[1] for r, w in zip(rs, raw))
        epoch2 = med(r[2] / w[0] for r, w in zip(rs, raw))
        print(
            f"{name:28s}{med(r[0] for r in rs):11.0f}{med(r[1] for r in rs):11.0f}"
            f"{ratio:8.2f}{cpu_ratio:11.2f}{epoch2:10.2f}"
        )
    print(f"# goal: ratio >= 0.90, the median over {a.repeats} interleaved rounds; samples/s after the")
    print(f"# first batch; per CPU-s counts the {med(startup):.2f}s to the first batch (start-up), epoch 2.")
    print("# epoch 2: the loader's next epoch over raw's speed, including its restart (persistent workers).")
    print(
        "# uint8_transfer leaves the float conversion to the GPU (ShardDataModule.on_after_batch_transfer),"
    )
    print("# like the raw loop, which also stops at uint8.")
    load = os.getloadavg()[0]
    if load > (os.cpu_count() or 1):
        print(f"# busy machine (load {load:.1f} on {os.cpu_count()} cores): timings are noisy")
    return 0


if __name__ == "__main__":
    sys.exit(main())
