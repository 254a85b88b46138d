"""Shared machinery of the side-by-side training-step benchmarks: one model per child process.

Each model runs in its own subprocess, so its peak memory is its own. The parent drives the children line
by line over stdin/stdout: `step` times one training step, `finish` ends the child, which answers with one
JSON line (its parameter count, peak memory, ...). On CPU the parent alternates the children step by step
(ABBA...), because the cores are often shared and both models should see the same load; on CUDA it runs
one child after the other (a dedicated device, and two resident SD-size models might not fit).

Peak memory, as `peak_memory_bytes` measures it:
- CUDA: `torch.cuda.max_memory_allocated()` over the warmup and timed steps (weights, gradients, optimizer
  state and activations; no allocator cache).
- CPU: growth of the process's peak resident set (`getrusage(RUSAGE_SELF).ru_maxrss`) over its RSS before
  the model is built; it also counts allocator slack, so compare the numbers with each other rather than
  with a byte count of tensors.

A benchmark script calls `serve_steps` in its child mode (`--only NAME`) and `run_children` in the parent.
The speed switches (`add_switch_arguments`: --compile, --compile-mode, --channels-last, --adamw) apply to
every model of a run alike (`apply_switches`, through `ldm.training.speed.prepare_for_speed`, the function
training uses), so each comparison is ours vs diffusers with the same options.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

# torch AdamW implementations: `default` is torch's own choice (the per-tensor loop on CPU, foreach on CUDA)
ADAMW = {"default": {}, "fused": {"fused": True}, "foreach": {"foreach": True}, "loop": {"foreach": False}}
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

PROTOCOL = "@bench "  # prefix of the lines a child sends back (libraries may print too)
REPO_ROOT = Path(__file__).resolve().parents[1]


def reply(line: str) -> None:
    """Child -> parent: one protocol line."""
    print(PROTOCOL + line, flush=True)


def current_rss_bytes() -> int:
    """Resident set size of this process now (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_memory_bytes(device, rss_before: int) -> int:
    """CUDA: max allocated since the last reset; CPU: peak RSS growth over `rss_before` (see module doc)."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before


def serve_steps(step: Callable[[], None], sync: Callable[[], None]) -> None:
    """Child loop: answer each `step` line with 'wall_s cpu_s' of one `step()`; return on `finish`."""
    reply("ready")
    for command in sys.stdin:
        if command.strip() != "step":
            return
        sync()
        start, cpu_start = time.perf_counter(), time.process_time()
        step()
        sync()
        reply(f"{time.perf_counter() - start} {time.process_time() - cpu_start}")


class Child:
    """One model in its own process (`script ARGV --only NAME`), driven line by line by the parent."""

    def __init__(self, script: str, name: str, argv: Sequence[str]) -> None:
        self.name = name
        self.stderr = tempfile.TemporaryFile(mode="w+")
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        cmd = [sys.executable, script, *argv, "--only", name]
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True, env=env
        )

    def wait_ready(self) -> Child:
        """Block until the child has built its model (it may have been started alongside others)."""
        self.read()  # "ready"
        return self

    def read(self) -> str:
        for line in self.proc.stdout:
            if line.startswith(PROTOCOL):
                return line[len(PROTOCOL) :].strip()
        self.stderr.seek(0)
        sys.exit(f"the {self.name} benchmark process failed:\n{self.stderr.read()[-4000:]}")

    def step(self) -> tuple[float, float]:
        """One training step; returns (wall seconds, CPU seconds of the child process)."""
        self.proc.stdin.write("step\n")
        self.proc.stdin.flush()
        wall, cpu = self.read().split()
        return float(wall), float(cpu)

    def finish(self) -> dict:
        """End the child; returns the JSON object of its last line."""
        self.proc.stdin.write("finish\n")
        self.proc.stdin.flush()
        result = json.loads(self.read())
        self.proc.wait()
        return result


def run_children(
    script: str,
    names: Sequence[str],
    argv: Sequence[str],
    warmup: int,
    steps: int,
    batch_size: int,
    interleave: bool,
) -> dict[str, dict]:
    """Time `warmup + steps` steps per child; returns each child's `finish` dict plus timing statistics.

    interleave=True alternates the children step by step, reversing the order every step (ABBA...), so
    neither always runs right after the other; otherwise each child runs all its steps in turn.
    """
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    results: dict[str, dict] = {}
    total = warmup + steps
    if interleave:
        started = {name: Child(script, name, argv) for name in names}  # their start-ups overlap
        children = {name: child.wait_ready() for name, child in started.items()}
        for i in range(total):
            for name in names if i % 2 == 0 else names[::-1]:
                times[name].append(children[name].step())
        results = {name: child.finish() for name, child in children.items()}
    else:
        for name in names:
            child = Child(script, name, argv).wait_ready()
            times[name] = [child.step() for _ in range(total)]
            results[name] = child.finish()
    for name, result in results.items():
        timed = times[name][warmup:]
        result["step_s"] = statistics.median(wall for wall, _ in timed)
        result["min_step_s"] = min(wall for wall, _ in timed)
        result["cpu_s"] = statistics.median(cpu for _, cpu in timed)
        result["images_per_s"] = batch_size / result["step_s"]
    return results


def add_switch_arguments(parser) -> None:
    """--compile, --compile-mode, --channels-last, --adamw: the training speed switches, for every model."""
    parser.add_argument("--compile", action="store_true", help="nn.Module.compile every model")
    parser.add_argument("--compile-mode", default="default", choices=COMPILE_MODES)
    parser.add_argument("--channels-last", action="store_true", help="every model and its inputs in NHWC")
    parser.add_argument("--adamw", default="default", choices=sorted(ADAMW), help="AdamW implementation")
    parser.add_argument("--profile", action="store_true", help="print each model's top operators")


def apply_switches(model, args) -> None:
    """The switches on one model, in place: what `model.compile` / `model.channels_last` do in training."""
    from ldm.training.speed import prepare_for_speed

    prepare_for_speed(
        model, compile=args.compile, compile_mode=args.compile_mode, channels_last=args.channels_last
    )


def describe_switches(args) -> str:
    compiled = f"compiled ({args.compile_mode})" if args.compile else "eager"
    layout = "channels_last" if args.channels_last else "NCHW"
    return f"{compiled}, {layout}, AdamW {args.adamw}"


def write_profile(step: Callable[[], None], sync: Callable[[], None], cuda: bool, path: Path) -> None:
    """Two profiled steps; the operators with the most self time, as a table in `path`."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(2):
            step()
        sync()
    sort_by = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    path.write_text(prof.key_averages().table(sort_by=sort_by, row_limit=25, max_name_column_width=40))


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one `fn()` as FlopCounterMode counts them: 2 per multiply-add of matmuls, convolutions and
    attention, forward and (when fn calls backward) backward; elementwise ops, norms and bias adds are free.
    E.g. Linear(64, 32) on an (8, 64) input that requires grad: 2*8*64*32 forward, 3x that with backward."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())
