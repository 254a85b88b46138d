"""A tiny Stable-Diffusion-1.x-structured base file in the original layout (shared by the fine-tune, LoRA,
DreamBooth and textual-inversion tests): the CompVis reference UNet + VAE of ../shared/reference and a random
2-layer CLIP text model with a byte-level tokenizer."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_interop import SD_V1_YAML, compvis_text_state, tiny_clip_text_model, tiny_clip_tokenizer


def build_sd_base(root: Path, reference_dir: Path) -> tuple[Path, Path, Path]:
    """Write (tiny SD v1 file, its yaml, a CLIP tokenizer folder) under `root`; 64 px images, 8x8 latents."""
    root.mkdir(parents=True, exist_ok=True)
    tokenizer = tiny_clip_tokenizer(root / "tokenizer")
    clip = tiny_clip_text_model(tokenizer)
    path = reference_dir / "sd_v1_tiny.safetensors"
    tensors = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        meta = {k: json.loads(v) for k, v in f.metadata().items()}
    state = {
        k: v for k, v in tensors.items() if k.startswith(("model.diffusion_model.", "first_stage_model."))
    }
    state["scale_factor"] = torch.tensor(0.18215)
    state["alphas_cumprod"] = tensors["io.alphas_cumprod"]
    state.update(compvis_text_state(clip))
    params = copy.deepcopy(SD_V1_YAML)
    p = params["model"]["params"]
    p["image_size"] = 8  # latent side: the f=8 VAE makes that 64 px
    p["unet_config"]["params"] = {**meta["unet"], "use_checkpoint": True}
    p["first_stage_config"]["params"]["ddconfig"] = meta["autoencoder"]["ddconfig"]
    (root / "v1-tiny.yaml").write_text(yaml.safe_dump(params))
    save_file({k: v.contiguous() for k, v in state.items()}, root / "tiny-sd.safetensors")
    return root / "tiny-sd.safetensors", root / "v1-tiny.yaml", root / "tokenizer"
