"""Training-step benchmark: ldm's AutoencoderKL against diffusers' AutoencoderKL of the same size.

One step = encode -> posterior sample -> decode, loss = L1 reconstruction + KL_WEIGHT * KL, backward, AdamW
step: the same simple loss for both, so that the autoencoders are timed, not LPIPS or a GAN. Both models
start from identical weights (ours, converted to diffusers' names by diffusers' own
`convert_ldm_vae_checkpoint`) and get identical inputs; before timing, each reconstructs one image with
the posterior mode in float32 and the two results must agree (`torch.testing.assert_close`).

Each model runs in its own process (`bench/common.py`: interleaved step by step on CPU, one after the
other on CUDA; CUDA max allocated or CPU peak-RSS growth as memory, the latter including one transient
copy of the weights from loading them, in both). `--full-loss` adds, for information,
our model with the full `AutoencoderLoss` (LPIPS with random VGG weights, PatchGAN with the adaptive
weight, and the discriminator's own step), as one training iteration with the GAN active.
`--profile` prints each model's top operators (torch.profiler) after timing.
The speed switches of `bench/common.py` apply to both models alike: `--compile [--compile-mode M]`,
`--channels-last` (NHWC weights and images), `--adamw fused|foreach|loop` (`default`: torch's choice, the
per-tensor loop on CPU; stage-1 training uses fused wherever torch has it).

    python bench/bench_autoencoder.py                          # demo size, CPU, ~1-2 min on 2 cores
    python bench/bench_autoencoder.py --device cuda --dtype bf16 --size sd --batch-size 4 --resolution 256
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from common import (
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

# The same architecture in both libraries (CompVis ddconfig keys); none has attention outside the mid block,
# which is all diffusers' AutoencoderKL can express.
SIZES = {
    "tiny": dict(ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, norm_groups=8),  # per-module overhead regime
    "demo": dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, norm_groups=8),  # conf/model/autoencoder_kl.yaml
    "sd": dict(ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, norm_groups=32),  # SD v1 kl-f8 (83.65M)
}
COMMON = dict(double_z=True, z_channels=4, in_channels=3, out_ch=3, attn_resolutions=[], dropout=0.0)
EMBED_DIM = 4  # latent channels; diffusers ties them to z_channels
KL_WEIGHT = 1e-6  # SD kl-f8's weight; any value times the same work
NAMES = ("ours", "diffusers")
FULL_LOSS = "ours+AutoencoderLoss"


def ddconfig(size: str, resolution: int) -> dict:
    return {**COMMON, **SIZES[size], "resolution": resolution}


def build_ours(size: str, resolution: int):
    from ldm.models.autoencoder import AutoencoderKL

    return AutoencoderKL(ddconfig(size, resolution), EMBED_DIM)


def build_diffusers(size: str, resolution: int):
    from diffusers import AutoencoderKL

    cfg = SIZES[size]
    levels = len(cfg["ch_mult"])
    return AutoencoderKL(
        in_channels=COMMON["in_channels"],
        out_channels=COMMON["out_ch"],
        down_block_types=["DownEncoderBlock2D"] * levels,
        up_block_types=["UpDecoderBlock2D"] * levels,  # num_res_blocks + 1 blocks per level, as CompVis
        block_out_channels=[cfg["ch"] * m for m in cfg["ch_mult"]],
        layers_per_block=cfg["num_res_blocks"],
        latent_channels=EMBED_DIM,
        norm_num_groups=cfg["norm_groups"],  # ours takes gcd(groups, width): the same for these widths
        sample_size=resolution,
        mid_block_add_attention=True,  # CompVis always has the mid-block attention
    )


def forward_fn(name: str, model):
    """x -> (reconstruction, posterior) through each library's own API, posterior sampled."""
    if name == "diffusers":

        def forward(x):
            posterior = model.encode(x).latent_dist
            return model.decode(posterior.sample()).sample, posterior

        return forward
    return lambda x: model(x, sample_posterior=True)


def simple_loss(x, reconstruction, posterior):
    """Mean L1 reconstruction + KL_WEIGHT * KL(q(z|x) || N(0, I)) per image (Kingma & Welling 2014 eq. 7)."""
    import torch.nn.functional as F

    return F.l1_loss(reconstruction.float(), x) + KL_WEIGHT * posterior.kl().float().mean()


def full_loss_step(model, x, autocast):
    """One CompVis-style iteration, GAN active: generator loss + step, then discriminator loss + step."""
    import torch

    from ldm.models.losses import AutoencoderLoss

    loss_fn = AutoencoderLoss(disc_start=0).to(x.device)  # LPIPS with random VGG (no weights offline)
    disc = loss_fn.discriminator
    opt_g = torch.optim.Adam([*model.parameters(), loss_fn.logvar], lr=1e-4, betas=(0.5, 0.9))
    opt_d = torch.optim.Adam(disc.parameters(), lr=1e-4, betas=(0.5, 0.9))
    last_layer = model.get_last_layer()

    def forward_backward(update: bool = True) -> None:
        with autocast:
            reconstruction, posterior = model(x)
            disc.requires_grad_(False)  # as Lightning's toggle_model: no D gradients from the G loss
            g_loss, _ = loss_fn(x, reconstruction, 0, 0, posterior=posterior, last_layer=last_layer)
        g_loss.backward()
        disc.requires_grad_(True)
        if update:
            opt_g.step()
            opt_g.zero_grad(set_to_none=True)
        with autocast:
            d_loss, _ = loss_fn(x, reconstruction.detach(), 1, 0)
        d_loss.backward()
        if update:
            opt_d.step()
            opt_d.zero_grad(set_to_none=True)

    return lambda: forward_backward(update=False), forward_backward


def serve(args: argparse.Namespace) -> None:
    """Child process: build one model, check its output, then time steps on request."""
    # Every child pays the same imports before the memory baseline (diffusers imports lazily)
    import diffusers.models.autoencoders.autoencoder_kl  # noqa: F401
    import torch
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    from safetensors.torch import load_file, save_file
    from torch.utils.flop_counter import FlopCounterMode

    import ldm.models.autoencoder  # noqa: F401
    import ldm.models.losses  # noqa: F401

    workdir = Path(args.workdir)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
    rss_before = current_rss_bytes()
    state = load_file(str(workdir / "weights.safetensors"))
    inputs = load_file(str(workdir / "inputs.safetensors"))
    if args.only == "diffusers":
        model = build_diffusers(args.size, args.resolution)
        prefixed = {f"first_stage_model.{k}": v for k, v in state.items()}  # the converter's source layout
        model.load_state_dict(convert_ldm_vae_checkpoint(prefixed, dict(model.config)), strict=True)
    else:
        model = build_ours(args.size, args.resolution)
        model.load_state_dict(state, strict=True)
    del state
    model.to(device).train()
    x = inputs["x"].to(device)
    apply_switches(model, args)  # --compile, --channels-last (NHWC: what cuDNN's bf16 kernels prefer)
    if args.channels_last:  # ours converts its inputs in a pre-hook; diffusers' encode() does not
        x = x.contiguous(memory_format=torch.channels_last)
    forward = forward_fn(args.only, model)

    # Parity: posterior-mode reconstruction in full float32 (no TF32), before any update
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    with torch.no_grad():
        check_x = inputs["check"].to(device)
        if args.only == "diffusers":
            check = model.decode(model.encode(check_x).latent_dist.mode()).sample
        else:
            check = model(check_x, sample_posterior=False)[0]
    save_file({"reconstruction": check.float().cpu().contiguous()}, str(workdir / f"{args.only}.check"))
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32

    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")
    if args.only == FULL_LOSS:
        forward_backward, step = full_loss_step(model, x, autocast)
    else:
        # CompVis betas, no weight decay (AdamW with 0 decay is Adam); training uses this AdamW
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=1e-4, betas=(0.5, 0.9), weight_decay=0.0, **ADAMW[args.adamw]
        )

        def forward_backward() -> None:
            with autocast:
                loss = simple_loss(x, *forward(x))
            loss.backward()

        def step() -> None:
            forward_backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    serve_steps(step, sync)
    peak_mem = peak_memory_bytes(device, rss_before)
    with FlopCounterMode(display=False) as counter:  # after timing, so it cannot disturb it
        forward_backward()
    if args.profile:
        write_profile(step, sync, cuda, workdir / f"{args.only}.profile")
    params = sum(p.numel() for p in model.parameters())
    reply(json.dumps(dict(params=params, peak_mem=peak_mem, flops=counter.get_total_flops(),
                          threads=torch.get_num_threads())))  # fmt: skip


def prepare(args: argparse.Namespace, workdir: Path) -> None:
    """Write the shared initial weights (CompVis names) and inputs that every child loads."""
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = build_ours(args.size, args.resolution)
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, str(workdir / "weights.safetensors")
    )
    gen = torch.Generator().manual_seed(1)
    shape = (args.batch_size, 3, args.resolution, args.resolution)
    inputs = {
        "x": torch.rand(shape, generator=gen) * 2 - 1,  # images in [-1, 1]
        "check": torch.rand((1, *shape[1:]), generator=gen) * 2 - 1,
    }
    save_file(inputs, str(workdir / "inputs.safetensors"))


def check_parity(workdir: Path) -> float:
    """Both models' posterior-mode reconstructions of the check image agree; returns the max difference."""
    import torch
    from safetensors.torch import load_file

    ours, theirs = (load_file(str(workdir / f"{name}.check"))["reconstruction"] for name in NAMES)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    return (ours - theirs).abs().max().item()


def report(args: argparse.Namespace, results: dict[str, dict], max_diff: float, workdir: Path) -> None:
    """Print one row per model and the ratios ours / diffusers."""
    ours, theirs = results["ours"], results["diffusers"]
    cuda = args.device.startswith("cuda")
    f = 2 ** (len(SIZES[args.size]["ch_mult"]) - 1)
    latent = args.resolution // f
    print(
        f"AutoencoderKL training step (encode, sample, decode, L1 + KL, backward, AdamW): size={args.size}, "
        f"device={args.device}, dtype={args.dtype}, {describe_switches(args)}, batch={args.batch_size}, "
        f"{args.resolution}px images -> "
        f"{EMBED_DIM}x{latent}x{latent} latents, median of {args.steps} steps after {args.warmup} warmup, "
        f"torch threads={ours['threads']}, {'interleaved' if not cuda else 'one model after the other'}"
    )
    mem_kind = "CUDA max alloc MiB" if cuda else "peak RSS growth MiB"
    print(
        f"{'model':<21} {'params':>11} {'img/s':>8} {'step ms':>9} {'min ms':>9} {'CPU s/step':>10} "
        f"{mem_kind:>20} {'GFLOP/step':>10} {'GFLOP/s':>8}"
    )
    for name, r in results.items():
        print(
            f"{name:<21} {r['params']:>11,} {r['images_per_s']:>8.2f} {r['step_s'] * 1e3:>9.1f} "
            f"{r['min_step_s'] * 1e3:>9.1f} {r['cpu_s']:>10.3f} {r['peak_mem'] / 2**20:>20.1f} "
            f"{r['flops'] / 1e9:>10.2f} {r['flops'] / r['step_s'] / 1e9:>8.1f}"
        )
    # On shared cores the fastest step and the CPU seconds (all threads of the child) are steadier numbers.
    print(
        f"ratio ours/diffusers: speed {ours['images_per_s'] / theirs['images_per_s']:.3f}x "
        f"(>1 = ours faster; fastest step {theirs['min_step_s'] / ours['min_step_s']:.3f}x, "
        f"CPU time {theirs['cpu_s'] / ours['cpu_s']:.3f}x), "
        f"peak memory {ours['peak_mem'] / theirs['peak_mem']:.3f}x (<1 = ours smaller)"
    )
    print(f"same weights, posterior-mode reconstruction float32: max |ours - diffusers| = {max_diff:.2e}")
    if FULL_LOSS in results:
        full = results[FULL_LOSS]
        print(
            f"info: the full AutoencoderLoss iteration (LPIPS with random VGG, PatchGAN, D step) takes "
            f"{full['step_s'] / ours['step_s']:.2f}x our simple-loss step"
        )
    for name in results:
        path = workdir / f"{name}.profile"
        if path.is_file():
            print(f"\n--- profile: {name}, 2 steps ---\n{path.read_text()}")
    # The same architecture, so the counts must be identical (83,653,863 for `sd`, as SD v1's VAE).
    assert ours["params"] == theirs["params"], "parameter counts differ: the two configs do not match"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bf16"], help="bf16: autocast")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--resolution", type=int, default=128, help="image side in pixels")
    parser.add_argument("--steps", type=int, default=8, help="timed steps (the median is reported)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--size", default="demo", choices=list(SIZES))
    parser.add_argument("--full-loss", action="store_true", help=f"also time {FULL_LOSS} (info only)")
    add_switch_arguments(parser)
    parser.add_argument("--only", help=argparse.SUPPRESS)  # child process: which model
    parser.add_argument("--workdir", help=argparse.SUPPRESS)  # child process: shared weights and inputs
    args = parser.parse_args()
    f = 2 ** (len(SIZES[args.size]["ch_mult"]) - 1)
    if args.resolution % f:
        parser.error(f"--resolution {args.resolution} must be a multiple of {f} for --size {args.size}")

    if args.only:
        serve(args)
        return

    with tempfile.TemporaryDirectory(prefix="bench_autoencoder_") as tmp:
        workdir = Path(tmp)
        prepare(args, workdir)
        names = NAMES + ((FULL_LOSS,) if args.full_loss else ())
        argv = [*sys.argv[1:], "--workdir", tmp]
        interleave = not args.device.startswith("cuda")
        results = run_children(__file__, names, argv, args.warmup, args.steps, args.batch_size, interleave)
        report(args, results, check_parity(workdir), workdir)


if __name__ == "__main__":
    main()
