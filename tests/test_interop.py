"""Loading stage-2 models: train.py exports and Lightning checkpoints, and original CompVis / SD v1 files."""

import copy
import json

import pytest
import torch
import yaml
from hydra.utils import instantiate
from ldm_fixtures import autoencoder_config, save_autoencoder, stage2_config
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ldm.errors import UserError
from ldm.interop import compvis
from ldm.interop.checkpoint import save_safetensors
from ldm.interop.load import load_model

UNET, AE = "model.diffusion_model.", "first_stage_model."
SD_V1_YAML = {  # configs/stable-diffusion/v1-inference.yaml (training-only keys left out)
    "model": {
        "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
        "params": {
            "linear_start": 0.00085,
            "linear_end": 0.0120,
            "timesteps": 1000,
            "image_size": 64,
            "channels": 4,
            "conditioning_key": "crossattn",
            "scale_factor": 0.18215,
            "use_ema": False,
            "unet_config": {
                "target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
                "params": {
                    "image_size": 32,
                    "in_channels": 4,
                    "out_channels": 4,
                    "model_channels": 320,
                    "attention_resolutions": [4, 2, 1],
                    "num_res_blocks": 2,
                    "channel_mult": [1, 2, 4, 4],
                    "num_heads": 8,
                    "use_spatial_transformer": True,
                    "transformer_depth": 1,
                    "context_dim": 768,
                    "use_checkpoint": True,
                    "legacy": False,
                },
            },
            "first_stage_config": {
                "target": "ldm.models.autoencoder.AutoencoderKL",
                "params": {
                    "embed_dim": 4,
                    "monitor": "val/rec_loss",
                    "ddconfig": {
                        "double_z": True,
                        "z_channels": 4,
                        "resolution": 256,
                        "in_channels": 3,
                        "out_ch": 3,
                        "ch": 128,
                        "ch_mult": [1, 2, 4, 4],
                        "num_res_blocks": 2,
                        "attn_resolutions": [],
                        "dropout": 0.0,
                    },
                    "lossconfig": {"target": "torch.nn.Identity"},
                },
            },
            "cond_stage_config": {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder"},
        },
    }
}
CLIP_WIDTH = 64  # = the reference UNet's context_dim


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models on 2 shared cores: a second intra-op thread costs more in barriers than it saves."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# -- an offline CLIP tokenizer and text model -------------------------------------------------------------


def byte_alphabet() -> list[str]:
    """GPT-2/CLIP byte -> printable-unicode table: every byte has a base token, so any text tokenizes."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    extra = [b for b in range(256) if b not in printable]
    return [chr(c) for c in printable] + [chr(256 + i) for i in range(len(extra))]


def tiny_clip_tokenizer(folder):
    """A CLIPTokenizer over bytes plus a few merges ('red', 'circle'), written with save_pretrained."""
    from transformers import CLIPTokenizer

    chars = byte_alphabet()
    vocab = {t: i for i, t in enumerate(chars + [c + "</w>" for c in chars])}
    merges = ["r e", "re d</w>", "c i", "ci r", "cir c", "l e</w>", "circ le</w>"]
    for m in merges:
        vocab["".join(m.split())] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"))
    tokenizer.save_pretrained(folder)
    return tokenizer


def tiny_clip_text_model(tokenizer, width: int = 64, seed: int = 0):
    """A random 2-layer CLIPTextModel (quick_gelu, as OpenAI's CLIP) over `tokenizer`'s vocabulary."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=2,
        num_attention_heads=1,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return CLIPTextModel(config).eval()


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """(full save_pretrained folder, tokenizer-only folder, the CLIPTextModel) — random, 2 layers, 64 wide."""
    root = tmp_path_factory.mktemp("clip")
    tokenizer = tiny_clip_tokenizer(root / "tokenizer_only")
    model = tiny_clip_text_model(tokenizer, CLIP_WIDTH)
    model.save_pretrained(root / "full")
    tokenizer.save_pretrained(root / "full")
    return root / "full", root / "tokenizer_only", model


def compvis_text_state(model) -> dict:
    """A CLIPTextModel's weights under CompVis names (the `text_model.` level SD v1 files have)."""
    state = {"cond_stage_model.transformer.text_model." + k: v for k, v in model.state_dict().items()}
    state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    return state


@pytest.fixture(scope="module")
def tiny_sd(reference_dir, clip, tmp_path_factory):
    """A tiny SD-v1-style checkpoint (reference UNet as EMA, noised raw UNet, autoencoder, CLIP) + yaml."""
    path = reference_dir / "sd_v1_tiny.safetensors"
    tensors = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        meta = {k: json.loads(v) for k, v in f.metadata().items()}
    gen = torch.Generator().manual_seed(1)
    state = {}
    for k, v in tensors.items():
        if k.startswith(UNET):
            name = k[len(UNET) :]
            state[compvis.ema_key(name)] = v  # the reference weights are the EMA ones ...
            state[k] = v + 0.05 * torch.randn(v.shape, generator=gen).to(v.dtype)  # ... raw ones differ
        elif k.startswith(AE):
            state[k] = v
    state["model_ema.decay"] = torch.tensor(0.9999)
    state["model_ema.num_updates"] = torch.tensor(1000)
    state["scale_factor"] = torch.tensor(0.18215)
    state["alphas_cumprod"] = tensors["io.alphas_cumprod"]
    state.update(compvis_text_state(clip[2]))
    params = copy.deepcopy(SD_V1_YAML)
    p = params["model"]["params"]
    p["image_size"] = 8
    p["unet_config"]["params"] = {**meta["unet"], "use_checkpoint": True}
    p["first_stage_config"]["params"]["ddconfig"] = meta["autoencoder"]["ddconfig"]
    root = tmp_path_factory.mktemp("tiny_sd")
    (root / "v1-tiny.yaml").write_text(yaml.safe_dump(params))
    torch.save({"state_dict": state, "global_step": 1}, root / "tiny-sd.ckpt")
    save_file({k: v.contiguous() for k, v in state.items()}, root / "tiny-sd.safetensors")
    return root, tensors


# -- CompVis / SD v1 -------------------------------------------------------------------------------------


def test_every_sd_v1_key_maps_to_one_of_our_parameters(reference_dir):
    keys = json.loads((reference_dir / "sd_v1_keys.json").read_text())["keys"]
    params = SD_V1_YAML["model"]["params"]
    with torch.device("meta"):
        unet = compvis.build_unet(params)
        autoencoder, _ = compvis.build_autoencoder(params)
    ours = {"unet." + k: tuple(v.shape) for k, v in unet.state_dict().items()}
    ours.update({"first_stage.autoencoder." + k: tuple(v.shape) for k, v in autoencoder.state_dict().items()})
    mapped = {compvis.to_our_names(k): tuple(shape) for k, shape in keys.items()}
    assert None not in mapped
    assert len(mapped) == len(keys) == 934  # one to one
    assert sorted(set(mapped) - set(ours)) == []
    assert sorted(set(ours) - set(mapped)) == []
    assert {k: s for k, s in mapped.items() if ours[k] != s} == {}
    assert sum(v.numel() for v in unet.parameters()) == 859_520_964


def test_clip_text_keys_map_to_our_text_encoder(clip):
    from transformers import CLIPTextModel

    ours = set(CLIPTextModel(clip[2].config).state_dict())
    for key in compvis_text_state(clip[2]):
        name = compvis.to_our_names(key)
        if key.endswith("position_ids"):
            assert name is None  # a constant newer transformers reject
        else:
            assert name.startswith("conditioner.conditioners.text.transformer.")
            assert name[len("conditioner.conditioners.text.transformer.") :] in ours


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_compvis_checkpoint_reproduces_reference_unet(tiny_sd, clip, suffix):
    root, io = tiny_sd
    loaded = load_model(root / f"tiny-sd{suffix}", config=root / "v1-tiny.yaml", text_encoder=str(clip[0]))
    module = loaded.model
    assert loaded.format == "compvis" and loaded.used_ema
    assert loaded.image_size == 64  # latent image_size 8 x f 8
    with torch.no_grad():
        eps = module.net(io["io.x"], io["io.t"], context=io["io.context"])
    torch.testing.assert_close(eps, io["io.eps"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(module.loss.schedule.alphas_cumprod, io["io.alphas_cumprod"].float())
    assert float(module.first_stage.scale_factor) == pytest.approx(0.18215)
    with torch.no_grad():  # the first stage: CompVis decoder(post_quant_conv(posterior mean))
        decoded = module.first_stage.autoencoder.decode(io["io.posterior_mean"])
    torch.testing.assert_close(decoded, io["io.decoded"], rtol=1e-4, atol=1e-4)
    # The CLIP text encoder: the checkpoint's weights, giving what transformers' CLIPTextModel gives.
    text = module.conditioner.conditioners["text"]
    ids = text.tokenizer(["a red circle"], padding="max_length", max_length=77, return_tensors="pt")[
        "input_ids"
    ]
    with torch.no_grad():
        expected = clip[2](input_ids=ids).last_hidden_state
    torch.testing.assert_close(text.encode_prompts(["a red circle"]), expected)
    torch.testing.assert_close(
        text.null_context,
        clip[2](
            input_ids=text.tokenizer([""], padding="max_length", max_length=77, return_tensors="pt")[
                "input_ids"
            ]
        ).last_hidden_state.detach(),
    )


def test_compvis_raw_weights_and_tokenizer_only_folder(tiny_sd, clip):
    root, io = tiny_sd
    # use_ema=false takes model.diffusion_model.* (noised here), a tokenizer-only folder the text config
    # read off the checkpoint's weights.
    loaded = load_model(
        root / "tiny-sd.ckpt", config=root / "v1-tiny.yaml", use_ema=False, text_encoder=str(clip[1])
    )
    assert not loaded.used_ema
    with torch.no_grad():
        eps = loaded.model.net(io["io.x"], io["io.t"], context=io["io.context"])
        want = clip[2](
            input_ids=loaded.model.conditioner.conditioners["text"].tokenizer(
                ["a red circle"], padding="max_length", max_length=77, return_tensors="pt"
            )["input_ids"]
        ).last_hidden_state
    assert (eps - io["io.eps"]).abs().max() > 1e-3
    got = loaded.model.conditioner.conditioners["text"].encode_prompts(["a red circle"])
    torch.testing.assert_close(got, want)


def test_compvis_inpainting_yaml_builds_a_hybrid_conditioner(tiny_sd, clip, tmp_path):
    """SD-inpainting (conditioning_key hybrid): cat([z_t, mask, E(masked image)]) + CLIP cross-attention."""
    root, io = tiny_sd
    params = yaml.safe_load((root / "v1-tiny.yaml").read_text())
    p = params["model"]["params"]
    p["conditioning_key"] = "hybrid"
    p["unet_config"]["params"]["in_channels"] = 9
    (tmp_path / "inpaint.yaml").write_text(yaml.safe_dump(params))
    unet = compvis.build_unet(p)
    state = {
        k: v for k, v in load_file(str(root / "tiny-sd.safetensors")).items() if not k.startswith("model")
    }
    state.update({UNET + k: v for k, v in unet.state_dict().items()})
    save_file(state, tmp_path / "inpaint.safetensors")
    loaded = load_model(
        tmp_path / "inpaint.safetensors", config=tmp_path / "inpaint.yaml", text_encoder=str(clip[0])
    )
    assert loaded.input_keys == ("masked_image", "mask", "caption") and not loaded.used_ema
    assert loaded.model.conditioner.concat_channels == 5
    assert all(torch.equal(loaded.model.unet.state_dict()[k], v) for k, v in unet.state_dict().items())


def test_compvis_errors_name_the_fix(tiny_sd, tmp_path):
    root, _ = tiny_sd
    with pytest.raises(UserError, match="pass config=.*v1-inference.yaml"):
        load_model(root / "tiny-sd.ckpt")  # no yaml
    with pytest.raises(UserError, match="text_encoder="):
        load_model(root / "tiny-sd.ckpt", config=root / "v1-tiny.yaml")  # no tokenizer
    with pytest.raises(UserError, match="not a folder with CLIP tokenizer files"):
        load_model(root / "tiny-sd.ckpt", config=root / "v1-tiny.yaml", text_encoder=str(tmp_path))
    with pytest.raises(UserError, match="no such file"):
        load_model(root / "tiny-sd.ckpt", config=tmp_path / "missing.yaml", text_encoder=str(tmp_path))
    bad = yaml.safe_load((root / "v1-tiny.yaml").read_text())
    bad["model"]["params"]["cond_stage_config"] = {
        "target": "ldm.modules.encoders.modules.FrozenCLIPT5Encoder"  # SD 2's OpenCLIP is supported (sd2)
    }
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(UserError, match="FrozenCLIPT5Encoder is not supported"):
        load_model(root / "tiny-sd.ckpt", config=tmp_path / "bad.yaml")


# -- train.py files ------------------------------------------------------------------------------------------

AUTOENCODER = autoencoder_config(32, (1, 1))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny class-conditional stage-2 module whose EMA differs from its raw weights, saved both ways."""
    root = tmp_path_factory.mktemp("trained")
    torch.manual_seed(0)
    ae_path = save_autoencoder(root / "ae" / "model.safetensors", AUTOENCODER)
    label = {"_target_": "ldm.conditioning.ClassEmbedder", "n_classes": 3, "output": "class"}
    cfg = stage2_config(ae_path, {"label": label}, scale_factor=0.7, ema_decay=0.5, num_classes=4)
    module = instantiate(copy.deepcopy(cfg))
    with torch.no_grad():
        for p in module.unet.parameters():
            p.add_(0.1 * torch.randn_like(p))  # raw weights move away from the EMA copy
    run_config = module.export_config({"model": cfg, "data": {"resolution": 16}})
    torch.save(
        {"state_dict": module.state_dict(), "ldm_config": run_config, "global_step": 1}, root / "last.ckpt"
    )
    save_safetensors(module.export_state_dict(), root / "export" / "model.safetensors", run_config)
    ema = {n: module.ema._names[n] for n, _ in module.model.named_parameters() if n.startswith("unet.")}
    ema_weights = {n[5:]: getattr(module.ema, b).clone() for n, b in ema.items()}
    assert ema_weights
    raw_weights = {k: v.clone() for k, v in module.unet.state_dict().items()}
    return root, ema_weights, raw_weights, ae_path


def _unet_equals(module, weights) -> bool:
    state = module.unet.state_dict()
    return all(torch.equal(state[k], v) for k, v in weights.items())


def test_lightning_ckpt_and_export_load_the_right_weights(trained):
    root, ema_weights, raw_weights, _ = trained
    lightning = load_model(root / "last.ckpt")
    assert lightning.format == "lightning" and lightning.used_ema and lightning.image_size == 16
    assert _unet_equals(lightning.model, ema_weights)
    assert not hasattr(lightning.model, "ema")  # the plain model: sampling needs no EMA copy
    raw = load_model(root / "last.ckpt", use_ema=False)
    assert not raw.used_ema and _unet_equals(raw.model, raw_weights)
    assert not _unet_equals(raw.model, ema_weights)
    export = load_model(root / "export" / "model.safetensors")
    assert export.format == "export" and export.used_ema
    assert _unet_equals(export.model, ema_weights)
    assert export.input_keys == ("label",)
    assert float(export.model.first_stage.scale_factor) == pytest.approx(0.7)
    # The first stage comes from the file itself: the same decoder as the stage-1 autoencoder.
    ae_state = load_file(str(trained[3]))
    assert all(
        torch.equal(export.model.first_stage.autoencoder.state_dict()[k], v) for k, v in ae_state.items()
    )


def test_stage1_autoencoder_is_refused_with_what_it_is(trained):
    with pytest.raises(UserError, match=r"stage-1 autoencoder \(AutoencoderKL\).*needs a stage-2 model"):
        load_model(trained[3])


def test_files_without_config_or_broken(trained, tmp_path):
    save_file({"w": torch.zeros(2)}, tmp_path / "plain.safetensors")
    with pytest.raises(UserError, match="carries no run config"):
        load_model(tmp_path / "plain.safetensors")
    (tmp_path / "broken.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(UserError, match="not a valid safetensors file"):
        load_model(tmp_path / "broken.safetensors")
    with pytest.raises(UserError, match="not found"):
        load_model(tmp_path / "missing.ckpt")
