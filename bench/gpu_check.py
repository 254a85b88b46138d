"""One-shot GPU check: SD 1.x training, LoRA, fine-tune, sampling, DDP/FSDP and autoencoder speed in one call.

    bash bench/gpu_check.sh                # finds (or makes) a venv with a CUDA torch, then runs this file
    python bench/gpu_check.py              # < 8 min on one GPU (--budget-s 420 + start-up), bf16
    python bench/gpu_check.py --dry-run    # CPU, tiny sizes, the same code path (~30-60 s on 2 cores)

Writes `gpu_check.json` and `gpu_check.md` (the table it prints) to --out (default outputs/gpu_check/), both
replaced atomically after every section, so a run cut short keeps what it measured. Each section runs in its
own try/except and records status ok | skipped (+ reason) | failed (+ error); one failure loses nothing else.

- unet_train: the SD 1.x UNet (ldm/interop/configs/sd1.yaml) training step at 64x64 latents (512 px),
  context (B, 77, 768), batch 16 halved on CUDA OOM; {eager, compile} x {NCHW, channels_last}.
- lora_train: rank-4 LoRA on every attention projection (ldm.adapters.lora), base frozen, same sizes.
- finetune_train: the whole UNet with gradient checkpointing; 8-bit AdamW (bitsandbytes; skipped with the
  reason where it cannot run) and torch AdamW.
- sampling: DPM-Solver++(2M), 20 steps, 512 px, batch 1 with classifier-free guidance (batch 2 through the
  UNet), our sampler functions; compile off / on.
- ddp_smoke, fsdp_smoke: `train.py trainer=ddp|fsdp trainer.devices=1`, a tiny class_cond run of a few steps
  on the embedded shapes data (built by data/make_dataset.py when absent) with a random tiny autoencoder.
- autoencoder: SD's KL-f8 autoencoder, encode and decode throughput at 512 px.

A training step is our DiffusionLoss (eps, SD's schedule): forward + backward + optimizer step, under bf16
autocast. Per variant: warm-up steps (the first one compiles: `first_step_s`), then synchronised timed steps
until the step cap or the variant's time share; the median is reported. FLOPs per step are counted once per
variant on the eager module by torch.utils.flop_counter.FlopCounterMode: matmuls, convolutions and, on CUDA,
attention (torch counts no CPU attention kernel). TFLOP/s = FLOPs / step time; MFU = TFLOP/s / the device's
dense bf16 peak (PEAK_BF16_TFLOPS or --peak-tflops). Peak memory: torch.cuda.max_memory_allocated over the
variant (null on CPU).

Time: --budget-s (default 420) is shared between sections by weight, cheap ones first; time a section leaves
goes to the later ones. A section stops measuring when its share is spent; one still running when the whole
budget is spent (a slow compile) is stopped GRACE_S later. --dry-run: UNet model_channels 32, 8x8 latents,
batch 2, one timed step, 3 sampling steps, compile with backend "eager" (Dynamo traces, generates nothing),
float32 on CPU, DDP as trainer=ddp_cpu (gloo); FSDP is skipped on CPU ("needs CUDA").

This file: the command line, the budget, the report. The sections are in gpu_check_sections.py, the measuring
kit (Sizes, Check, timing, batch fitting, rates) in gpu_check_util.py, count_flops in common.py.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling modules below and bench/common.py
import torch  # noqa: E402
from common import count_flops as count_flops  # noqa: E402  (`X as X`: re-exported for the tests)
from gpu_check_sections import SECTIONS  # noqa: E402
from gpu_check_util import (  # noqa: E402
    DRY,
    FULL,
    GRACE_S,
    REPO,
    Check,
    Skipped,
    alarm,
    free_memory,
    peak_for,
    traceback_tail,
)
from gpu_check_util import achieved_tflops as achieved_tflops  # noqa: E402
from gpu_check_util import fit_batch as fit_batch  # noqa: E402
from gpu_check_util import mfu as mfu  # noqa: E402

from ldm.errors import UserError  # noqa: E402

# Sections in run order (cheap first) with their budget weights; REPORT_ORDER orders the JSON and the table.
WEIGHTS = {
    "autoencoder": 0.06,
    "lora_train": 0.08,
    "finetune_train": 0.10,
    "ddp_smoke": 0.09,
    "fsdp_smoke": 0.09,
    "unet_train": 0.36,
    "sampling": 0.22,
}
REPORT_ORDER = ("unet_train", "lora_train", "finetune_train", "sampling", "ddp_smoke", "fsdp_smoke")
REPORT_ORDER += ("autoencoder",)


# ---- running, recording, reporting -----------------------------------------------------------------------


class Budget:
    """The run's seconds, shared between sections by weight; what one leaves goes to the later ones."""

    def __init__(self, total_s: float, weights: dict[str, float]) -> None:
        self.deadline = time.perf_counter() + total_s
        self.weights = dict(weights)  # of the sections not started yet

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def share(self, name: str) -> float:
        """Seconds for section `name`, started now: its weight's part of what is left."""
        total = sum(self.weights.values())
        return max(self.left(), 0.0) * self.weights.pop(name) / total


def section_status(result: dict) -> dict:
    """A section's status from its variants: failed if any failed, else ok if any ran, else skipped."""
    variants = result.get("variants")
    if "status" in result or not variants:
        return {"status": "ok", **result}
    failed = {k: v["error"] for k, v in variants.items() if v["status"] == "failed"}
    if failed:
        return {"status": "failed", "error": "; ".join(f"{k}: {e}" for k, e in failed.items()), **result}
    if any(v["status"] == "ok" for v in variants.values()):
        return {"status": "ok", **result}
    reason = "; ".join(f"{k}: {v['reason']}" for k, v in variants.items())
    return {"status": "skipped", "reason": reason, **result}


def run_section(c: Check, name: str, budget: Budget) -> dict:
    """One section in its time share; never raises: its figures, or why it was skipped or failed."""
    share = budget.share(name)
    if budget.left() < 1.0:
        return dict(status="skipped", reason="the time budget was spent before this section", share_s=share)
    start = time.perf_counter()
    try:
        with alarm(budget.left() + GRACE_S):
            result = section_status(SECTIONS[name](c, share))
    except Skipped as e:
        result = dict(status="skipped", reason=str(e))
    except Exception as e:  # SectionTimeout included: the other sections' figures stay
        result = dict(status="failed", error=f"{type(e).__name__}: {e}", traceback=traceback_tail())
    free_memory()
    return {**result, "share_s": share, "seconds": time.perf_counter() - start}


def environment(c: Check) -> dict:
    """The device, software and settings of this run (the report's `meta`)."""
    name = torch.cuda.get_device_name(c.device) if c.cuda else "cpu"
    props = torch.cuda.get_device_properties(c.device) if c.cuda else None
    try:
        git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True)
        commit = git.stdout.decode().strip() or None
    except OSError:  # no git on the machine
        commit = None
    return dict(
        device=str(c.device),
        device_name=name,
        torch=torch.__version__,
        cuda=torch.version.cuda,
        capability=f"{props.major}.{props.minor}" if props else None,
        device_memory_gib=props.total_memory / 2**30 if props else None,
        dry_run=c.args.dry_run,
        dtype=str(c.dtype).removeprefix("torch."),
        peak_tflops=c.peak,
        peak_source=peak_for(name, c.args.peak_tflops)[1] if c.cuda or c.peak else "cpu: no peak",
        compile_backend=c.args.compile_backend,
        compile_mode=c.args.compile_mode,
        budget_s=c.args.budget_s,
        commit=commit,
        started=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    )


def table(report: dict) -> str:
    """The report as a markdown table: one row per section variant."""
    m = report["meta"]
    lines = [
        f"GPU check: {m['device_name']} ({m['device']}), torch {m['torch']}, {m['dtype']}, peak "
        f"{m['peak_tflops']} TFLOP/s ({m['peak_source']}), dry run {m['dry_run']}, {m.get('wall_s', 0):.0f} s"
        + ("" if m.get("finished") else " (running)"),
        "",
        "| section | variant | status | batch | throughput | ms/step | TFLOP/s | MFU | peak GiB | note |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    num = lambda v, spec: "" if v is None else format(v, spec)  # noqa: E731
    for name, section in report["sections"].items():
        for variant, r in (section.get("variants") or {"": section}).items():
            if r.get("images_per_s"):
                speed, step_s = f"{r['images_per_s']:.2f} img/s", r["step_s"]
            elif r.get("it_per_s"):
                speed, step_s = f"{r['it_per_s']:.2f} it/s", 1 / r["it_per_s"]
            else:
                speed, step_s = "", None
            note = (r.get("reason") or r.get("error") or "").strip().replace("|", "/")
            note = note.splitlines()[-1][:160] if note else ""
            lines.append(
                f"| {name} | {variant} | {r.get('status', section['status'])} | {r.get('batch', '')} | "
                f"{speed} | {num(step_s and step_s * 1e3, '.1f')} | {num(r.get('tflops'), '.3g')} | "
                f"{num(r.get('mfu'), '.1%')} | {num(r.get('peak_mem_gib'), '.2f')} | {note} |"
            )
    return "\n".join(lines) + "\n"


def write(report: dict, out: Path) -> None:
    """gpu_check.json and gpu_check.md under `out`, each replaced atomically."""
    from ldm.interop.checkpoint import atomic_path

    for filename, text in (("gpu_check.json", json.dumps(report, indent=2)), ("gpu_check.md", table(report))):
        with atomic_path(out / filename) as tmp:
            tmp.write_text(text)


def make_check(args: argparse.Namespace) -> Check:
    """The device, sizes, peak and dtype of this run; UserError for a full run without CUDA."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(
            f"--device {args.device}: this torch ({torch.__version__}) sees no CUDA device; run "
            "`bash bench/gpu_check.sh` (it looks for a CUDA torch) or add --dry-run for the CPU check."
        )
    if device.type != "cuda" and not args.dry_run:
        raise UserError(
            "no CUDA device: the full check needs a GPU (`bash bench/gpu_check.sh` says how to get a CUDA "
            "torch); `python bench/gpu_check.py --dry-run` checks the same code on the CPU."
        )
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
        peak = peak_for(torch.cuda.get_device_name(device), args.peak_tflops)[0]
    else:
        peak = args.peak_tflops
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return Check(args, DRY if args.dry_run else FULL, device, peak, dtype)


def run(args: argparse.Namespace) -> dict:
    """The whole check: the selected sections in WEIGHTS' order, the report rewritten after each."""
    c = make_check(args)
    selected = [s for s in WEIGHTS if s in args.sections]
    budget = Budget(args.budget_s, {s: WEIGHTS[s] for s in selected})
    report: dict[str, Any] = {"meta": {**environment(c), "finished": False}, "sections": {}}
    results: dict[str, dict] = {}
    start = time.perf_counter()
    for name in selected:
        r = results[name] = run_section(c, name, budget)
        why = f": {(r.get('reason') or r.get('error') or '')[:300]}" if r["status"] != "ok" else ""
        print(f"[gpu_check] {name} {r['status']} ({r['seconds']:.0f}/{r['share_s']:.0f} s){why}", flush=True)
        report["sections"] = {s: results[s] for s in REPORT_ORDER if s in results}
        report["meta"]["wall_s"] = time.perf_counter() - start
        write(report, Path(args.out))
    report["meta"]["finished"] = True
    write(report, Path(args.out))
    print(table(report), flush=True)
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true", help="tiny sizes, same code path (CPU unless --device)")
    p.add_argument("--out", default=str(REPO / "outputs" / "gpu_check"), help="for gpu_check.json and .md")
    p.add_argument("--budget-s", type=float, default=420.0, help="seconds for the sections (default 7 min)")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: by name)")
    p.add_argument("--device", default=None, help="cuda[:N] or cpu (default: cuda when available)")
    p.add_argument("--sections", default=",".join(REPORT_ORDER), help="a comma-separated subset to run")
    p.add_argument("--compile-backend", default=None, help="torch.compile backend (inductor; dry run: eager)")
    p.add_argument("--compile-mode", default=None, help="inductor mode: default, max-autotune, ...")
    p.add_argument("--data", default=None, help="shapes shards folder for the smoke runs (built if absent)")
    args = p.parse_args(argv)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in args.sections if s not in SECTIONS]
    if unknown:
        p.error(f"--sections: unknown {unknown}; choose from {', '.join(REPORT_ORDER)}")
    if args.budget_s <= 0:
        p.error(f"--budget-s {args.budget_s}: give the seconds the check may take, e.g. 420")
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        p.error(f"--peak-tflops {args.peak_tflops}: give the device's dense bf16 peak, e.g. 989")
    args.compile_backend = args.compile_backend or ("eager" if args.dry_run else "inductor")
    return args


def main(argv: list[str] | None = None) -> int:
    """Exit 0 when no section failed, 1 when one did, 2 for a usage mistake."""
    try:
        report = run(parse_args(argv))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 1 if any(s["status"] == "failed" for s in report["sections"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
