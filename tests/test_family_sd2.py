"""Parity with the original Stability code for Stable Diffusion 2.x and the SD x4 upscaler (tests/goldens).

Goldens come from tests/goldens/make_sd2.py (the original code, tiny random weights; see goldens/README.md):
single forward passes must match within 1e-5 relative, 10-step DDIM trajectories within 1e-4.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file
from test_interop import tiny_clip_tokenizer

from ldm.conditioning import Conditioner
from ldm.diffusion import NoiseSchedule
from ldm.errors import UserError
from ldm.interop import compvis
from ldm.interop.families import sd2 as sd2_family
from ldm.interop.load import load_model
from ldm.interop.registry import BuildContext
from ldm.models.first_stage import LatentCodec
from ldm.models.latent_diffusion import LatentDiffusion
from ldm.samplers import (
    ClassifierFreeGuidance,
    DiscreteDenoiser,
    StepSchedule,
    sample_ddim,
    start_x,
    to_variance_preserving,
)

GOLDENS = Path(__file__).parent / "goldens"
PROMPTS = ["a red circle", ""]
ORIGINAL_YAMLS = {  # the full-size inference yamls' unet_config / first_stage_config (no weights needed)
    "sd2": {
        "unet_config": {
            "params": {
                "use_checkpoint": True,
                "use_fp16": True,
                "image_size": 32,
                "in_channels": 4,
                "out_channels": 4,
                "model_channels": 320,
                "attention_resolutions": [4, 2, 1],
                "num_res_blocks": 2,
                "channel_mult": [1, 2, 4, 4],
                "num_head_channels": 64,
                "use_spatial_transformer": True,
                "use_linear_in_transformer": True,
                "transformer_depth": 1,
                "context_dim": 1024,
                "legacy": False,
            }
        },
        "ch_mult": [1, 2, 4, 4],
    },
    "x4": {
        "unet_config": {
            "params": {
                "use_checkpoint": True,
                "num_classes": 1000,
                "image_size": 128,
                "in_channels": 7,
                "out_channels": 4,
                "model_channels": 256,
                "attention_resolutions": [2, 4, 8],
                "num_res_blocks": 2,
                "channel_mult": [1, 2, 2, 4],
                "disable_self_attentions": [True, True, True, False],
                "disable_middle_self_attn": False,
                "num_heads": 8,
                "use_spatial_transformer": True,
                "transformer_depth": 1,
                "context_dim": 1024,
                "legacy": False,
                "use_linear_in_transformer": True,
            }
        },
        "ch_mult": [1, 2, 4],
    },
}


def io_of(family: str) -> dict[str, torch.Tensor]:
    return load_file(str(GOLDENS / family / "io.safetensors"))


def close(ours: torch.Tensor, ref: torch.Tensor, rel: float = 1e-5) -> None:
    """Relative error (in norm) below `rel`, and elementwise within rel of the reference's scale."""
    ours, ref = ours.float(), ref.float()
    assert ref.abs().max() > 0.05  # a real output, not all zeros
    error = ((ours - ref).norm() / ref.norm()).item()
    assert error < rel, f"relative error {error:.2e} >= {rel:.0e}"
    torch.testing.assert_close(ours, ref, rtol=rel * 10, atol=rel * 10 * ref.abs().max().item())


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> str:
    """The tiny CLIP BPE tokenizer the goldens' OpenCLIP tokenizer was built from (same vocab and merges)."""
    folder = tmp_path_factory.mktemp("sd2_tokenizer")
    tiny_clip_tokenizer(folder)
    return str(folder)


@pytest.fixture(scope="module")
def sd2(tokenizer):
    return load_model(
        GOLDENS / "sd2/model.safetensors", config=GOLDENS / "sd2/config.yaml", text_encoder=tokenizer
    )


def build_direct(family: str, tokenizer: str) -> LatentDiffusion:
    """The model through this family's builders and compvis' pieces (what load_compvis does), for the
    conditioning keys compvis.build_conditioner does not route yet (x4: hybrid-adm)."""
    yaml = GOLDENS / family / "config.yaml"
    state = {k: v.float() for k, v in load_file(str(yaml.parent / "model.safetensors")).items()}
    params = compvis.read_yaml(yaml)
    ctx = BuildContext(params=params, state=state, yaml_path=yaml, text_encoder=tokenizer)
    conditioners = sd2_family.openclip_embedder(ctx)
    conditioners.update(sd2_family.upscale_conditioners(ctx))
    unet = compvis.build_unet(params)
    autoencoder, ae_config = compvis.build_autoencoder(params)
    unet_state = {k[len(compvis.UNET) :]: v for k, v in state.items() if k.startswith(compvis.UNET)}
    compvis.load_into(unet, unet_state, f"{yaml} (unet_config)")
    first = {k[len(compvis.FIRST_STAGE) :]: v for k, v in state.items() if k.startswith(compvis.FIRST_STAGE)}
    compvis.load_into(autoencoder, first, f"{yaml} (first_stage_config)")
    return LatentDiffusion(
        unet=unet.eval(),
        conditioner=Conditioner(conditioners),
        first_stage=LatentCodec(autoencoder.eval(), float(params["scale_factor"]), ae_config),
        loss=compvis.build_loss(params, state),
    ).eval()


@pytest.fixture(scope="module")
def x4(tokenizer):
    return build_direct("sd_x4_upscaler", tokenizer)


def ddim_trajectory(model, x_T, cond: dict, uncond: dict, scale: float = 3.0) -> torch.Tensor:
    """10 DDIM steps, eta 0, timesteps 901 ... 1 (CompVis' uniform spacing), guidance `scale`."""
    denoiser = ClassifierFreeGuidance(
        DiscreteDenoiser(model.net, model.schedule, model.parameterization), scale=scale, uncond=uncond
    )
    sigmas = StepSchedule(10, "leading", offset=1, final="min")(model.schedule.alphas_cumprod)
    with torch.no_grad():
        out = sample_ddim(denoiser, start_x(x_T, sigmas[0]), sigmas, extra_args=cond, disable=True)
    return to_variance_preserving(out, sigmas[-1])  # CompVis returns the DDPM-scaled x at timestep 0


def check_first_stage(model, io) -> None:
    autoencoder = model.first_stage.autoencoder
    with torch.no_grad():
        posterior = autoencoder.encode(io["io.image"])
        close(posterior.mean, io["io.posterior_mean"])
        close(posterior.logvar, io["io.posterior_logvar"])
        close(autoencoder.decode(io["io.posterior_mean"]), io["io.decoded"])
        close(model.first_stage.decode(io["io.z"]), io["io.decode_first_stage"])  # z / scale_factor


def check_text(model, io) -> None:
    text = model.conditioner.conditioners["text"]
    ids = text.tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    assert torch.equal(ids["input_ids"], io["io.prompt_tokens"])  # OpenCLIP pads with id 0, not end-of-text
    with torch.no_grad():
        close(text({"caption": PROMPTS}), io["io.prompt_context"])
        close(text.null({"caption": PROMPTS}), io["io.prompt_context"][1:].expand(2, -1, -1))


# -- sd2 (v2-inference.yaml) and sd2_v (v2-inference-v.yaml) ------------------------------------------------


def test_sd2_unet_first_stage_and_text_match_the_original(sd2):
    io, model = io_of("sd2"), sd2.model
    assert sd2.format == "compvis" and model.parameterization == "eps"
    with torch.no_grad():
        close(model.net(io["io.x"], io["io.t"], context=io["io.context"]), io["io.unet_out"])
    # The original takes a float64 cumprod, ours a float32 one (schedules.alphas_cumprod_from_betas): < 2e-6.
    torch.testing.assert_close(model.schedule.alphas_cumprod, io["io.alphas_cumprod"], rtol=2e-6, atol=0)
    check_first_stage(model, io)
    check_text(model, io)


def test_sd2_ddim_trajectory_matches_the_original(sd2):
    io, model = io_of("sd2"), sd2.model
    cond, uncond = model.conditioner.encode_with_null({"caption": ["a red circle", "red"]})
    close(cond["context"], io["io.cond_context"])
    close(uncond["context"], io["io.uncond_context"])
    out = ddim_trajectory(
        model, io["io.x_T"], {"context": io["io.cond_context"]}, {"context": io["io.uncond_context"]}
    )
    close(out, io["io.ddim10_cfg3"], rel=1e-4)


def test_sd2_v_ddim_trajectory_matches_the_original(tokenizer):
    io = io_of("sd2_v")
    loaded = load_model(
        GOLDENS / "sd2/model.safetensors", config=GOLDENS / "sd2_v/config.yaml", text_encoder=tokenizer
    )
    assert loaded.model.parameterization == "v"
    out = ddim_trajectory(
        loaded.model, io["io.x_T"], {"context": io["io.cond_context"]}, {"context": io["io.uncond_context"]}
    )
    close(out, io["io.ddim10_cfg3"], rel=1e-4)


def test_sd2_ema_shadows_are_loaded(tmp_path, tokenizer):
    """LitEma shadows (model_ema.*) hold the golden weights; the raw UNet weights are perturbed away."""
    state = load_file(str(GOLDENS / "sd2/model.safetensors"))
    gen = torch.Generator().manual_seed(0)
    for key in [k for k in state if k.startswith(compvis.UNET)]:
        state[compvis.ema_key(key[len(compvis.UNET) :])] = state[key]
        state[key] = state[key] + 0.05 * torch.randn(state[key].shape, generator=gen).to(state[key].dtype)
    state["model_ema.decay"], state["model_ema.num_updates"] = torch.tensor(0.9999), torch.tensor(1000)
    save_file(state, tmp_path / "ema.safetensors")
    io = io_of("sd2")
    outs = {}
    for use_ema in (True, False):
        loaded = load_model(
            tmp_path / "ema.safetensors",
            config=GOLDENS / "sd2/config.yaml",
            text_encoder=tokenizer,
            use_ema=use_ema,
        )
        assert loaded.used_ema == use_ema
        with torch.no_grad():
            outs[use_ema] = loaded.model.net(io["io.x"], io["io.t"], context=io["io.context"])
    close(outs[True], io["io.unet_out"])
    assert (outs[False] - io["io.unet_out"]).abs().max() > 1e-2


def test_openclip_needs_a_tokenizer_folder():
    with pytest.raises(UserError, match="text_encoder="):
        load_model(GOLDENS / "sd2/model.safetensors", config=GOLDENS / "sd2/config.yaml")


# -- sd2_inpaint (v2-inpainting-inference.yaml) ----------------------------------------------------------


def test_sd2_inpainting_matches_the_original(tokenizer):
    io = io_of("sd2_inpaint")
    loaded = load_model(
        GOLDENS / "sd2_inpaint/model.safetensors",
        config=GOLDENS / "sd2_inpaint/config.yaml",
        text_encoder=tokenizer,
    )
    model = loaded.model
    with torch.no_grad():
        out = model.net(io["io.x"], io["io.t"], context=io["io.context"], concat=io["io.concat"])
    close(out, io["io.unet_out"])
    check_first_stage(model, io)
    check_text(model, io)
    inputs = {
        "caption": ["a red circle", "red"],
        "masked_image": io["io.masked_image"],
        "mask": io["io.mask"],
    }
    cond, uncond = model.conditioner.encode_with_null(inputs, encode_fn=model.encode_fn)
    close(cond["concat"], io["io.inpaint_concat"])
    close(cond["context"], io["io.cond_context"])
    out = ddim_trajectory(model, io["io.x_T"], cond, uncond)
    close(out, io["io.ddim10_cfg3"], rel=1e-4)


# -- sd_x4_upscaler (x4-upscaling.yaml) ---------------------------------------------------------------------


def test_x4_unet_first_stage_and_text_match_the_original(x4):
    io = io_of("sd_x4_upscaler")
    assert x4.parameterization == "v"
    with torch.no_grad():
        out = x4.net(io["io.x"], io["io.t"], context=io["io.context"], concat=io["io.concat"], y=io["io.y"])
    close(out, io["io.unet_out"])
    torch.testing.assert_close(x4.schedule.alphas_cumprod, io["io.alphas_cumprod"], rtol=2e-6, atol=0)
    check_first_stage(x4, io)
    check_text(x4, io)


def test_x4_noise_augmentation_matches_the_original(x4):
    io = io_of("sd_x4_upscaler")
    lowres = x4.conditioner.conditioners["lowres"]
    torch.testing.assert_close(
        lowres.schedule.alphas_cumprod, io["io.lowres_alphas_cumprod"], rtol=1e-6, atol=0
    )
    level = x4.conditioner.conditioners["noise_level"]
    batch = {"lowres": io["io.lowres"], "lowres_noise": io["io.lowres_noise"]}  # default level: 20
    close(lowres(batch), io["io.lowres_augmented"])
    assert torch.equal(level(batch), io["io.noise_level"])
    batch["noise_level"] = 100  # one input overrides both
    assert level(batch).tolist() == [100, 100]
    assert not torch.allclose(lowres(batch), io["io.lowres_augmented"])


def test_x4_ddim_trajectory_matches_the_original(x4):
    io = io_of("sd_x4_upscaler")
    inputs = {
        "caption": ["a red circle", "red"],
        "lowres": io["io.lowres"],
        "lowres_noise": io["io.lowres_noise"],
        "noise_level": 20,
    }
    cond, uncond = x4.conditioner.encode_with_null(inputs)
    close(cond["context"], io["io.cond_context"])
    assert torch.equal(uncond["concat"], cond["concat"]) and torch.equal(uncond["y"], cond["y"])
    out = ddim_trajectory(x4, io["io.x_T"], cond, uncond)
    close(out, io["io.ddim10_cfg3"], rel=1e-4)


def test_x4_bad_noise_level_and_config_are_user_errors(x4, tokenizer):
    with pytest.raises(UserError, match="noise_level"):
        x4.conditioner.conditioners["lowres"]({"lowres": torch.zeros(1, 3, 8, 8), "noise_level": 1000})
    with pytest.raises(UserError, match="lowres_noise"):
        x4.conditioner.conditioners["lowres"](
            {"lowres": torch.zeros(1, 3, 8, 8), "lowres_noise": torch.zeros(3)}
        )
    yaml = OmegaConf.load(GOLDENS / "sd_x4_upscaler/config.yaml")
    yaml.model.params.unet_config.params.num_classes = "sequential"
    ctx = BuildContext(params=OmegaConf.to_container(yaml.model.params), state={}, yaml_path=Path("x4.yaml"))
    with pytest.raises(UserError, match=r"unet_config\.params\.num_classes"):
        sd2_family.upscale_conditioners(ctx)


# -- the full-size models' names and shapes -----------------------------------------------------------------


@pytest.mark.parametrize("name", ["sd2", "x4"])
def test_every_full_size_key_maps_to_one_of_our_parameters(name):
    """Our UNet + autoencoder from the original yamls (meta device) have exactly the original's tensors."""
    doc = json.loads((GOLDENS / f"{name}_keys.json").read_text())
    spec = ORIGINAL_YAMLS[name]
    ddconfig = {
        "double_z": True,
        "z_channels": 4,
        "resolution": 256,
        "in_channels": 3,
        "out_ch": 3,
        "ch": 128,
        "ch_mult": spec["ch_mult"],
        "num_res_blocks": 2,
        "attn_resolutions": [],
        "dropout": 0.0,
    }
    params = {
        "unet_config": spec["unet_config"],
        "first_stage_config": {
            "target": "ldm.models.autoencoder.AutoencoderKL",
            "params": {"embed_dim": 4, "ddconfig": ddconfig},
        },
    }
    with torch.device("meta"):
        unet = compvis.build_unet(params)
        autoencoder, _ = compvis.build_autoencoder(params)
    ours = {compvis.UNET + k: list(v.shape) for k, v in unet.state_dict().items()}
    ours.update({compvis.FIRST_STAGE + k: list(v.shape) for k, v in autoencoder.state_dict().items()})
    assert sorted(set(doc["keys"]) - set(ours)) == []
    assert sorted(set(ours) - set(doc["keys"])) == []
    assert {k: s for k, s in doc["keys"].items() if ours[k] != s} == {}
    assert sum(p.numel() for p in unet.parameters()) == doc["params"]["unet"]
    assert sum(p.numel() for p in autoencoder.parameters()) == doc["params"]["autoencoder"]


def test_disable_self_attentions_needs_one_entry_per_level():
    params = dict(ORIGINAL_YAMLS["x4"]["unet_config"]["params"], disable_self_attentions=[True, False])
    with pytest.raises(UserError, match="disable_self_attentions"), torch.device("meta"):
        compvis.build_unet({"unet_config": {"params": params}})


def test_num_attention_blocks_limits_attention_per_level():
    """CompVis: level l attends in its first num_attention_blocks[l] blocks (down 2, up 3); middle always."""
    params = {
        "in_channels": 4,
        "out_channels": 4,
        "model_channels": 32,
        "num_res_blocks": 2,
        "attention_resolutions": [1, 2],
        "channel_mult": [1, 1],
        "num_head_channels": 16,
        "context_dim": 64,
        "use_linear_in_transformer": True,
        "legacy": False,
    }

    def transformers(**extra) -> int:
        with torch.device("meta"):
            unet = compvis.build_unet({"unet_config": {"params": {**params, **extra}}})
        return sum(type(m).__name__ == "SpatialTransformer" for m in unet.modules())

    assert transformers() == 2 + 3 + 1 + 2 + 3
    assert transformers(num_attention_blocks=[1, 2]) == 1 + 1 + 1 + 2 + 2
    assert transformers(num_attention_blocks=[0, 0]) == 1


def test_noise_schedule_of_the_augmentation_is_compvis_linear():
    """CompVis' "linear" is linear in sqrt(beta): our scaled_linear with the yaml's 1e-4 .. 2e-2."""
    ours = NoiseSchedule("scaled_linear", 1000, 1e-4, 2e-2).alphas_cumprod
    torch.testing.assert_close(ours, io_of("sd_x4_upscaler")["io.lowres_alphas_cumprod"], rtol=2e-6, atol=0)
