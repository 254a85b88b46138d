"""Tiny stage-1/stage-2 models built in code for tests (random init, CPU, seconds)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from ldm.interop.checkpoint import save_safetensors

REPO = Path(__file__).resolve().parents[1]


def autoencoder_config(resolution: int = 32, ch_mult: tuple[int, ...] = (1, 2)) -> dict:
    """A tiny AutoencoderKL config: 4 latent channels, f = 2 ** (len(ch_mult) - 1)."""
    ddconfig = dict(
        double_z=True,
        z_channels=4,
        resolution=resolution,
        in_channels=3,
        out_ch=3,
        ch=32,
        ch_mult=list(ch_mult),
        num_res_blocks=1,
        attn_resolutions=[],
        dropout=0.0,
    )
    return {"_target_": "ldm.models.autoencoder.AutoencoderKL", "embed_dim": 4, "ddconfig": ddconfig}


def save_autoencoder(path: Path, config: dict) -> Path:
    """A randomly initialised autoencoder (current torch seed) exported as train.py would."""
    return save_safetensors(instantiate(config).state_dict(), path, {"model": {"autoencoder": config}})


def stage2_config(
    ae_path: Path | str,
    conditioners: dict,
    *,
    scale_factor: float = 0.8,
    ema_decay: float = 0.999,
    **unet: Any,
) -> dict:
    """A LatentDiffusionModule config with a tiny UNet (32 channels, one block per level, SD's schedule)."""
    return {
        "_target_": "ldm.training.diffusion_module.LatentDiffusionModule",
        "unet": {
            "_target_": "ldm.modules.unet.UNetModel",
            "in_channels": 4,
            "out_channels": 4,
            "model_channels": 32,
            "num_res_blocks": 1,
            "attention_resolutions": [2],
            "channel_mult": [1, 2],
            "num_head_channels": 32,
            **unet,
        },
        "conditioner": {
            "_target_": "ldm.conditioning.conditioner.Conditioner",
            "_convert_": "all",
            "conditioners": conditioners,
        },
        "first_stage": {
            "_target_": "ldm.models.first_stage.codec_from_checkpoint",
            "path": str(ae_path),
            "scale_factor": scale_factor,
        },
        "loss": {
            "_target_": "ldm.diffusion.loss.DiffusionLoss",
            "schedule": {"_target_": "ldm.diffusion.schedules.NoiseSchedule"},
        },
        "optim": {"lr": 1e-4},
        "ema_decay": ema_decay,
    }


TINY_AE = autoencoder_config(32, (1, 2))

# (conditioners, unet overrides) for every stage-2 conditioning mode
MODES: dict[str, tuple[dict, dict]] = {
    "uncond": ({}, {}),
    "class": (
        {
            "label": {
                "_target_": "ldm.conditioning.ClassEmbedder",
                "n_classes": 5,
                "output": "class",
                "dropout": 0.1,
            }
        },
        {"num_classes": 6},
    ),
    "class_crossattn": (
        {
            "label": {
                "_target_": "ldm.conditioning.ClassEmbedder",
                "n_classes": 5,
                "embed_dim": 32,
                "dropout": 0.1,
            }
        },
        {"context_dim": 32},
    ),
    "txt2img": (
        {"text": {"_target_": "ldm.conditioning.FrozenTextEncoder", "max_length": 12, "dropout": 0.1}},
        {"context_dim": 384},
    ),
    "bert": (
        {
            "text": {
                "_target_": "ldm.conditioning.BERTEmbedder",
                "n_layer": 1,
                "n_embed": 32,
                "max_length": 12,
                "dropout": 0.1,
            }
        },
        {"context_dim": 32},
    ),
    "inpaint": (
        {
            "inpaint": {"_target_": "ldm.conditioning.InpaintingConditioner", "latent_channels": 4},
            "text": {"_target_": "ldm.conditioning.FrozenTextEncoder", "max_length": 12, "dropout": 0.1},
        },
        {"in_channels": 9, "context_dim": 384},
    ),
    "superres": (
        {"lowres": {"_target_": "ldm.conditioning.SuperResConditioner", "upscale": 2.0}},
        {"in_channels": 7},
    ),
    "semantic": (
        {
            "segmap": {
                "_target_": "ldm.conditioning.SemanticMapConditioner",
                "num_classes": 6,
                "downsample_factor": 2,
            }
        },
        {"in_channels": 10},
    ),
}


def save_tiny_autoencoder(folder: Path) -> Path:
    torch.manual_seed(0)
    return save_autoencoder(folder / "model.safetensors", TINY_AE)


def ldm_config(ae_path: Path | str, mode: str, **overrides: Any) -> dict:
    """A stage-2 LatentDiffusionModule config like conf/model/ldm.yaml, scaled down."""
    cfg = OmegaConf.to_container(OmegaConf.load(REPO / "conf/model/ldm.yaml"))
    cfg.pop("defaults")
    conditioners, unet = MODES[mode]
    cfg["sampler"] = {"_target_": "ldm.samplers.sample_ddim", "_partial_": True}
    cfg["first_stage"]["path"] = str(ae_path)
    cfg["unet"].update(model_channels=32, channel_mult=[1, 2], attention_resolutions=[2], num_res_blocks=1)
    cfg["unet"].update(unet)
    cfg["conditioner"]["conditioners"] = conditioners
    cfg["preview_steps"] = 4
    cfg["optim"]["warmup_steps"] = 0
    cfg["optim"]["lr"] = 1e-3
    cfg.update(overrides)
    return cfg


def make_batch(mode: str, n: int = 4, size: int = 16, seed: int = 0) -> dict:
    """A synthetic batch with every field the contract defines."""
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(n, 3, size, size, generator=g) * 2 - 1
    mask = (torch.rand(n, 1, size, size, generator=g) > 0.5).float()
    return {
        "image": image,
        "caption": [f"a {c} circle" for c in ["red", "blue", "green", "yellow", "white", "black"][:n]],
        "label": torch.arange(n) % 5,
        "segmap": torch.randint(0, 6, (n, size, size), generator=g),
        "mask": mask,
        "masked_image": image * (1 - mask),
        "lowres": torch.nn.functional.interpolate(image, scale_factor=0.25, mode="bilinear"),
    }


def bare_trainer(max_steps: int, callbacks=(), **kwargs: Any) -> pl.Trainer:
    """A CPU Trainer without logger, checkpoints, progress bar, summary or sanity validation."""
    return pl.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=list(callbacks),
        **kwargs,
    )


# -- tiny exported stage-2 models of every kind of conditioning (sample.py / Pipeline tests) -----------

F_AE = 4  # the tiny autoencoder's downsampling factor
SIZE = 32  # training resolution recorded in the tiny models' run config
AUTOENCODER = autoencoder_config(SIZE, (1, 1, 1))
TEXT = {"text": {"_target_": "ldm.conditioning.FrozenTextEncoder", "max_length": 16, "dropout": 0.1}}
MODELS = {  # name -> (conditioners, UNet overrides): one per kind of conditioning
    "txt2img": (TEXT, {"context_dim": 384}),
    "inpaint": (
        {"inpaint": {"_target_": "ldm.conditioning.InpaintingConditioner", "latent_channels": 4}},
        {"in_channels": 9},
    ),
    "superres": (
        {"lowres": {"_target_": "ldm.conditioning.SuperResConditioner", "upscale": 1.0}},
        {"in_channels": 7},
    ),
    "semantic": (
        {
            "segmap": {
                "_target_": "ldm.conditioning.SemanticMapConditioner",
                "num_classes": 3,
                "downsample_factor": F_AE,
            }
        },
        {"in_channels": 7},
    ),
    "class": (
        {"label": {"_target_": "ldm.conditioning.ClassEmbedder", "n_classes": 3, "output": "class"}},
        {"num_classes": 4},
    ),
    "uncond": ({}, {}),
}


def build_sample_root(root: Path) -> Path:
    """Tiny exported models (random weights, one per conditioning kind) and input images under `root`."""
    torch.manual_seed(0)
    ae_path = save_autoencoder(root / "ae" / "model.safetensors", AUTOENCODER)
    for name, (conditioners, unet) in [*MODELS.items(), ("uncond_v_ztsnr", ({}, {}))]:
        cfg = stage2_config(ae_path, copy.deepcopy(conditioners), **unet)
        if name == "uncond_v_ztsnr":  # the stage-2 default objective: v-prediction, zero-terminal SNR
            cfg["loss"].update(parameterization="v")
            cfg["loss"]["schedule"].update(zero_terminal_snr=True)
        module = instantiate(copy.deepcopy(cfg))
        with torch.no_grad():  # zero-initialised output convs would make the UNet ignore t and the condition
            for p in module.unet.parameters():
                if not p.any():
                    p.normal_(0, 0.05)
        module.ema.update(module.model)  # EMA = the weights above (what the export ships)
        config = module.export_config({"model": cfg, "data": {"resolution": SIZE}})
        save_safetensors(module.export_state_dict(), root / name / "model.safetensors", config)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    image = np.stack([xx * 8, yy * 8, np.full_like(xx, 128)], -1).astype(np.uint8)  # a colour ramp
    image[8:24, 8:24] = (220, 30, 30)  # a red square
    Image.fromarray(image).save(root / "image.png")
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[4:16, 12:28] = 255  # white = regenerate
    Image.fromarray(mask).save(root / "mask.png")
    Image.fromarray(mask[::2, ::2]).save(root / "mask_small.png")
    Image.fromarray(image[::4, ::4]).save(root / "lowres.png")  # 8x8 -> x4 = 32x32
    segmap = np.zeros((SIZE, SIZE), np.uint8)
    segmap[:, 16:] = 1
    segmap[20:, :] = 2
    Image.fromarray(segmap, mode="L").save(root / "segmap.png")
    (root / "prompts.txt").write_text("a red circle\n\na blue square\n")
    return root
