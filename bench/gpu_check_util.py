"""bench/gpu_check.py's measuring kit: the sizes of a run, the device context every section gets (`Check`),
timing, batch fitting on CUDA OOM, FLOP rates and MFU, and the per-variant error handling."""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import signal
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `ldm`, for the modules that import this one first
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

# Dense bf16 tensor-core peak in TFLOP/s (data sheets, no sparsity) by a substring of the device name
# (torch.cuda.get_device_name(), e.g. "NVIDIA H100 80GB HBM3"); the first match wins ("H100 PCIe" first).
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM
    ("H200", 989.0),  # also GH200
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
)
SD1_YAML = REPO / "ldm" / "interop" / "configs" / "sd1.yaml"
CONTEXT_LEN = 77  # CLIP tokens
LATENT_FACTOR = 8  # SD's autoencoder: 512 px images <-> 64x64 latents
GRACE_S = 30.0  # a section still running this long after the budget is spent is stopped


@dataclass(frozen=True)
class Sizes:
    """What one mode measures; `unet` / `ae` override sd1.yaml's UNet params / autoencoder ddconfig."""

    unet: dict = field(default_factory=dict)
    latent: int = 64  # latent side = image side / 8
    batch: int = 16  # first training batch tried (halved on CUDA OOM)
    ae: dict = field(default_factory=dict)
    ae_batch: int = 8
    sample_steps: int = 20
    warmup: int = 3  # steps before timing; the first one compiles
    max_steps: int = 20  # timed steps per variant at most
    max_runs: int = 3  # timed sampling runs at most
    smoke_steps: int = 6
    smoke_batch: int = 8
    data_args: tuple[str, ...] = ()  # make_dataset.py options when the shapes data must be built


FULL = Sizes()
DRY = Sizes(
    unet={"model_channels": 32, "channel_mult": [1, 2], "num_res_blocks": 1, "context_dim": 64},
    latent=8,
    batch=2,
    ae={"ch": 32, "num_res_blocks": 1},
    ae_batch=2,
    sample_steps=3,
    warmup=1,
    max_steps=1,
    max_runs=1,
    smoke_steps=3,
    smoke_batch=4,
    data_args=("--train", "64", "--val", "16", "--train-shards", "2", "--val-shards", "1", "--workers", "1"),
)


class Skipped(Exception):
    """A section or variant that cannot run here; the message is the recorded reason."""


class SectionTimeout(Exception):
    """The whole time budget (plus GRACE_S) ran out inside a section."""


# ---- measuring -------------------------------------------------------------------------------------------


def achieved_tflops(flops: float, seconds: float) -> float:
    """`flops` done in `seconds`, in TFLOP/s (1e12 FLOP per second)."""
    return flops / seconds / 1e12


def mfu(tflops: float, peak_tflops: float | None) -> float | None:
    """Model FLOPs utilisation: achieved / peak TFLOP/s, a fraction (None without a peak)."""
    return tflops / peak_tflops if peak_tflops else None


def peak_for(device_name: str, override: float | None = None) -> tuple[float | None, str]:
    """(dense bf16 peak TFLOP/s or None, where it came from) for a torch.cuda.get_device_name() string."""
    if override:
        return override, "--peak-tflops"
    for key, peak in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return peak, f"table: {key}"
    return None, f"{device_name!r} is not in PEAK_BF16_TFLOPS: pass --peak-tflops for MFU"


def timed(step: Callable[[], Any], sync: Callable[[], None], warmup: int, steps: int, seconds: float) -> dict:
    """Warm-up calls (at least one), then timed calls until `steps` are done or `seconds` spent (>= 1).

    Returns first_step_s (the first call: compilation included), step_s (median), timed_steps."""
    start = time.perf_counter()
    step()
    sync()
    first = time.perf_counter() - start
    for _ in range(warmup - 1):
        step()
        sync()
    times: list[float] = []
    begin = time.perf_counter()
    while not times or (len(times) < steps and time.perf_counter() - begin < seconds):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return dict(first_step_s=first, step_s=statistics.median(times), timed_steps=len(times))


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def fit_batch(run: Callable[[int], dict], batch: int) -> dict:
    """run(batch), halving the batch on CUDA out-of-memory until it fits; re-raises when batch 1 does not."""
    while True:
        try:
            return {"batch": batch, **run(batch)}
        except torch.cuda.OutOfMemoryError:
            if batch == 1:
                raise
        free_memory()  # outside the except block: the traceback no longer holds the activations
        batch //= 2


@contextlib.contextmanager
def alarm(seconds: float) -> Iterator[None]:
    """Raise SectionTimeout in the main thread after `seconds` (a no-op where there is no SIGALRM)."""
    if not hasattr(signal, "SIGALRM"):
        yield
        return

    def fire(signum, frame):
        raise SectionTimeout(f"stopped when the time budget ran out ({seconds:.0f} s after the start)")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1.0))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@dataclass
class Check:
    """What every section shares: options, sizes, device, the peak and the autocast dtype."""

    args: argparse.Namespace
    sizes: Sizes
    device: torch.device
    peak: float | None
    dtype: torch.dtype  # autocast: bf16 on CUDA, float32 (no autocast) on CPU, where bf16 is slow

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gib(self) -> float | None:
        return torch.cuda.max_memory_allocated(self.device) / 2**30 if self.cuda else None

    def rates(self, flops: float, seconds: float) -> dict:
        tflops = achieved_tflops(flops, seconds)
        return dict(tflops=tflops, mfu=mfu(tflops, self.peak))

    def compile(self, module: torch.nn.Module) -> Callable:
        torch._dynamo.reset()  # each compiled variant compiles (and is timed) on its own
        mode = self.args.compile_mode if self.args.compile_backend == "inductor" else None
        return torch.compile(module, backend=self.args.compile_backend, mode=mode)


def run_variants(specs: dict[str, Callable[[float], dict]], seconds: float) -> dict:
    """Each variant with an equal part of what is left of `seconds`; each records its own status."""
    out: dict[str, dict] = {}
    start = time.perf_counter()
    for i, (name, fn) in enumerate(specs.items()):
        left = seconds - (time.perf_counter() - start)
        if left <= 0 and out:
            out[name] = dict(status="skipped", reason="the section's time share was spent")
            continue
        try:
            out[name] = {"status": "ok", **fn(max(left, 0.0) / (len(specs) - i))}
        except Skipped as e:
            out[name] = dict(status="skipped", reason=str(e))
        except SectionTimeout:
            raise
        except Exception as e:  # one variant's failure keeps the others' figures
            out[name] = dict(status="failed", error=f"{type(e).__name__}: {e}", traceback=traceback_tail())
        free_memory()
    return {"variants": out}


def traceback_tail(chars: int = 3000) -> str:
    return traceback.format_exc()[-chars:]
