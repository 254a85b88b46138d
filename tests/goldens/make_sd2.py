"""Write the goldens of group "sd2" with the ORIGINAL Stability code (Stable Diffusion 2.x, x4 upscaler).

Families (one folder each under tests/goldens/): sd2 (v2-inference.yaml), sd2_v (v2-inference-v.yaml, sd2's
weights), sd2_inpaint (v2-inpainting-inference.yaml), sd_x4_upscaler (x4-upscaling.yaml). For each: a tiny
`config.yaml` with the structure and targets of the original yaml, `model.safetensors` (the original
LatentDiffusion's whole state_dict, every parameter perturbed, stored in float16) and `io.safetensors` (inputs
and what the original code returns for them; see tests/goldens/README.md).

Run from the repository root, with a separate environment that can import the original code (never this
repository's `ldm`, which has the same package name):

    python3 -m venv /work/orig/venv_sd2
    /work/orig/venv_sd2/bin/pip install torch==2.13.0 open_clip_torch pytorch_lightning omegaconf einops \
        safetensors transformers
    PYTHONPATH=/path/to/Stability-AI/stablediffusion /work/orig/venv_sd2/bin/python tests/goldens/make_sd2.py

Nothing is downloaded: the OpenCLIP model is a tiny random one and its tokenizer a tiny BPE vocabulary with
the layout of CLIP's (256 byte tokens, 256 byte+</w> tokens, merges, start/end of text), written here.
Current open_clip releases run their text transformer batch-first; the SD 2 code (written against open_clip
2.0) feeds it sequence-first, so the attention layers are switched back to sequence-first here.
"""

from __future__ import annotations

import gzip
import json
import sys
import tempfile
import types
from pathlib import Path

import pytorch_lightning.utilities.rank_zero as _rank_zero
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

# What the original code imports but these goldens never use (PL 2.x moved rank_zero_only; kornia is absent).
_dist = types.ModuleType("pytorch_lightning.utilities.distributed")
_dist.rank_zero_only = _rank_zero.rank_zero_only
sys.modules["pytorch_lightning.utilities.distributed"] = _dist
sys.modules.setdefault("kornia", types.ModuleType("kornia"))

import open_clip  # noqa: E402
from ldm.models.diffusion.ddim import DDIMSampler  # noqa: E402  (the original's)
from ldm.modules.encoders import modules as encoders  # noqa: E402
from ldm.util import instantiate_from_config  # noqa: E402

OUT = Path(__file__).resolve().parent
MERGES = ["r e", "re d</w>", "c i", "ci r", "cir c", "l e</w>", "circ le</w>"]  # as tiny_clip_tokenizer
# heads = width // 64, as in every OpenCLIP ViT text tower
TEXT = {"width": 64, "heads": 1, "layers": 2, "context_length": 77}
PROMPTS = ["a red circle", ""]


def tiny_tokenizer() -> open_clip.tokenizer.SimpleTokenizer:
    """OpenCLIP's own SimpleTokenizer over a tiny BPE file (ids pad with 0, as open_clip.tokenize does)."""
    path = Path(tempfile.mkdtemp()) / "bpe.txt.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(MERGES))  # no final newline: it would add an empty token
    return open_clip.tokenizer.SimpleTokenizer(str(path), context_length=TEXT["context_length"])


TOKENIZER = tiny_tokenizer()


def tiny_open_clip(*args, **kwargs):
    """Stands in for open_clip.create_model_and_transforms(arch, pretrained=...): a tiny random CLIP."""
    text_cfg = open_clip.model.CLIPTextCfg(vocab_size=TOKENIZER.vocab_size, **TEXT)
    vision_cfg = open_clip.model.CLIPVisionCfg(layers=1, width=32, head_width=32, patch_size=8, image_size=16)
    model = open_clip.model.CLIP(embed_dim=32, vision_cfg=vision_cfg, text_cfg=text_cfg)
    for block in model.transformer.resblocks:  # SD 2 passes (L, N, D), as open_clip 2.0 expected
        block.attn.batch_first = False
    return model, None, None


encoders.open_clip.create_model_and_transforms = tiny_open_clip
encoders.open_clip.tokenize = lambda texts: TOKENIZER(texts)


def autoencoder(ch_mult: list[int]) -> dict:
    return {
        "target": "ldm.models.autoencoder.AutoencoderKL",
        "params": {
            "embed_dim": 4,
            "monitor": "val/rec_loss",
            "ddconfig": {
                "double_z": True,
                "z_channels": 4,
                "resolution": 32,
                "in_channels": 3,
                "out_ch": 3,
                "ch": 32,
                "ch_mult": ch_mult,
                "num_res_blocks": 1,
                "attn_resolutions": [],
                "dropout": 0.0,
            },
            "lossconfig": {"target": "torch.nn.Identity"},
        },
    }


OPENCLIP = {
    "target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
    "params": {"freeze": True, "layer": "penultimate"},
}


def sd2_config(parameterization: str | None, inpaint: bool = False) -> dict:
    """v2-inference(-v).yaml / v2-inpainting-inference.yaml with tiny widths (same keys and targets)."""
    params = {
        "linear_start": 0.00085,
        "linear_end": 0.0120,
        "num_timesteps_cond": 1,
        "log_every_t": 200,
        "timesteps": 1000,
        "first_stage_key": "jpg",
        "cond_stage_key": "txt",
        "image_size": 8,
        "channels": 4,
        "cond_stage_trainable": False,
        "conditioning_key": "hybrid" if inpaint else "crossattn",
        "monitor": "val/loss_simple_ema",
        "scale_factor": 0.18215,
        "use_ema": False,
        "unet_config": {
            "target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
            "params": {
                "use_checkpoint": True,
                "use_fp16": False,  # True casts inputs to half (a GPU-only path); ours ignores the key
                "image_size": 32,
                "in_channels": 9 if inpaint else 4,
                "out_channels": 4,
                "model_channels": 32,
                "attention_resolutions": [2, 1],
                "num_res_blocks": 1,
                "channel_mult": [1, 1],
                "num_head_channels": 16,
                "use_spatial_transformer": True,
                "use_linear_in_transformer": True,
                "transformer_depth": 1,
                "context_dim": TEXT["width"],
                "legacy": False,
            },
        },
        "first_stage_config": autoencoder([1, 1]),
        "cond_stage_config": OPENCLIP,
    }
    if parameterization:
        params = {"parameterization": parameterization, **params}
    if inpaint:
        params["finetune_keys"] = None
        del params["unet_config"]["params"]["use_fp16"]
    target = "LatentInpaintDiffusion" if inpaint else "LatentDiffusion"
    return {
        "model": {
            "base_learning_rate": 1.0e-4,
            "target": f"ldm.models.diffusion.ddpm.{target}",
            "params": params,
        }
    }


def x4_config() -> dict:
    """x4-upscaling.yaml with tiny widths (same keys and targets)."""
    return {
        "model": {
            "base_learning_rate": 1.0e-4,
            "target": "ldm.models.diffusion.ddpm.LatentUpscaleDiffusion",
            "params": {
                "parameterization": "v",
                "low_scale_key": "lr",
                "linear_start": 0.0001,
                "linear_end": 0.02,
                "num_timesteps_cond": 1,
                "log_every_t": 200,
                "timesteps": 1000,
                "first_stage_key": "jpg",
                "cond_stage_key": "txt",
                "image_size": 8,
                "channels": 4,
                "cond_stage_trainable": False,
                "conditioning_key": "hybrid-adm",
                "monitor": "val/loss_simple_ema",
                "scale_factor": 0.08333,
                "use_ema": False,
                "low_scale_config": {
                    "target": "ldm.modules.diffusionmodules.upscaling.ImageConcatWithNoiseAugmentation",
                    "params": {
                        "noise_schedule_config": {"linear_start": 0.0001, "linear_end": 0.02},
                        "max_noise_level": 350,
                    },
                },
                "unet_config": {
                    "target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
                    "params": {
                        "use_checkpoint": True,
                        "num_classes": 360,  # > max_noise_level (the full model: 1000)
                        "image_size": 32,
                        "in_channels": 7,
                        "out_channels": 4,
                        "model_channels": 32,
                        "attention_resolutions": [1],
                        "num_res_blocks": 1,
                        "channel_mult": [1, 1],
                        "disable_self_attentions": [True, False],
                        "disable_middle_self_attn": False,
                        "num_heads": 2,
                        "use_spatial_transformer": True,
                        "transformer_depth": 1,
                        "context_dim": TEXT["width"],
                        "legacy": False,
                        "use_linear_in_transformer": True,
                    },
                },
                "first_stage_config": autoencoder([1, 1]),
                "cond_stage_config": OPENCLIP,
            },
        }
    }


def build(config: dict, folder: Path, seed: int) -> torch.nn.Module:
    """The original model with every parameter perturbed (rounded to fp16); its state_dict is stored.

    No `model_ema.*` shadows are stored (they would double the UNet's bytes): the tests derive a file with
    shadows from this one (shadows = these weights, raw weights perturbed again) to test EMA loading.
    """
    folder.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create(config), folder / "config.yaml")
    torch.manual_seed(seed)
    model = instantiate_from_config(OmegaConf.create(config).model).eval()
    model.cond_stage_model.device = "cpu"  # FrozenOpenCLIPEmbedder's default is "cuda"
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen)).copy_(p.half().float())
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    params = dict(model.named_parameters())
    store = {k: (v.half() if k in params else v) for k, v in state.items()}  # buffers (schedules) stay fp32
    save_file({k: v.contiguous() for k, v in store.items()}, folder / "model.safetensors")
    return model


def first_stage_io(model, size: int, gen: torch.Generator) -> dict:
    image = torch.rand(1, 3, size, size, generator=gen) * 2 - 1
    posterior = model.first_stage_model.encode(image)
    side = size // 2 ** (len(model.first_stage_model.decoder.up) - 1)  # latent side
    z = torch.randn(1, 4, side, side, generator=gen)
    return {
        "io.image": image,
        "io.posterior_mean": posterior.mean,
        "io.posterior_logvar": posterior.logvar,
        "io.decoded": model.first_stage_model.decode(posterior.mean),
        "io.z": z,
        "io.decode_first_stage": model.decode_first_stage(z),
    }


def text_io(model) -> dict:
    return {
        "io.prompt_tokens": TOKENIZER(PROMPTS),
        "io.prompt_context": model.get_learned_conditioning(PROMPTS),
    }


def ddim(model, cond, uncond, x_T: torch.Tensor, scale: float = 3.0) -> torch.Tensor:
    """The original DDIMSampler: 10 steps, eta 0, classifier-free guidance `scale`."""
    sampler = DDIMSampler(model, device="cpu")
    out, _ = sampler.sample(
        S=10,
        batch_size=x_T.shape[0],
        shape=tuple(x_T.shape[1:]),
        conditioning=cond,
        eta=0.0,
        x_T=x_T,
        unconditional_guidance_scale=scale,
        unconditional_conditioning=uncond,
        verbose=False,
    )
    return out


def write(folder: Path, io: dict) -> None:
    save_file(
        {
            k: v.detach().float().contiguous() if v.is_floating_point() else v.contiguous()
            for k, v in io.items()
        },
        folder / "io.safetensors",
    )
    print(folder.name, {k: tuple(v.shape) for k, v in io.items()})


@torch.no_grad()
def make_sd2() -> None:
    folder = OUT / "sd2"
    model = build(sd2_config(None), folder, seed=0)
    gen = torch.Generator().manual_seed(10)
    io = {"io.x": torch.randn(2, 4, 8, 8, generator=gen), "io.t": torch.tensor([10, 500])}
    io["io.context"] = torch.randn(2, 8, TEXT["width"], generator=gen)
    io["io.unet_out"] = model.apply_model(io["io.x"], io["io.t"], io["io.context"])
    io.update(first_stage_io(model, 16, gen))
    io.update(text_io(model))
    io["io.alphas_cumprod"] = model.alphas_cumprod
    io["io.x_T"] = torch.randn(2, 4, 8, 8, generator=gen)
    io["io.cond_context"] = model.get_learned_conditioning(["a red circle", "red"])
    io["io.uncond_context"] = model.get_learned_conditioning(["", ""])
    io["io.ddim10_cfg3"] = ddim(model, io["io.cond_context"], io["io.uncond_context"], io["io.x_T"])
    write(folder, io)

    folder = OUT / "sd2_v"  # the same weights (sd2/model.safetensors), v-prediction yaml
    config = sd2_config("v")
    folder.mkdir(exist_ok=True)
    OmegaConf.save(OmegaConf.create(config), folder / "config.yaml")
    torch.manual_seed(0)
    model_v = instantiate_from_config(OmegaConf.create(config).model).eval()
    model_v.load_state_dict(model.state_dict())
    model_v.cond_stage_model.device = "cpu"
    v_io = {k: io[k] for k in ("io.x_T", "io.cond_context", "io.uncond_context")}
    v_io["io.ddim10_cfg3"] = ddim(model_v, v_io["io.cond_context"], v_io["io.uncond_context"], v_io["io.x_T"])
    write(folder, v_io)


@torch.no_grad()
def make_inpaint() -> None:
    folder = OUT / "sd2_inpaint"
    model = build(sd2_config(None, inpaint=True), folder, seed=1)
    gen = torch.Generator().manual_seed(11)
    io = {"io.x": torch.randn(2, 4, 8, 8, generator=gen), "io.t": torch.tensor([10, 500])}
    io["io.context"] = torch.randn(2, 8, TEXT["width"], generator=gen)
    io["io.concat"] = torch.randn(2, 5, 8, 8, generator=gen)
    cond = {"c_concat": [io["io.concat"]], "c_crossattn": [io["io.context"]]}
    io["io.unet_out"] = model.apply_model(io["io.x"], io["io.t"], cond)
    io.update(first_stage_io(model, 16, gen))
    io.update(text_io(model))
    # The concat condition of LatentInpaintDiffusion.get_input / scripts/gradio/inpainting.py: the mask
    # resized to latent size, then the masked image's latents. The original samples the posterior there;
    # the goldens use its mean (deterministic), as our InpaintingConditioner does.
    image = torch.rand(2, 3, 16, 16, generator=gen) * 2 - 1
    mask = torch.zeros(2, 1, 16, 16)
    mask[0, :, 4:12, 4:12] = 1
    mask[1, :, :, 8:] = 1
    io["io.mask"], io["io.masked_image"] = mask, image * (1 - mask)
    latents = model.scale_factor * model.encode_first_stage(io["io.masked_image"]).mean
    io["io.inpaint_concat"] = torch.cat([torch.nn.functional.interpolate(mask, size=(8, 8)), latents], dim=1)
    io["io.x_T"] = torch.randn(2, 4, 8, 8, generator=gen)
    io["io.cond_context"] = model.get_learned_conditioning(["a red circle", "red"])
    io["io.uncond_context"] = model.get_learned_conditioning(["", ""])
    c = {"c_concat": [io["io.inpaint_concat"]], "c_crossattn": [io["io.cond_context"]]}
    uc = {"c_concat": [io["io.inpaint_concat"]], "c_crossattn": [io["io.uncond_context"]]}
    io["io.ddim10_cfg3"] = ddim(model, c, uc, io["io.x_T"])
    write(folder, io)


@torch.no_grad()
def make_x4() -> None:
    folder = OUT / "sd_x4_upscaler"
    model = build(x4_config(), folder, seed=2)
    gen = torch.Generator().manual_seed(12)
    io = {"io.x": torch.randn(2, 4, 8, 8, generator=gen), "io.t": torch.tensor([10, 500])}
    io["io.context"] = torch.randn(2, 8, TEXT["width"], generator=gen)
    io["io.concat"] = torch.randn(2, 3, 8, 8, generator=gen)
    io["io.y"] = torch.tensor([20, 300])
    cond = {"c_concat": [io["io.concat"]], "c_crossattn": [io["io.context"]], "c_adm": io["io.y"]}
    io["io.unet_out"] = model.apply_model(io["io.x"], io["io.t"], cond)
    io.update(first_stage_io(model, 32, gen))
    io.update(text_io(model))
    # ImageConcatWithNoiseAugmentation: q_sample of the low-res image at the given noise level (own schedule).
    io["io.lowres"] = torch.rand(2, 3, 8, 8, generator=gen) * 2 - 1
    io["io.noise_level"] = torch.tensor([20, 20])
    io["io.lowres_noise"] = torch.randn(2, 3, 8, 8, generator=gen)
    low = model.low_scale_model
    io["io.lowres_augmented"] = low.q_sample(
        io["io.lowres"], io["io.noise_level"], noise=io["io.lowres_noise"]
    )
    io["io.lowres_alphas_cumprod"] = low.alphas_cumprod
    io["io.alphas_cumprod"] = model.alphas_cumprod
    io["io.x_T"] = torch.randn(2, 4, 8, 8, generator=gen)
    io["io.cond_context"] = model.get_learned_conditioning(["a red circle", "red"])
    io["io.uncond_context"] = model.get_learned_conditioning(["", ""])
    aug, level = io["io.lowres_augmented"], io["io.noise_level"]
    c = {"c_concat": [aug], "c_crossattn": [io["io.cond_context"]], "c_adm": level}
    uc = {"c_concat": [aug], "c_crossattn": [io["io.uncond_context"]], "c_adm": level}
    io["io.ddim10_cfg3"] = ddim(model, c, uc, io["io.x_T"])
    write(folder, io)


def make_keys(checkout: Path) -> None:
    """sd2_keys.json / x4_keys.json: name -> shape of every UNet and first-stage tensor of the full-size
    models, built by the original code on the meta device (nothing allocated) from the original yamls."""
    for name, yaml in (("sd2", "v2-inference.yaml"), ("x4", "x4-upscaling.yaml")):
        params = OmegaConf.load(checkout / "configs" / "stable-diffusion" / yaml).model.params
        with torch.device("meta"):
            unet = instantiate_from_config(params.unet_config)
            first = instantiate_from_config(params.first_stage_config)
        keys = {"model.diffusion_model." + k: list(v.shape) for k, v in unet.state_dict().items()}
        keys.update({"first_stage_model." + k: list(v.shape) for k, v in first.state_dict().items()})
        counts = {
            "unet": sum(p.numel() for p in unet.parameters()),
            "autoencoder": sum(p.numel() for p in first.parameters()),
        }
        doc = {
            "config": f"configs/stable-diffusion/{yaml} (UNet + AutoencoderKL)",
            "params": counts,
            "keys": keys,
        }
        (OUT / f"{name}_keys.json").write_text(json.dumps(doc, separators=(",", ":")))
        print(name, counts, len(keys))


if __name__ == "__main__":
    make_keys(Path(sys.modules["ldm.util"].__file__).resolve().parents[1])  # the checkout
    make_sd2()
    make_inpaint()
    make_x4()
    for name in ("sd2", "sd2_v", "sd2_inpaint", "sd_x4_upscaler"):
        sizes = {p.name: p.stat().st_size for p in (OUT / name).iterdir()}
        print(name, json.dumps(sizes))
