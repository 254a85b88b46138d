"""Make the parity goldens of the LDM paper's VQ / unconditional / concat families with the ORIGINAL code.

Families (tests/goldens/<family>/, see tests/goldens/README.md): ldm_celeba_vq, ldm_churches_kl, ldm_bsr_sr,
ldm_semantic, ldm_inpainting_big. Each gets a tiny `config.yaml` (same targets and structure as the released
models/ldm/<name>/config.yaml, tiny widths), `model.safetensors` (the original LatentDiffusion's whole
state_dict, every weight perturbed, stored as fp16) and `io.safetensors` (inputs and what the original code
returns for them).

This script is not run by the tests; it needs the original CompVis latent-diffusion checkout and a venv of its
own (never the project's, whose package is also called `ldm`):

    python3 -m venv /work/orig/venv_ldm_vq
    /work/orig/venv_ldm_vq/bin/pip install torch einops omegaconf numpy safetensors tqdm pillow
    /work/orig/venv_ldm_vq/bin/pip install --no-deps taming-transformers-rom1504   # VectorQuantizer2
    PYTHONPATH=/work/orig/latent-diffusion /work/orig/venv_ldm_vq/bin/python tests/goldens/make_ldm_vq.py

pytorch_lightning, torchvision, clip and kornia are only imported, never used, by the modules involved: tiny
stand-in modules are put in `sys.modules` below. DDIMSampler moves its buffers to CUDA unconditionally; it is
given a CPU `register_buffer` here.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

OUT = Path(__file__).resolve().parent
SEED = 1234
NOISE = 0.05  # every weight gets + NOISE * randn, so zero-initialised layers count too


def _stub_modules() -> None:
    """Import-only dependencies of the original modules (never called on the paths used here)."""

    class LightningModule(torch.nn.Module):
        device = torch.device("cpu")

    pl = types.ModuleType("pytorch_lightning")
    pl.LightningModule = LightningModule
    utilities = types.ModuleType("pytorch_lightning.utilities")
    distributed = types.ModuleType("pytorch_lightning.utilities.distributed")
    distributed.rank_zero_only = lambda fn: fn
    pl.utilities = utilities
    utilities.distributed = distributed
    tv = types.ModuleType("torchvision")
    tv_utils = types.ModuleType("torchvision.utils")
    tv_utils.make_grid = None
    tv.utils = tv_utils
    for name, mod in {
        "pytorch_lightning": pl,
        "pytorch_lightning.utilities": utilities,
        "pytorch_lightning.utilities.distributed": distributed,
        "torchvision": tv,
        "torchvision.utils": tv_utils,
        "clip": types.ModuleType("clip"),
        "kornia": types.ModuleType("kornia"),
    }.items():
        sys.modules.setdefault(name, mod)


def vq_stage(attn_type: str | None = None) -> dict:
    """A tiny `VQModelInterface` (f=4, 3 channels, as the released VQ-f4 first stage)."""
    ddconfig = {
        "double_z": False,
        "z_channels": 3,
        "resolution": 32,
        "in_channels": 3,
        "out_ch": 3,
        "ch": 32,
        "ch_mult": [1, 1, 1],
        "num_res_blocks": 0,  # the decoder still has one block per level
        "attn_resolutions": [],
        "dropout": 0.0,
    }
    if attn_type is not None:
        ddconfig = {"attn_type": attn_type, **ddconfig}
    return {
        "target": "ldm.models.autoencoder.VQModelInterface",
        "params": {
            "embed_dim": 3,
            "n_embed": 64,
            "ddconfig": ddconfig,
            "lossconfig": {"target": "torch.nn.Identity"},
        },
    }


def kl_stage() -> dict:
    """A tiny `AutoencoderKL` (f=8, 4 channels)."""
    return {
        "target": "ldm.models.autoencoder.AutoencoderKL",
        "params": {
            "embed_dim": 4,
            "monitor": "val/rec_loss",
            "ddconfig": {
                "double_z": True,
                "z_channels": 4,
                "resolution": 64,
                "in_channels": 3,
                "out_ch": 3,
                "ch": 32,
                "ch_mult": [1, 1, 1, 1],
                "num_res_blocks": 0,
                "attn_resolutions": [],
                "dropout": 0.0,
            },
            "lossconfig": {"target": "torch.nn.Identity"},
        },
    }


def unet(in_ch: int, out_ch: int, **extra) -> dict:
    params = {
        "image_size": 8,
        "in_channels": in_ch,
        "out_channels": out_ch,
        "model_channels": 32,
        "attention_resolutions": [2],
        "num_res_blocks": 1,
        "channel_mult": [1, 1],
    }
    params.update(extra)
    return {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": params}


def family_configs() -> dict[str, dict]:
    """model.params of each tiny config (the released configs' keys; widths shrunk)."""
    common = {"num_timesteps_cond": 1, "log_every_t": 200, "timesteps": 1000, "first_stage_key": "image"}
    return {
        "ldm_celeba_vq": {
            **common,
            "linear_start": 0.0015,
            "linear_end": 0.0195,
            "cond_stage_key": "class_label",
            "image_size": 8,
            "channels": 3,
            "cond_stage_trainable": False,
            "concat_mode": False,
            "monitor": "val/loss",
            "unet_config": unet(3, 3, num_head_channels=16),
            "first_stage_config": vq_stage(),
            "cond_stage_config": "__is_unconditional__",
        },
        "ldm_churches_kl": {
            **common,
            "linear_start": 0.0015,
            "linear_end": 0.0155,
            "loss_type": "l1",
            "cond_stage_key": "image",
            "image_size": 8,
            "channels": 4,
            "cond_stage_trainable": False,
            "concat_mode": False,
            "scale_by_std": True,
            "use_ema": False,  # keeps the file small; ldm_celeba_vq tests the EMA shadows
            "monitor": "val/loss_simple_ema",
            "unet_config": unet(
                4,
                4,
                attention_resolutions=[1, 2],
                num_heads=8,
                use_scale_shift_norm=True,
                resblock_updown=True,
            ),
            "first_stage_config": kl_stage(),
            "cond_stage_config": "__is_unconditional__",
        },
        "ldm_bsr_sr": {
            **common,
            "linear_start": 0.0015,
            "linear_end": 0.0155,
            "log_every_t": 100,
            "loss_type": "l2",
            "cond_stage_key": "LR_image",
            "image_size": 8,
            "channels": 3,
            "concat_mode": True,
            "cond_stage_trainable": False,
            "use_ema": False,  # released without EMA here: the raw-weights path is tested too
            "unet_config": unet(6, 3, num_head_channels=16),
            "first_stage_config": vq_stage(),
            "cond_stage_config": {"target": "torch.nn.Identity"},
        },
        "ldm_semantic": {
            **common,
            "linear_start": 0.0015,
            "linear_end": 0.0205,
            "log_every_t": 100,
            "loss_type": "l1",
            "cond_stage_key": "segmentation",
            "image_size": 8,
            "channels": 3,
            "concat_mode": True,
            "cond_stage_trainable": True,
            "use_ema": False,
            "unet_config": unet(6, 3, attention_resolutions=[1, 2], num_heads=8),
            "first_stage_config": vq_stage(),
            "cond_stage_config": {
                "target": "ldm.modules.encoders.modules.SpatialRescaler",
                "params": {"n_stages": 2, "in_channels": 8, "out_channels": 3},
            },
        },
        "ldm_inpainting_big": {
            **common,
            "linear_start": 0.0015,
            "linear_end": 0.0205,
            "log_every_t": 100,
            "loss_type": "l1",
            "cond_stage_key": "masked_image",
            "image_size": 8,
            "channels": 3,
            "concat_mode": True,
            "monitor": "val/loss",
            "use_ema": False,  # the file holds the first stage twice (cond_stage_model.* too): keep it small
            "unet_config": unet(7, 3, num_heads=8, resblock_updown=True),
            "first_stage_config": vq_stage(attn_type="none"),
            "cond_stage_config": "__is_first_stage__",
        },
    }


def perturbed(model: torch.nn.Module, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Every weight and EMA shadow + NOISE*randn, rounded to fp16; schedule buffers, LitEma counters kept."""
    out, done = {}, {}
    for k, v in model.state_dict().items():
        if v.data_ptr() in done:  # __is_first_stage__: cond_stage_model.* is first_stage_model.* again
            out[k] = out[done[v.data_ptr()]].clone()
            continue
        done[v.data_ptr()] = k
        is_weight = "." in k and k not in ("model_ema.decay", "model_ema.num_updates")
        if is_weight and v.is_floating_point():
            v = v + NOISE * torch.randn(v.shape, generator=gen)
            v = v.half().float()  # what the fp16 file holds
        out[k] = v.clone()
    return out


def make_family(name: str, params: dict) -> None:
    from ldm.models.diffusion.ddim import DDIMSampler
    from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
    from ldm.util import instantiate_from_config

    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED)
    config = {"model": {"base_learning_rate": 1.0e-06, "target": "ldm.models.diffusion.ddpm.LatentDiffusion"}}
    config["model"]["params"] = params
    model = instantiate_from_config(OmegaConf.create(config).model).eval()
    state = perturbed(model, gen)
    if name == "ldm_churches_kl":
        state["scale_factor"] = torch.tensor(0.75)  # as if set by scale_by_std
    model.load_state_dict(state, strict=True)
    if name == "ldm_churches_kl":
        model.scale_factor = state["scale_factor"]

    folder = OUT / name
    folder.mkdir(exist_ok=True)
    OmegaConf.save(OmegaConf.create(config), folder / "config.yaml")
    weights = {k: v.half() if v.is_floating_point() and "." in k else v for k, v in state.items()}
    save_file({k: v.contiguous() for k, v in weights.items()}, folder / "model.safetensors")

    c_lat = params["channels"]
    io: dict[str, torch.Tensor] = {}
    g = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad(), model.ema_scope():
        # first stage: pixels in [-1, 1] -> latent as sampling uses it -> pixels
        image = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
        io["fs_image"] = image
        encoded = model.encode_first_stage(image)
        if isinstance(encoded, DiagonalGaussianDistribution):  # KL: the posterior mean, scaled
            io["fs_latent"] = model.scale_factor * encoded.mode()
        else:  # VQ: the pre-quantisation latent (scale_factor 1)
            io["fs_latent"] = model.get_first_stage_encoding(encoded)
        io["fs_decoded"] = model.decode_first_stage(io["fs_latent"])  # VQ: quantised first

        # conditioner
        side = io["fs_latent"].shape[-1]
        cond = None
        if name == "ldm_bsr_sr":
            lowres = torch.rand(2, 3, side, side, generator=g) * 2 - 1  # at latent resolution, [-1, 1]
            io["cond_lowres"] = lowres
            cond = model.get_learned_conditioning(lowres)
        elif name == "ldm_semantic":
            n_cls = params["cond_stage_config"]["params"]["in_channels"]
            segmap = torch.randint(0, n_cls, (2, 4 * side, 4 * side), generator=g)
            io["cond_segmap"] = segmap
            one_hot = torch.nn.functional.one_hot(segmap, n_cls).permute(0, 3, 1, 2).float()
            cond = model.get_learned_conditioning(one_hot)
        elif name == "ldm_inpainting_big":
            # scripts/inpaint.py: image and mask in [0, 1], masked = (1 - mask) * image, all mapped to [-1, 1]
            image01 = torch.rand(2, 3, 4 * side, 4 * side, generator=g)
            mask01 = torch.zeros(2, 1, 4 * side, 4 * side)
            mask01[0, :, 8:24, 4:20] = 1
            mask01[1, :, 16:, :] = 1
            batch = {"image": image01, "mask": mask01, "masked_image": (1 - mask01) * image01}
            batch = {k: v * 2.0 - 1.0 for k, v in batch.items()}
            io["cond_image"] = batch["image"]
            io["cond_mask"] = mask01  # 1 = pixels to generate
            c = model.cond_stage_model.encode(batch["masked_image"])
            cc = torch.nn.functional.interpolate(batch["mask"], size=c.shape[-2:])
            cond = torch.cat((c, cc), dim=1)
        if cond is not None:
            io["cond_out"] = cond

        # UNet through apply_model (concat wiring included)
        io["unet_x"] = torch.randn(2, c_lat, side, side, generator=g)
        io["unet_t"] = torch.tensor([10, 500])
        io["unet_out"] = model.apply_model(io["unet_x"], io["unet_t"], cond)

        # 10-step DDIM, eta 0, no guidance (none of these models was trained with condition dropout)
        sampler = DDIMSampler(model)
        sampler.register_buffer = lambda n, a: setattr(sampler, n, a)
        io["ddim_x_T"] = torch.randn(2, c_lat, side, side, generator=g)
        samples, inter = sampler.sample(
            S=10,
            batch_size=2,
            shape=(c_lat, side, side),
            conditioning=cond,
            eta=0.0,
            x_T=io["ddim_x_T"],
            verbose=False,
            log_every_t=1,
        )
        io["ddim_x_inter"] = torch.stack(inter["x_inter"])  # (11, 2, C, h, w): x_T, then after each step
        io["ddim_out"] = samples
        io["alphas_cumprod"] = model.alphas_cumprod.float()
    save_file({k: v.contiguous().clone() for k, v in io.items()}, folder / "io.safetensors")
    sizes = sum(p.stat().st_size for p in folder.iterdir())
    print(f"{name}: {sizes / 1e6:.2f} MB, io keys {sorted(io)}")


UNET_VARIANTS = {  # UNet options none of the five released configs uses, each against the original UNetModel
    "new_order": unet(
        4,
        4,
        attention_resolutions=[1, 2],
        num_heads=4,
        num_heads_upsample=2,  # has no effect with legacy=False
        use_new_attention_order=True,  # QKVAttention: qkv channels as [q | k | v]
        legacy=False,
        use_scale_shift_norm=True,
    )["params"],
    "legacy_heads_upsample": unet(
        4,
        4,
        attention_resolutions=[1, 2],
        num_heads=4,
        num_heads_upsample=2,  # the decoder's AttentionBlocks get 2 heads
        conv_resample=False,  # average pooling / plain nearest upsampling
    )["params"],
}


def make_unet_variants() -> None:
    import json

    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    gen = torch.Generator().manual_seed(SEED + 2)
    tensors: dict[str, torch.Tensor] = {}
    for name, params in UNET_VARIANTS.items():
        torch.manual_seed(SEED)
        net = UNetModel(**params).eval()
        state = perturbed(net, gen)
        net.load_state_dict(state)
        x = torch.randn(2, params["in_channels"], 8, 8, generator=gen)
        t = torch.tensor([3, 700])
        tensors.update({f"{name}.weights.{k}": v.half() for k, v in state.items()})
        tensors.update({f"{name}.x": x, f"{name}.t": t, f"{name}.out": net(x, t)})
    folder = OUT / "ldm_unet_variants"
    folder.mkdir(exist_ok=True)
    meta = {"unet_config": json.dumps(UNET_VARIANTS)}
    save_file({k: v.contiguous().clone() for k, v in tensors.items()}, folder / "unet.safetensors", meta)
    print(f"ldm_unet_variants: {(folder / 'unet.safetensors').stat().st_size / 1e6:.2f} MB")


RELEASED = {  # family -> models/ldm/<name>/config.yaml of the original checkout
    "ldm_celeba_vq": "celeba256",
    "ldm_churches_kl": "lsun_churches256",
    "ldm_bsr_sr": "bsr_sr",
    "ldm_semantic": "semantic_synthesis256",
    "ldm_inpainting_big": "inpainting_big",
}


def make_full_size_keys() -> None:
    """Every parameter/buffer name and shape of the released models (built on the meta device) + their
    `model.params`, so a test can build ours at full size and compare one to one."""
    import json

    from ldm.util import instantiate_from_config

    import ldm

    root = Path(list(ldm.__path__)[0]).resolve().parent / "models" / "ldm"  # a namespace package
    out = {}
    for family, name in RELEASED.items():
        params = OmegaConf.to_container(OmegaConf.load(root / name / "config.yaml").model.params)
        params.pop("scheduler_config", None)  # training only
        params["first_stage_config"]["params"]["lossconfig"] = {"target": "torch.nn.Identity"}
        parts = [
            ("model.diffusion_model.", params["unet_config"]),
            ("first_stage_model.", params["first_stage_config"]),
        ]
        if isinstance(params["cond_stage_config"], dict):
            parts.append(("cond_stage_model.", params["cond_stage_config"]))
        shapes = {}
        with torch.device("meta"):
            for prefix, cfg in parts:
                module = instantiate_from_config(cfg)
                shapes.update({prefix + k: list(v.shape) for k, v in module.state_dict().items()})
        out[family] = {"params": params, "shapes": shapes}
    (OUT / "ldm_vq_full_size_keys.json").write_text(json.dumps(out, separators=(",", ":")))
    print(f"ldm_vq_full_size_keys.json: {(OUT / 'ldm_vq_full_size_keys.json').stat().st_size / 1e6:.2f} MB")


def main() -> None:
    _stub_modules()
    torch.set_grad_enabled(False)
    for name, params in family_configs().items():
        if len(sys.argv) > 1 and name not in sys.argv[1:]:
            continue
        make_family(name, params)
    if len(sys.argv) == 1 or "ldm_unet_variants" in sys.argv[1:]:
        make_unet_variants()
    if len(sys.argv) == 1 or "full_size_keys" in sys.argv[1:]:
        make_full_size_keys()


if __name__ == "__main__":
    main()
