"""Training-step benchmark: ldm's UNetModel against diffusers' UNet2DConditionModel of the same size.

One step = forward + MSE loss + backward + AdamW step, identical inputs for both models. Each model lives
in its own subprocess, so its peak memory is its own. On CPU the parent alternates the two processes step
by step (the cores are often shared, and both should see the same load); on CUDA it runs one after the
other (a dedicated device, and two resident SD-size models might not fit). The median step is reported.

- CUDA: `torch.cuda.max_memory_allocated()` over the warmup and timed steps (weights, gradients, AdamW
  state and activations; no allocator cache).
- CPU: growth of the process's peak resident set (`getrusage(RUSAGE_SELF).ru_maxrss`) over its RSS
  after imports and before the model is built; it also counts allocator slack, so compare the two
  numbers with each other rather than with a byte count of tensors.

FLOPs per step come from `torch.utils.flop_counter.FlopCounterMode` (matmuls, convolutions, attention;
forward and backward); with `--peak-tflops` the model FLOPs utilisation is FLOPs / step time / peak.

Speed switches, applied to both models alike (ours through `ldm.training.speed.prepare_for_speed`, as
`model.compile` / `model.channels_last` do in training; diffusers' through the same torch calls):
`--compile [--compile-mode M]` (`nn.Module.compile`: the first warmup step compiles), `--channels-last`
(NHWC weights and inputs), `--adamw fused|foreach|loop` (torch AdamW's implementations; `default` is
torch's own choice, the per-tensor loop on CPU; our training uses fused wherever torch has it).
`--profile` prints each model's top operators (torch.profiler) after timing.

    python bench/bench_unet.py                                  # small model, CPU, ~1-2 min on 2 cores
    python bench/bench_unet.py --device cuda --dtype bf16 --size sd --batch-size 8 --resolution 512 \
        --peak-tflops 989                                      # H100 SXM dense bf16
    python bench/bench_unet.py --adamw fused --channels-last    # the CPU switches, both models
"""

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    ADAMW,
    add_switch_arguments,
    apply_switches,
    current_rss_bytes,
    describe_switches,
    peak_memory_bytes,
    reply,
    run_children,
    serve_steps,
    write_profile,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # diffusers is built from a config; nothing is downloaded

# Model sizes: the same architecture in both libraries. `sd` is Stable Diffusion v1 (859,520,964 params).
SIZES = {
    "tiny": dict(model_channels=32, channel_mult=(1, 1, 2, 2), num_heads=4, context_dim=64),
    "small": dict(model_channels=64, channel_mult=(1, 2, 4, 4), num_heads=4, context_dim=256),
    "sd": dict(model_channels=320, channel_mult=(1, 2, 4, 4), num_heads=8, context_dim=768),
}
COMMON = dict(in_channels=4, out_channels=4, num_res_blocks=2, attention_resolutions=(4, 2, 1))
CONTEXT_LEN = 77  # CLIP text tokens, as in SD
LATENT_FACTOR = 8  # the SD autoencoder downsamples images 8x


def build_ours(size: str):
    from ldm.modules.unet import UNetModel

    return UNetModel(**COMMON, **SIZES[size], transformer_depth=1, legacy=False)


def build_diffusers(size: str, latent: int):
    from diffusers import UNet2DConditionModel

    cfg = {**COMMON, **SIZES[size]}
    attn_levels = [2**level in cfg["attention_resolutions"] for level in range(len(cfg["channel_mult"]))]
    return UNet2DConditionModel(
        sample_size=latent,
        in_channels=cfg["in_channels"],
        out_channels=cfg["out_channels"],
        block_out_channels=[cfg["model_channels"] * m for m in cfg["channel_mult"]],
        layers_per_block=cfg["num_res_blocks"],
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn_levels],
        up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn_levels)],
        attention_head_dim=cfg["num_heads"],  # diffusers' historical name for the number of heads
        cross_attention_dim=cfg["context_dim"],
        norm_num_groups=32,
        flip_sin_to_cos=True,  # [cos, sin] order and zero frequency shift, as CompVis
        freq_shift=0,
    )


def serve(args: argparse.Namespace) -> None:
    """Child process: build one model, then answer `step` (time one training step) and `finish` lines."""
    import diffusers  # noqa: F401  (both children pay the same imports before the memory baseline)
    import torch
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    import ldm.modules.unet  # noqa: F401

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
    rss_before = current_rss_bytes()
    torch.manual_seed(0)
    latent = args.resolution // LATENT_FACTOR
    if args.only == "ours":
        model = build_ours(args.size)
        call = lambda x, t, c: model(x, t, c)
    else:
        model = build_diffusers(args.size, latent)
        call = lambda x, t, c: model(x, t, encoder_hidden_states=c).sample
    model.to(device).train()
    apply_switches(model, args)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, **ADAMW[args.adamw])

    gen = torch.Generator().manual_seed(1)  # identical inputs for both models
    b, ctx_dim = args.batch_size, SIZES[args.size]["context_dim"]
    x = torch.randn(b, 4, latent, latent, generator=gen).to(device)
    t = torch.randint(0, 1000, (b,), generator=gen).to(device)
    context = torch.randn(b, CONTEXT_LEN, ctx_dim, generator=gen).to(device)
    target = torch.randn(b, 4, latent, latent, generator=gen).to(device)
    if args.channels_last:  # ours converts its inputs in a pre-hook; diffusers' get them converted here
        x, target = (v.contiguous(memory_format=torch.channels_last) for v in (x, target))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")

    def forward_backward() -> None:
        with autocast:
            loss = F.mse_loss(call(x, t, context).float(), target)
        loss.backward()

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    if cuda:
        torch.cuda.reset_peak_memory_stats(device)

    def step() -> None:
        forward_backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    serve_steps(step, sync)
    peak_mem = peak_memory_bytes(device, rss_before)
    with FlopCounterMode(display=False) as counter:  # after timing, so it cannot disturb it
        forward_backward()
    if args.profile:
        write_profile(step, sync, cuda, Path(args.profile_dir) / f"{args.only}.profile")
    params = sum(p.numel() for p in model.parameters())
    reply(json.dumps(dict(params=params, peak_mem=peak_mem, flops=counter.get_total_flops(),
                          threads=torch.get_num_threads())))  # fmt: skip


def run(args: argparse.Namespace, argv: list[str]) -> dict[str, dict]:
    """Time both models: interleaved step by step on CPU (shared cores), one after the other on CUDA."""
    return run_children(
        __file__, ("ours", "diffusers"), argv, args.warmup, args.steps, args.batch_size,
        interleave=not args.device.startswith("cuda"),
    )  # fmt: skip


def report(args: argparse.Namespace, results: dict[str, dict]) -> None:
    """Print one row per model and the ratios ours / diffusers."""
    ours, theirs = results["ours"], results["diffusers"]
    cuda = args.device.startswith("cuda")
    latent = args.resolution // LATENT_FACTOR
    print(
        f"UNet training step (fwd + MSE + bwd + AdamW): size={args.size}, device={args.device}, "
        f"dtype={args.dtype}, batch={args.batch_size}, {args.resolution}px images = {latent}x{latent} "
        f"latents, context {CONTEXT_LEN}x{SIZES[args.size]['context_dim']}, median of {args.steps} "
        f"steps after {args.warmup} warmup, torch threads={ours['threads']}, {describe_switches(args)}"
    )
    mem_kind = "CUDA max alloc MiB" if cuda else "peak RSS growth MiB"
    print(
        f"{'model':<10} {'params':>13} {'img/s':>8} {'step ms':>9} {'min ms':>9} {'CPU s/step':>10} "
        f"{mem_kind:>20} {'GFLOP/step':>10} {'GFLOP/s':>9}" + (f" {'MFU':>6}" if args.peak_tflops else "")
    )
    for name, r in results.items():
        gflops = r["flops"] / r["step_s"] / 1e9
        print(
            f"{name:<10} {r['params']:>13,} {r['images_per_s']:>8.3f} {r['step_s'] * 1e3:>9.1f} "
            f"{r['min_step_s'] * 1e3:>9.1f} {r['cpu_s']:>10.2f} {r['peak_mem'] / 2**20:>20.1f} "
            f"{r['flops'] / 1e9:>10.1f} {gflops:>9.1f}"
            + (f" {gflops / 1e3 / args.peak_tflops:>6.1%}" if args.peak_tflops else "")
        )
    # On shared cores the fastest step and the CPU seconds (all threads of the child) are steadier numbers.
    print(
        f"ratio ours/diffusers: throughput {ours['images_per_s'] / theirs['images_per_s']:.3f}x "
        f"(fastest step {theirs['min_step_s'] / ours['min_step_s']:.3f}x), "
        f"CPU time per step {ours['cpu_s'] / theirs['cpu_s']:.3f}x, "
        f"peak memory {ours['peak_mem'] / theirs['peak_mem']:.3f}x"
    )
    # The same architecture, so the counts must agree (they are identical for every size here).
    assert abs(ours["params"] - theirs["params"]) <= 1e-3 * theirs["params"], "parameter counts differ"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bf16"], help="bf16: autocast")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--resolution", type=int, default=256, help="image side in pixels; latent = /8")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (the median is reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--size", default="small", choices=sorted(SIZES))
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak for the MFU estimate")
    add_switch_arguments(parser)
    parser.add_argument("--only", choices=["ours", "diffusers"], help=argparse.SUPPRESS)  # child process
    parser.add_argument("--profile-dir", help=argparse.SUPPRESS)  # child process: where profiles go
    args = parser.parse_args()
    if args.resolution % LATENT_FACTOR:
        parser.error(f"--resolution {args.resolution} must be a multiple of {LATENT_FACTOR}")

    if args.only:
        serve(args)
        return

    with tempfile.TemporaryDirectory(prefix="bench_unet_") as tmp:
        results = run(args, [*sys.argv[1:], "--profile-dir", tmp])
        report(args, results)
        for name in results:
            path = Path(tmp) / f"{name}.profile"
            if path.is_file():
                print(f"\n--- profile: {name}, 2 steps ---\n{path.read_text()}")


if __name__ == "__main__":
    main()
