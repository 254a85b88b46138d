"""bench/gpu_check.py: its FLOP/MFU helpers against hand counts, and its CPU dry run (through the bash
wrapper, the same code path the GPU run takes) writing every section with real figures."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
PEAK = 0.5  # TFLOP/s given with --peak-tflops, so the dry run computes an MFU on the CPU


@pytest.fixture(scope="module")
def gc():
    sys.path.insert(0, str(BENCH))
    try:
        import gpu_check

        yield gpu_check
    finally:
        sys.path.remove(str(BENCH))


def env(**extra: str) -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", **extra)


# ---- the helpers -------------------------------------------------------------------------------------------


def test_flop_count_matches_hand_count(gc):
    linear = torch.nn.Linear(64, 32)
    x = torch.randn(8, 64, requires_grad=True)
    forward = 2 * 8 * 64 * 32  # one multiply-add per (row, in, out); the bias add is not counted
    assert gc.count_flops(lambda: linear(x)) == forward == 32_768
    # backward: input gradient (8x32 @ 32x64) and weight gradient (32x8 @ 8x64), each as large as forward
    assert gc.count_flops(lambda: linear(x).sum().backward()) == 3 * forward == 98_304

    conv = torch.nn.Conv2d(4, 8, 3, padding=1)
    image = torch.randn(2, 4, 8, 8, requires_grad=True)
    forward = 2 * (2 * 8 * 8 * 8) * (4 * 3 * 3)  # 2 * output elements * (C_in * kh * kw)
    assert gc.count_flops(lambda: conv(image)) == forward == 73_728
    assert gc.count_flops(lambda: conv(image).sum().backward()) == 3 * forward


def test_tflops_mfu_and_peaks(gc):
    assert gc.achieved_tflops(3e12, 0.5) == 6.0
    assert gc.mfu(6.0, 989.0) == pytest.approx(6.0 / 989.0, rel=1e-15)
    assert gc.mfu(6.0, None) is None
    assert gc.peak_for("NVIDIA H100 80GB HBM3") == (989.0, "table: H100")
    assert gc.peak_for("NVIDIA H100 PCIe")[0] == 756.0  # the PCIe card before the SXM substring
    assert gc.peak_for("NVIDIA H200")[0] == gc.peak_for("NVIDIA GH200 480GB")[0] == 989.0
    assert gc.peak_for("NVIDIA L40S")[0] == 362.0 and gc.peak_for("NVIDIA L4")[0] == 121.0
    assert gc.peak_for("NVIDIA A100-SXM4-80GB")[0] == 312.0
    peak, why = gc.peak_for("Some Future GPU")
    assert peak is None and "--peak-tflops" in why
    assert gc.peak_for("NVIDIA H200", override=700.0) == (700.0, "--peak-tflops")


def test_budget_shares_roll_over(gc):
    budget = gc.Budget(100.0, {"a": 1.0, "b": 3.0})
    assert budget.share("a") == pytest.approx(25.0, abs=0.5)  # 1/4 of 100 s
    assert budget.share("b") == pytest.approx(100.0, abs=0.5)  # all that is left (a has not used its share)


def test_fit_batch_halves_on_cuda_oom(gc):
    tried = []

    def run(batch: int) -> dict:
        tried.append(batch)
        if batch > 4:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return {"images_per_s": float(batch)}

    assert gc.fit_batch(run, 16) == {"batch": 4, "images_per_s": 4.0}
    assert tried == [16, 8, 4]
    with pytest.raises(torch.cuda.OutOfMemoryError):
        gc.fit_batch(lambda b: run(8), 2)  # still out of memory at batch 1


def test_section_status_from_variants(gc):
    ok, skipped = {"status": "ok"}, {"status": "skipped", "reason": "needs CUDA"}
    failed = {"status": "failed", "error": "RuntimeError: boom"}
    assert gc.section_status({"variants": {"a": ok, "b": skipped}})["status"] == "ok"
    status = gc.section_status({"variants": {"a": ok, "b": failed}})
    assert status["status"] == "failed" and status["error"] == "b: RuntimeError: boom"
    status = gc.section_status({"variants": {"a": skipped}})
    assert status == {"status": "skipped", "reason": "a: needs CUDA", "variants": {"a": skipped}}


def test_a_failing_or_overrunning_section_costs_only_itself(gc, monkeypatch):
    def boom(c, seconds):
        raise RuntimeError("boom")

    def slow(c, seconds):  # a compile that never ends
        time.sleep(60)

    def fine(c, seconds):
        return {"variants": {"eager": {"status": "ok", "images_per_s": 1.0}}}

    for name, fn in (("boom", boom), ("slow", slow), ("fine", fine), ("late", fine)):
        monkeypatch.setitem(gc.SECTIONS, name, fn)
    monkeypatch.setattr(gc, "GRACE_S", 0.5)
    # budgets made just before use: free_memory's gc.collect can take a second late in a long pytest process
    budget = gc.Budget(30.0, {"boom": 1.0, "fine": 1.0})
    r = gc.run_section(None, "boom", budget)
    assert r["status"] == "failed" and r["error"] == "RuntimeError: boom" and "boom" in r["traceback"]
    assert gc.run_section(None, "fine", budget)["status"] == "ok"
    budget = gc.Budget(1.5, {"slow": 1.0, "late": 1.0})
    r = gc.run_section(None, "slow", budget)  # stopped GRACE_S after the whole budget ran out
    assert r["status"] == "failed" and r["error"].startswith("SectionTimeout") and r["seconds"] < 10
    r = gc.run_section(None, "late", budget)
    assert (r["status"], r["reason"]) == ("skipped", "the time budget was spent before this section")


def test_full_check_without_cuda_names_the_fix(gc, capsys, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert gc.main(["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no CUDA device" in err and "--dry-run" in err and "gpu_check.sh" in err
    assert not (tmp_path / "gpu_check.json").exists()  # refused before any work
    with pytest.raises(SystemExit):
        gc.parse_args(["--sections", "unet_train,nope"])
    assert "choose from unet_train" in capsys.readouterr().err


def test_wrapper_without_a_cuda_torch_says_how_to_get_one(tmp_path):
    bin_dir = tmp_path / "bin"  # a PATH whose python3 has the CPU torch of this venv
    bin_dir.mkdir()
    (bin_dir / "python3").symlink_to(sys.executable)
    for tool in ("dirname", "cat"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    result = subprocess.run(
        ["/bin/bash", str(BENCH / "gpu_check.sh")],
        env=env(PATH=str(bin_dir), VENV=str(tmp_path / "no_venv")),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert "no Python here has a torch that sees a CUDA device" in result.stderr
    assert "make install TORCH=" in result.stderr and "--dry-run" in result.stderr
    assert not (tmp_path / "no_venv").exists()


# ---- the dry run -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """`bash bench/gpu_check.sh --dry-run` once: (exit status, output, report, table, out folder)."""
    out = tmp_path_factory.mktemp("gpu_check")
    cmd = ["/bin/bash", str(BENCH / "gpu_check.sh"), "--dry-run", "--out", str(out)]
    cmd += ["--data", str(out / "shapes"), "--peak-tflops", str(PEAK)]  # data absent: the check builds it
    result = subprocess.run(
        cmd, cwd=REPO, env=env(PYTHON=sys.executable), capture_output=True, text=True, timeout=600
    )
    report = json.loads((out / "gpu_check.json").read_text()) if (out / "gpu_check.json").exists() else {}
    md = (out / "gpu_check.md").read_text() if (out / "gpu_check.md").exists() else ""
    return result.returncode, result.stdout + result.stderr, report, md, out


def test_dry_run_writes_every_section(gc, dry_run):
    code, output, report, md, out = dry_run
    assert code == 0, output[-4000:]
    sections = report["sections"]
    assert list(sections) == list(gc.REPORT_ORDER)
    statuses = {name: s["status"] for name, s in sections.items()}
    assert statuses == {**dict.fromkeys(gc.REPORT_ORDER, "ok"), "fsdp_smoke": "skipped"}
    assert "needs CUDA" in sections["fsdp_smoke"]["reason"]
    eight_bit = sections["finetune_train"]["variants"]["adamw_8bit"]
    assert eight_bit["status"] == "skipped" and "CUDA" in eight_bit["reason"]
    meta = report["meta"]
    assert meta["dry_run"] is True and meta["finished"] is True and meta["dtype"] == "float32"
    assert (meta["peak_tflops"], meta["peak_source"]) == (PEAK, "--peak-tflops")
    assert meta["compile_backend"] == "eager"
    for name, s in sections.items():  # each section ran within the run, inside its share
        assert 0 <= s["seconds"] <= meta["wall_s"] and s["share_s"] > 0, name
    # the table: one row per variant, the section's figures; the data was built where --data pointed
    assert "| unet_train | compile+channels_last | ok | 2 | " in md
    assert "| fsdp_smoke |  | skipped |" in md and md in output
    manifest = json.loads((out / "shapes" / "manifest.json").read_text())
    assert manifest["splits"] == {"train": 64, "val": 16}


def rates_ok(r: dict, flops: float, seconds: float) -> None:
    """TFLOP/s = FLOPs / seconds / 1e12 and MFU = TFLOP/s / peak, as reported."""
    assert seconds > 0 and flops > 0
    assert r["tflops"] == pytest.approx(flops / seconds / 1e12, rel=1e-12)
    assert r["mfu"] == pytest.approx(r["tflops"] / PEAK, rel=1e-12)
    assert r["peak_mem_gib"] is None  # CUDA only


def test_dry_run_training_figures(dry_run):
    sections = dry_run[2]["sections"]
    unet = sections["unet_train"]
    assert unet["params"] == 1_077_572 and unet["latent"] == 8  # model_channels 32, channel_mult [1, 2]
    variants = unet["variants"]
    assert list(variants) == ["eager", "eager+channels_last", "compile", "compile+channels_last"]
    for r in variants.values():
        assert r["status"] == "ok" and r["batch"] == 2 and r["timed_steps"] == 1
        assert r["images_per_s"] == pytest.approx(2 / r["step_s"], rel=1e-12)
        rates_ok(r, r["flops_per_step"], r["step_s"])
        # FlopCounterMode on CPU: convolutions and matmuls, forward + backward (torch does not count the CPU
        # attention kernel); the same for every variant: they differ in speed, not in maths
        assert r["flops_per_step"] == 318_914_560
    assert variants["compile"]["first_step_s"] > variants["compile"]["step_s"]  # Dynamo traced first

    lora = sections["lora_train"]
    # rank 4 on to_q/k/v/out of 7 transformer blocks: 3 at 32 channels, 4 at 64 (middle included);
    # per block r * (8c self-attention + 4c for attn2's q/out + 2 (64 + c) for k/v from the 64-wide context)
    assert lora["lora_layers"] == 7 * 8
    assert lora["trainable_params"] == 3 * 4 * (14 * 32 + 128) + 4 * 4 * (14 * 64 + 128) == 23_296
    r = lora["variants"]["eager"]
    rates_ok(r, r["flops_per_step"], r["step_s"])
    assert r["flops_per_step"] == 212_444_160  # no weight gradients for the frozen base: 2/3 of the full step

    r = sections["finetune_train"]["variants"]["adamw"]
    rates_ok(r, r["flops_per_step"], r["step_s"])
    assert r["flops_per_step"] == 318_914_560  # model FLOPs: the same UNet step as unet_train's
    assert r["flops_with_recompute"] == 398_802_944  # checkpointed blocks run their forward again


def test_dry_run_sampling_smoke_and_autoencoder(dry_run):
    sections = dry_run[2]["sections"]
    sampling = sections["sampling"]
    assert (sampling["sampler"], sampling["steps"], sampling["cfg_scale"]) == ("dpmpp_2m", 3, 7.5)
    for r in sampling["variants"].values():
        assert r["status"] == "ok"
        assert r["unet_calls_per_run"] == 3 and r["unet_batch"] == 2  # one call per step: cond + uncond
        assert r["it_per_s"] == pytest.approx(3 / r["run_s"], rel=1e-12)
        assert r["flops_per_run"] == 3 * 111_034_368  # three UNet forwards at batch 2
        rates_ok(r, r["flops_per_run"], r["run_s"])

    ddp = sections["ddp_smoke"]
    assert (ddp["trainer"], ddp["returncode"], ddp["steps"]) == ("ddp_cpu", 0, 3)
    assert ddp["it_per_s"] > 0 and ddp["wall_s"] > 0
    assert "trainer=ddp_cpu" in ddp["overrides"] and "trainer.devices=1" in ddp["overrides"]

    ae = sections["autoencoder"]
    assert (ae["params"], ae["resolution"]) == (3_884_295, 64)  # SD's kl-f8 layout at ch 32, 1 block/level
    flops = {"encode": 1_144_799_232, "decode": 3_874_099_200}
    for name, r in ae["variants"].items():
        assert r["status"] == "ok" and r["batch"] == 2
        assert r["images_per_s"] == pytest.approx(2 / r["step_s"], rel=1e-12)
        assert r["flops_per_step"] == flops[name]
        rates_ok(r, r["flops_per_step"], r["step_s"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_dry_run_on_cuda(tmp_path):
    """The tiny sizes on the GPU with inductor: every section runs (8-bit AdamW only with bitsandbytes)."""
    cmd = [sys.executable, str(BENCH / "gpu_check.py"), "--dry-run", "--device", "cuda"]
    cmd += ["--compile-backend", "inductor", "--out", str(tmp_path), "--data", str(tmp_path / "shapes")]
    result = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert {s["status"] for s in report["sections"].values()} == {"ok"}
    assert report["sections"]["unet_train"]["variants"]["eager"]["peak_mem_gib"] > 0
