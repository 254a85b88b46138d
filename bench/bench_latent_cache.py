"""Stage-2 training step with cached latents vs online encoding, side by side in one run.

    python bench/bench_latent_cache.py [--size demo|sd] [--batch-size 8] [--steps 10] [--device cpu]

Both variants run the same LatentDiffusionModule step (forward, loss, backward, AdamW); "online" encodes
the images with the frozen autoencoder every step, "cached" reads posterior moments as
`python -m ldm.data.cache_latents` writes them. Steps alternate (ABAB...) so machine load hits both alike.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ldm.interop.checkpoint import save_safetensors  # noqa: E402

SIZES = {
    # the embedded demo: conf/model/autoencoder_kl.yaml at 64 px, conf/model/ldm.yaml UNet
    "demo": dict(resolution=64, ch=32, ch_mult=[1, 2, 2], num_res_blocks=1, unet_channels=32, mult=[1, 2, 2]),
    # SD v1's f=8 VAE at 256 px with a small UNet: encoding dominates more as the autoencoder grows
    "sd": dict(
        resolution=256, ch=128, ch_mult=[1, 2, 4, 4], num_res_blocks=2, unet_channels=64, mult=[1, 2, 2]
    ),
}


def build(size: str, device: str, folder: Path):
    s = SIZES[size]
    ae_cfg = {
        "_target_": "ldm.models.autoencoder.AutoencoderKL",
        "embed_dim": 4,
        "ddconfig": dict(
            double_z=True,
            z_channels=4,
            resolution=s["resolution"],
            in_channels=3,
            out_ch=3,
            ch=s["ch"],
            ch_mult=s["ch_mult"],
            num_res_blocks=s["num_res_blocks"],
            attn_resolutions=[],
            dropout=0.0,
        ),
    }
    path = save_safetensors(
        instantiate(ae_cfg).state_dict(), folder / "model.safetensors", {"model": {"autoencoder": ae_cfg}}
    )
    cfg = OmegaConf.to_container(OmegaConf.load(REPO / "conf/model/ldm.yaml"))
    cfg.pop("defaults")
    cfg["sampler"] = None
    cfg["first_stage"].update(path=str(path), scale_factor=0.18215)
    cfg["unet"].update(model_channels=s["unet_channels"], channel_mult=s["mult"])
    return instantiate(cfg).to(device), s["resolution"], 2 ** (len(s["ch_mult"]) - 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=sorted(SIZES), default="demo")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        module, res, f = build(args.size, args.device, Path(tmp))
    opt = torch.optim.AdamW(module.unet.parameters(), lr=1e-4)
    b, dev = args.batch_size, args.device
    images = torch.rand(b, 3, res, res, device=dev) * 2 - 1
    with torch.no_grad():
        post = module.first_stage.autoencoder.encode(images)
    batches = {
        "online": {"image": images},
        "cached": {"latent_mean": post.mean.half().float(), "latent_logvar": post.logvar.half().float()},
    }
    sync = torch.cuda.synchronize if dev.startswith("cuda") else (lambda: None)

    def step(batch) -> float:
        sync()
        t = time.perf_counter()
        loss, _ = module._step(batch, train=True, generator=torch.Generator(dev).manual_seed(0))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync()
        return time.perf_counter() - t

    times = {k: [] for k in batches}
    for i in range(args.warmup + args.steps):
        for name, batch in batches.items():
            dt = step(batch)
            if i >= args.warmup:
                times[name].append(dt)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"stage-2 step, size={args.size} ({res}px, f={f}), batch {b}, device {dev}, "
        f"{torch.get_num_threads()} threads"
    )
    for name in batches:
        print(f"  {name:7s} {med[name] * 1000:8.1f} ms/step  {b / med[name]:7.1f} images/s")
    print(f"  cached / online speed: {med['online'] / med['cached']:.2f}x")


if __name__ == "__main__":
    main()
