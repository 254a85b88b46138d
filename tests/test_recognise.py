"""Original checkpoints without their yaml: the family is recognised from key names and shapes alone.

Full-size state dicts are built as meta tensors (no memory) from each built-in yaml: our UNet and first
stage built from the yaml on the meta device, plus the cond-stage keys its `cond_stage_config` implies.
"""

import json
import logging

import pytest
import torch
import yaml
from test_interop import clip, tiny_sd  # noqa: F401  (fixtures: a tiny SD-v1-style file + CLIP folders)

from ldm.errors import UserError
from ldm.interop import compvis, recognise
from ldm.interop.load import load_model

UNET, AE, COND = "model.diffusion_model.", "first_stage_model.", "cond_stage_model."
BUILTIN = sorted(p.name for p in recognise.CONFIG_DIR.glob("*.yaml"))


def meta(*shape: int) -> torch.Tensor:
    return torch.empty(shape, device="meta")


def cond_keys(params: dict) -> dict[str, torch.Tensor]:
    """The cond_stage_model.* keys (a representative few) the yaml's cond_stage_config implies."""
    cfg = params.get("cond_stage_config")
    target = cfg if isinstance(cfg, str) else cfg["target"].rsplit(".", 1)[-1]
    cp = (cfg.get("params") or {}) if isinstance(cfg, dict) else {}
    context = params["unet_config"]["params"].get("context_dim")
    if target == "FrozenCLIPEmbedder":  # transformers' CLIPTextModel, ViT-L/14
        base = COND + "transformer.text_model."
        return {
            base + "embeddings.token_embedding.weight": meta(49408, context),
            base + "encoder.layers.0.self_attn.k_proj.weight": meta(context, context),
        }
    if target == "FrozenOpenCLIPEmbedder":  # open_clip's text tower, ViT-H/14 (visual deleted)
        return {
            COND + "model.token_embedding.weight": meta(49408, context),
            COND + "model.transformer.resblocks.0.attn.in_proj_weight": meta(3 * context, context),
        }
    if target == "BERTEmbedder":  # the original x_transformer TransformerWrapper
        n = int(cp["n_embed"])
        return {
            COND + "transformer.token_emb.weight": meta(int(cp.get("vocab_size", 30522)), n),
            COND + "transformer.attn_layers.layers.0.1.to_q.weight": meta(n, n),
        }
    if target == "ClassEmbedder":
        return {COND + "embedding.weight": meta(int(cp.get("n_classes", 1000)), int(cp["embed_dim"]))}
    if target == "SpatialRescaler":
        return {COND + "channel_mapper.weight": meta(int(cp["out_channels"]), int(cp["in_channels"]), 1, 1)}
    assert target in ("__is_unconditional__", "__is_first_stage__", "Identity"), target
    return {}


def full_size_state(params: dict) -> dict[str, torch.Tensor]:
    """A full-size original state dict of meta tensors for the model a yaml's model.params describe."""
    with torch.device("meta"):
        unet = compvis.build_unet(params)
        autoencoder, _ = compvis.build_autoencoder(params)
    state = {UNET + k: v for k, v in unet.state_dict().items()}
    state.update({AE + k: v for k, v in autoencoder.state_dict().items()})
    state.update(cond_keys(params))
    state["alphas_cumprod"] = meta(int(params.get("timesteps", 1000)))
    return state


def read_params(name: str) -> dict:
    return compvis.read_yaml(recognise.CONFIG_DIR / name)


@pytest.mark.parametrize("name", BUILTIN)
def test_each_builtin_yaml_is_recognised_from_its_full_size_keys(name):
    state = full_size_state(read_params(name))
    assert recognise.recognise(state) == recognise.CONFIG_DIR / name
    assert [f.config for f in recognise.families_of(state)] == [name]  # no other family fits


def test_every_builtin_yaml_has_a_family_and_the_other_way_round():
    assert sorted(f.config for f in recognise.FAMILIES if f.builtin) == BUILTIN
    assert all(f.yaml.is_file() for f in recognise.FAMILIES if f.builtin)


def test_builtin_yamls_are_complete_inference_configs():
    for name in BUILTIN:
        text = (recognise.CONFIG_DIR / name).read_text()
        assert text.startswith("#"), f"{name}: a header saying which released weights it fits"
        raw = yaml.safe_load(text)
        assert set(raw) == {"model"} and set(raw["model"]) == {"target", "params"}, name
        assert compvis.is_compvis_yaml(recognise.CONFIG_DIR / name)


def test_sd_v1_reference_keys_are_recognised(reference_dir):
    """The real SD v1 key list (as the CompVis code builds it) + CLIP ViT-L/14 keys -> sd1.yaml."""
    keys = json.loads((reference_dir / "sd_v1_keys.json").read_text())["keys"]
    state = {k: meta(*shape) for k, shape in keys.items()}
    state.update(cond_keys(read_params("sd1.yaml")))
    state["alphas_cumprod"] = meta(1000)
    assert recognise.recognise(state) == recognise.CONFIG_DIR / "sd1.yaml"
    sig = recognise.signature(state)
    assert sig.unet == (4, 4, 320) and sig.context == 768 and sig.linear_proj is False
    assert sig.first_stage == ("kl", 8, 4) and sig.cond == "clip"


def sd2_params(parameterization: str) -> dict:
    """v2-inference.yaml / v2-inference-v.yaml: sd2_inpainting's values with a 4-channel input."""
    params = read_params("sd2_inpainting.yaml")
    params["unet_config"]["params"]["in_channels"] = 4
    params["parameterization"] = parameterization
    return params


def test_sd2_512_and_768_v_are_reported_as_ambiguous():
    state = full_size_state(sd2_params("v"))
    assert state.keys() == full_size_state(sd2_params("eps")).keys()  # nothing in the keys tells them apart
    with pytest.raises(UserError) as err:
        recognise.recognise(state, "sd21.ckpt")
    message = str(err.value)
    assert "\n" not in message and message.startswith("sd21.ckpt (key prefixes")
    assert "share every key and shape" in message and "context width 1024" in message
    assert "config=v2-inference.yaml" in message and "config=v2-inference-v.yaml" in message
    assert "epsilon" in message and "v-prediction" in message


def test_a_changed_shape_is_not_recognised():
    """Signatures read the most specific shapes: one of them off and the family no longer matches."""
    params = read_params("ldm_cin256_v2.yaml")
    state = full_size_state(params)
    state[COND + "embedding.weight"] = meta(1000, 512)  # cin256-v2 has the null class (1001 rows)
    assert recognise.recognise(state) is None
    state = full_size_state(read_params("sd1.yaml"))
    state = {k: v for k, v in state.items() if not k.startswith(COND)}  # a UNet + VAE only file
    assert recognise.recognise(state) is None


def test_unknown_state_names_what_was_found_and_the_supported_families():
    state = {
        UNET + "input_blocks.0.0.weight": torch.zeros(32, 4, 3, 3),
        UNET + "out.2.weight": torch.zeros(4, 32, 3, 3),
        AE + "encoder.down.0.block.0.conv1.weight": torch.zeros(8, 8, 3, 3),
        AE + "quant_conv.weight": torch.zeros(8, 8, 1, 1),
        "alphas_cumprod": torch.ones(1000),
    }
    assert recognise.recognise(state) is None
    with pytest.raises(UserError) as err:
        recognise.recognised_family(state, "odd.ckpt")
    message = str(err.value)
    assert message.startswith("odd.ckpt is an original CompVis/Stability checkpoint (key prefixes")
    assert "UNet in/out channels 4/4" in message and "pass config=<its inference yaml>" in message
    assert "Recognised without a yaml: SD 1.x, SD 1.x inpainting, SD 2.x inpainting" in message
    assert "LDM BSR super-resolution" in message and "\n" not in message


def test_load_model_without_config_on_the_tiny_file_says_it_is_unknown(tiny_sd):  # noqa: F811
    """The tiny reference model has SD v1 names but not its widths: not recognised, and said so."""
    root, _ = tiny_sd
    with pytest.raises(UserError, match=r"no supported family matches.*Recognised without a yaml: SD 1\.x"):
        load_model(root / "tiny-sd.safetensors")


def test_load_model_without_config_uses_the_recognised_family(tiny_sd, clip, monkeypatch, caplog):  # noqa: F811
    """load_model wiring: a recognised family's yaml is loaded as if passed, its name recorded and logged."""
    from safetensors.torch import load_file

    root, _ = tiny_sd
    state = load_file(str(root / "tiny-sd.safetensors"))
    tiny = recognise.Family("tiny SD 1.x", str(root / "v1-tiny.yaml"), recognise.signature(state))
    monkeypatch.setattr(recognise, "FAMILIES", (*recognise.FAMILIES, tiny))
    with caplog.at_level(logging.INFO, logger="ldm.interop.recognise"):
        loaded = load_model(root / "tiny-sd.safetensors", text_encoder=str(clip[1]))
    assert loaded.format == "compvis" and loaded.used_ema
    assert loaded.config["family"] == "tiny SD 1.x" and loaded.config["config"] == str(root / "v1-tiny.yaml")
    assert "recognised as tiny SD 1.x" in caplog.text
    reference = load_model(
        root / "tiny-sd.safetensors", config=root / "v1-tiny.yaml", text_encoder=str(clip[1])
    )
    for k, v in reference.model.unet.state_dict().items():
        assert torch.equal(loaded.model.unet.state_dict()[k], v)
