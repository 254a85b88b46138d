"""bench/bench_lora.py at its smallest (`--size tiny --steps 2`): the three child processes run, the LoRA
sides wrap the same layers (exact parameter counts, derived here independently), and their outputs agree."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
RANK = 4
CONTEXT = 768  # the benchmark UNet's cross-attention width (CLIP ViT-L/14)


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH))  # bench_lora imports its siblings bench_finetune and common
    try:
        import bench_lora

        yield bench_lora
    finally:
        sys.path.remove(str(BENCH))


def sd_v1_attention_lora_params(width: int, rank: int) -> tuple[int, int]:
    """(LoRA parameters, wrapped layers) of rank-`rank` adapters on to_q/k/v/out.0 of every transformer block
    of an SD-v1-layout UNet at `width`: channel_mult (1,2,4,4), attention at the first three levels, 2 blocks
    down + 3 up per level, 1 in the middle. A Linear in -> out gets rank * (in + out)."""
    blocks = {width: 5, 2 * width: 5, 4 * width: 5 + 1}  # {channels: transformer blocks}
    per_block = lambda c: 4 * 2 * c + 2 * 2 * c + 2 * (CONTEXT + c)  # noqa: E731  attn1 c->c x4; attn2 q,out c->c; k,v 768->c
    params = sum(n * rank * per_block(c) for c, n in blocks.items())
    return params, 8 * sum(blocks.values())


def test_tiny_run_counts_and_parity(bench):
    args = bench.parse_args(
        ["--size", "tiny", "--resolution", "64", "--batch-size", "1", "--steps", "2", "--warmup", "1"]
        + ["--threads", "1"]  # one thread per child: no OpenMP spinning on a shared machine
    )
    out = bench.run(args)
    res, diffs = out["results"], out["diffs"]

    lora_params, layers = sd_v1_attention_lora_params(32, RANK)
    assert (lora_params, layers) == (168_192, 128)
    for name in ("ours-lora", "diffusers-lora"):
        assert res[name]["trainable"] == res[name]["optimizer_params"] == lora_params
        assert res[name]["layers"] == layers
        assert res[name]["ema"] is False
    assert out["layers"] == layers

    unet_params = sum(p.numel() for p in bench.ft.build_our_unet("tiny").parameters())
    assert unet_params == 10_362_468
    assert res["ours-full"]["trainable"] == unet_params  # the whole UNet trains; text encoder and VAE frozen
    assert res["ours-full"]["ema_updates"] == 3  # warmup + steps: one EMA update per optimizer step

    # parity: measured max |ours - diffusers| = 0.0 on CPU (same kernels in the same order); the drawn
    # adapters move the output by RMS 0.025 against an output RMS of 0.20
    assert diffs["unet"] <= 1e-4 and diffs["unet_base"] <= 1e-4
    assert diffs["lora_effect_rms"] == pytest.approx(0.0253, abs=0.002)
    assert diffs["unet_rms"] == pytest.approx(0.1998, abs=0.002)

    for r in res.values():
        assert r["step_s"] > 0 and r["peak_mem"] > 0
    # LoRA holds no gradients, AdamW state or EMA for the 10.4M UNet weights (measured 148 vs 302 MiB)
    # (peak memory at this tiny size is allocator noise: the README's figures come from --size small)


def test_bad_options_name_the_fix(bench, capsys):
    for argv, text in (
        (["--variants", "ours-lora,peft"], "choose from"),
        (["--resolution", "100"], "multiple of 8"),
        (["--rank", "0"], "must be >= 1"),
    ):
        with pytest.raises(SystemExit):
            bench.parse_args(argv)
        assert text in capsys.readouterr().err
