"""LoRA files (kohya / AUTOMATIC1111 and diffusers / peft conventions), foreign forms, and merge_lora.

The tiny SD 1.x-structured base of tests/sd_fixtures.py (`sd_base`) gets peft LoRA layers on every UNet target
group (attn, proj = the 1x1-conv proj_in/out, ff, conv = LoCon 3x3 convs with their own rank and alpha) and on
the text encoder, with random non-zero up (lora_B) weights, so every layer changes the output.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ldm.adapters import lora as L
from ldm.adapters.lora_files import file_names, load_lora, save_lora
from ldm.adapters.unet_names import diffusers_path, num_res_blocks, unet_module_map
from ldm.errors import UserError
from ldm.interop.load import load_model
from ldm.interop.merge_lora import main as merge_main

TOL = 1e-5
PROMPTS = ["a red circle", ""]
RANK, ALPHA, CONV_RANK, CONV_ALPHA, TEXT_ALPHA = 4, 8.0, 2, 1.0, 2.0


def fresh(sd_base):
    base, yaml, tokenizer = sd_base
    return load_model(base, config=yaml, text_encoder=str(tokenizer)).model


def inputs():
    g = torch.Generator().manual_seed(3)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 700]), torch.randn(2, 77, 64, generator=g)


@torch.no_grad()
def outputs(model, dtype=torch.float32):
    """(UNet output (2, 4, 8, 8) at fixed x, t, context; text-encoder states (2, 77, 64) of PROMPTS)."""
    x, t, context = inputs()
    text = model.conditioner.conditioners["text"].encode_prompts(PROMPTS)
    return model.unet(x.to(dtype), t, context=context.to(dtype)), text


def adapted(sd_base, seed: int, groups=("attn", "proj", "ff", "conv"), text: bool = True):
    """A peft-wrapped base with lora_A ~ N(0, 1/fan_in), lora_B ~ 0.05 N(0, 1) (seeded): (model, adapters)."""
    model = fresh(sd_base)
    L.add_lora(model.unet, L.unet_targets(model.unet, groups), RANK, ALPHA, 0.0, CONV_RANK, CONV_ALPHA)
    if text:
        transformer = model.conditioner.conditioners["text"].transformer
        L.add_lora(transformer, L.text_targets(transformer, ("attn", "ff")), RANK, TEXT_ALPHA)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # seeded (peft's own lora_A init draws from the global RNG)
        for name, p in model.named_parameters():
            if "lora_A" in name:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
            elif "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model, L.lora_state(model)


@pytest.fixture(scope="module")
def lora_a(sd_base, tmp_path_factory):
    """(adapters, peft model outputs in float32, {convention: file}, the same outputs in float64)."""
    model, adapters = adapted(sd_base, 0)
    out = tmp_path_factory.mktemp("lora_a")
    meta = {"base_model": "tiny-sd.safetensors", "weights_identity": "0123456789abcdef", "rank": RANK}
    files = {
        c: save_lora(out / f"{c}.safetensors", adapters, convention=c, metadata=meta, model=model)
        for c in ("kohya", "diffusers")
    }
    ref32 = outputs(model)
    adapters = {k: L.LoraWeights(w.down.clone(), w.up.clone(), w.alpha) for k, w in adapters.items()}
    return adapters, ref32, files, outputs(model.double(), torch.float64)


def assert_same(loaded, adapters):
    assert sorted(loaded) == sorted(adapters)
    for k, w in adapters.items():
        assert torch.equal(loaded[k].down, w.down) and torch.equal(loaded[k].up, w.up), k
        assert loaded[k].alpha == w.alpha, k


def close(theirs, ours, tol=TOL) -> float:
    error = (theirs.float() - ours.float()).abs().max().item()
    assert error < tol, f"max abs error {error:.2e}"
    return error


# -- module-path mapping ----------------------------------------------------------------------------------


def test_unet_map_equals_diffusers_converter_on_tiny_sd(sd_base):
    """Every weight of the tiny UNet lands, through our module map, on the key diffusers' own converter
    gives it, with the same values (1x1 proj convs compared as stored)."""
    import yaml

    sfu = pytest.importorskip("diffusers.loaders.single_file_utils")
    base, yaml_path, _ = sd_base
    state = load_file(str(base))
    config = yaml.safe_load(yaml_path.read_text())
    converted = sfu.convert_ldm_unet_checkpoint(
        state, sfu.create_unet_diffusers_config_from_ldm(config, state)
    )
    unet = fresh(sd_base).unet
    assert num_res_blocks(unet) == 2
    table = unet_module_map(unet)
    ours = unet.state_dict()
    seen = set()
    for key, value in ours.items():
        module, param = key.rsplit(".", 1)
        theirs = f"{table[module]}.{param}"
        assert torch.equal(converted[theirs].reshape(value.shape), value), key
        seen.add(theirs)
    assert len(ours) == len(seen) == len(converted) == 684


@pytest.mark.parametrize("version", ["sd1", "sd2"])
def test_unet_map_names_full_size_sd(version):
    """Full-size SD 1.x (1x1-conv proj) and SD 2.x (linear proj, 64-channel heads) UNets, built on the meta
    device: all 686 weight names equal diffusers' converter's (followed through placeholder tensors)."""
    import copy

    from test_interop import SD_V1_YAML

    sfu = pytest.importorskip("diffusers.loaders.single_file_utils")
    from ldm.interop import compvis
    from ldm.interop.diffusers_io import _inverse

    config = copy.deepcopy(SD_V1_YAML)
    if version == "sd2":
        unet_params = config["model"]["params"]["unet_config"]["params"]
        unet_params.pop("num_heads")
        unet_params.update(num_head_channels=64, use_linear_in_transformer=True, context_dim=1024)
    with torch.device("meta"):
        unet = compvis.build_unet(config["model"]["params"])
    shapes = {compvis.UNET + k: tuple(v.shape) for k, v in unet.state_dict().items()}
    meta = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    names = _inverse(
        sfu.convert_ldm_unet_checkpoint, shapes, sfu.create_unet_diffusers_config_from_ldm(config, meta)
    )
    table = unet_module_map(unet)
    expected = {v[len(compvis.UNET) :]: k for k, v in names.items()}
    mapped = {k: f"{table[k.rsplit('.', 1)[0]]}.{k.rsplit('.', 1)[1]}" for k in expected}
    assert mapped == expected and len(expected) == 686
    assert diffusers_path("output_blocks.8.2.conv", 2) == "up_blocks.2.upsamplers.0.conv"
    assert diffusers_path("input_blocks.9.0.op", 2) == "down_blocks.2.downsamplers.0.conv"


# -- our two conventions ----------------------------------------------------------------------------------


def test_kohya_file_layout(lora_a):
    adapters, _, files, _ = lora_a
    tensors = load_file(str(files["kohya"]))
    with safe_open(str(files["kohya"]), "pt") as f:
        meta = f.metadata()
    assert len(adapters) == 289 and len(tensors) == 3 * 289
    shapes = {
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight": (4, 32),
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 32, 1, 1),
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": (32, 4, 1, 1),
        "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight": (2, 32, 3, 3),
        "lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight": (32, 2, 1, 1),
        "lora_unet_up_blocks_2_upsamplers_0_conv.lora_down.weight": (2, 32, 3, 3),
        "lora_unet_mid_block_resnets_1_time_emb_proj.lora_up.weight": (64, 4),
        "lora_te_text_model_encoder_layers_1_mlp_fc2.lora_down.weight": (4, 128),
    }
    assert {k: tuple(tensors[k].shape) for k in shapes} == shapes
    alpha = tensors["lora_unet_down_blocks_0_attentions_0_proj_in.alpha"]
    assert alpha.shape == () and alpha.item() == ALPHA
    assert tensors["lora_unet_down_blocks_0_resnets_0_conv1.alpha"].item() == CONV_ALPHA
    assert tensors["lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha"].item() == TEXT_ALPHA
    assert (meta["ss_network_module"], meta["ss_network_dim"], meta["ss_network_alpha"]) == (
        "networks.lora",
        "4",
        "8.0",
    )
    assert (meta["ss_v2"], meta["ss_sd_model_name"]) == ("False", "tiny-sd.safetensors")
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ldm_base_model"] == "tiny-sd.safetensors"
    assert meta["ldm_base_identity"] == "0123456789abcdef"
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "1"}


def test_diffusers_file_layout(lora_a):
    files = lora_a[2]
    tensors = load_file(str(files["diffusers"]))
    with safe_open(str(files["diffusers"]), "pt") as f:
        config = json.loads(f.metadata()["lora_adapter_metadata"])
    assert len(tensors) == 2 * 289
    assert tensors["unet.up_blocks.3.attentions.2.proj_out.lora_B.weight"].shape == (32, 4, 1, 1)
    assert tensors["text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight"].shape == (4, 64)
    assert (config["unet.r"], config["unet.lora_alpha"], config["text_encoder.lora_alpha"]) == (4, 8.0, 2.0)
    assert config["unet.rank_pattern"]["down_blocks.0.resnets.0.conv1"] == 2
    assert config["unet.alpha_pattern"]["up_blocks.0.upsamplers.0.conv"] == 1.0
    assert len(config["unet.target_modules"]) == 277 and len(config["text_encoder.target_modules"]) == 2 * 6


@pytest.mark.parametrize("convention", ["kohya", "diffusers"])
def test_round_trip_and_merge(sd_base, lora_a, convention, tmp_path):
    """Saved and loaded back: the same tensors and alphas (exact); merged into a fresh model: the peft model's
    UNet output and text states within 1e-5. Without the model, save_lora names the same keys (SD's n=2).

    Compared in float64: this tiny UNet moves its output by ~7e-6 between float32 and float64 alone (W + dW
    rounded once vs W x + B A x rounded per layer differ by up to 7e-5 in float32 across seeds); in float64
    only merge_lora's float32 delta remains (measured: UNet 1.7e-6, text states 2.4e-7)."""
    adapters, (unet32, _), files, (unet_ref, text_ref) = lora_a
    model = fresh(sd_base)
    base_unet, base_text = outputs(model)
    loaded = load_lora(files[convention], model)
    assert_same(loaded, adapters)
    assert L.merge_lora(model.double(), loaded) == 289
    unet_out, text_out = outputs(model, torch.float64)
    close(unet_out, unet_ref)
    close(text_out, text_ref)
    assert (unet_ref - base_unet).abs().max() > 0.05 and (text_ref - base_text).abs().max() > 0.05
    bare = save_lora(tmp_path / "bare.safetensors", adapters, convention=convention)
    assert sorted(load_file(str(bare))) == sorted(load_file(str(files[convention])))


# -- the real peer: diffusers loads our files -------------------------------------------------------------


@pytest.fixture(scope="module")
def diffusers_folder(sd_base, tmp_path_factory):
    pytest.importorskip("diffusers")
    from ldm.interop import export
    from ldm.interop.diffusers_io import export_diffusers

    base, yaml, tokenizer = sd_base
    folder = tmp_path_factory.mktemp("lora_peer") / "tiny_diffusers"
    export_diffusers(export.load_source(base, yaml, str(tokenizer)), folder)
    return folder


@pytest.mark.parametrize("convention", ["diffusers", "kohya"])
def test_diffusers_loads_our_lora(lora_a, diffusers_folder, convention):
    """`StableDiffusionPipeline.load_lora_weights` (diffusers 0.42, offline) on our file: its UNet output and
    text-encoder states equal the peft-wrapped model's within 1e-5 (alpha != rank, LoCon with its own
    rank/alpha: diffusers reads lora_adapter_metadata resp. converts the kohya keys and .alpha itself)."""
    import diffusers

    _, (unet_ref, text_ref), files, _ = lora_a
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(diffusers_folder, local_files_only=True)
    pipe.load_lora_weights(str(files[convention]))
    x, t, context = inputs()
    ids = pipe.tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        close(pipe.unet(x, t, encoder_hidden_states=context).sample, unet_ref)
        close(pipe.text_encoder(ids.input_ids)[0], text_ref)


# -- foreign forms ----------------------------------------------------------------------------------------


def _by_rank(adapters):
    """The adapters with alpha = rank: what a file without alphas means."""
    return {k: L.LoraWeights(w.down, w.up, float(w.rank)) for k, w in adapters.items()}


def test_foreign_forms_load_to_the_same_weights(sd_base, lora_a, tmp_path):
    """Hand-written files in the older forms load to the same LoraWeights: kohya with CompVis UNet names and
    lora_te1_ text keys and no alphas (alpha = rank); 2-D down/up for the 1x1 proj convs; diffusers'
    attention-processor names (+ .lora.down/up), also without the unet. prefix (`save_attn_procs`); peft
    lora_A.default without metadata; a .pt pickle."""
    adapters = lora_a[0]
    model = fresh(sd_base)
    compvis, processor, peft = {}, {}, {}
    for path, w in adapters.items():
        down, up = w.down, w.up
        if down.ndim == 4 and down.shape[2:] == (1, 1):
            down, up = down.flatten(1), up.flatten(1)
        kohya, dotted = file_names(path)
        name = "lora_unet_" + path[len("unet.") :].replace(".", "_") if path.startswith("unet.") else kohya
        name = name.replace("lora_te_", "lora_te1_")
        compvis |= {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up}
        head, _, last = dotted.rpartition(".")
        if ".attn" in dotted and last in ("to_q", "to_k", "to_v", "0"):
            which = "to_out" if last == "0" else last
            head = head.removesuffix(".to_out") if last == "0" else head
            processor |= {
                f"{head}.processor.{which}_lora.down.weight": down,
                f"{head}.processor.{which}_lora.up.weight": up,
            }
        else:
            processor |= {f"{dotted}.lora.down.weight": down, f"{dotted}.lora.up.weight": up}
        peft |= {f"{dotted}.lora_A.default.weight": w.down, f"{dotted}.lora_B.default.weight": w.up}
    for name, tensors in (("compvis", compvis), ("processor", processor), ("peft", peft)):
        save_file(tensors, tmp_path / f"{name}.safetensors")
        assert_same(load_lora(tmp_path / f"{name}.safetensors", model), _by_rank(adapters))
    assert sum(".processor.to_out_lora." in k for k in processor) == 2 * 2 * 16  # down+up, attn1+2, 16 blocks
    procs = {k[len("unet.") :]: v for k, v in processor.items() if k.startswith("unet.")}  # save_attn_procs
    save_file(procs, tmp_path / "attn_procs.safetensors")
    unet_only = {k: w for k, w in _by_rank(adapters).items() if k.startswith("unet.")}
    assert_same(load_lora(tmp_path / "attn_procs.safetensors", model), unet_only)
    assert len(unet_only) == 277
    torch.save(peft, tmp_path / "peft.pt")
    assert_same(load_lora(tmp_path / "peft.pt", model), _by_rank(adapters))


def _bad_files(root: Path, sd_base) -> dict[str, tuple[Path, str]]:
    """{case: (file, expected words)} of inputs load_lora must refuse."""
    q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    cases = {
        "not_safetensors": ({}, "not a safetensors file"),
        "full_checkpoint": (None, "full model checkpoint"),
        "sdxl": (
            {
                "lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q.lora_down.weight": torch.zeros(
                    4, 640
                ),
                "lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q.lora_up.weight": torch.zeros(
                    640, 4
                ),
            },
            r"lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q\.lora_down\.weight names no layer",
        ),
        "width": (
            {f"{q}.lora_down.weight": torch.zeros(4, 320), f"{q}.lora_up.weight": torch.zeros(320, 4)},
            rf"{q}\.lora_down\.weight has down \(4, 320\) / up \(320, 4\), which do not fit",
        ),
        "loha": (
            {f"{q}.hada_w1_a": torch.zeros(32, 4), f"{q}.hada_w1_b": torch.zeros(4, 32)},
            "LyCORIS LoHa",
        ),
        "lokr": ({f"{q}.lokr_w1": torch.zeros(4, 4), f"{q}.lokr_w2": torch.zeros(8, 8)}, "LyCORIS LoKr"),
        "pickle_code": (None, "stores Python objects"),
        "missing": (None, "no such file"),
    }
    out = {}
    for case, (tensors, words) in cases.items():
        path = root / f"{case}.safetensors"
        if case == "not_safetensors":
            path.write_bytes(b"not a safetensors header at all")
        elif case == "full_checkpoint":
            path = sd_base[0]
        elif case == "pickle_code":
            path = root / "code.pt"
            torch.save({"args": argparse.Namespace(rank=4)}, path)
        elif tensors is not None:
            save_file(tensors, path)
        out[case] = (path, words)
    return out


def test_bad_lora_files_raise_one_user_error(sd_base, tmp_path):
    model = fresh(sd_base)
    for case, (path, words) in _bad_files(tmp_path, sd_base).items():
        with pytest.raises(UserError, match=words) as info:
            load_lora(path, model)
        assert path.name in str(info.value), case
        if case in ("sdxl", "width", "loha", "lokr", "full_checkpoint"):
            assert "supported" in str(info.value) or "another base model" in str(info.value), case


# -- merge_lora CLI ---------------------------------------------------------------------------------------


def test_merge_lora_cli_writes_base_plus_scaled_loras(sd_base, lora_a, tmp_path):
    """main([BASE, A (kohya), B (diffusers), OUT, --scales 0.8 0.5]): OUT + OUT.yaml load with load_model and
    give base + 0.8 A + 0.5 B (merged in memory) within 1e-5; the base file is left as it was."""
    base, yaml, tokenizer = sd_base
    adapters_a, _, files, _ = lora_a
    _, adapters_b = adapted(sd_base, 1, groups=("attn", "ff"), text=False)
    file_b = save_lora(tmp_path / "b.safetensors", adapters_b, convention="diffusers")
    before = base.read_bytes()
    out = tmp_path / "merged.safetensors"
    argv = [str(base), str(files["kohya"]), str(file_b), str(out), "--scales", "0.8", "0.5"]
    assert merge_main([*argv, "--config", str(yaml), "--text-encoder", str(tokenizer)]) == 0
    assert out.is_file() and out.with_suffix(".yaml").read_text() == yaml.read_text()
    assert base.read_bytes() == before
    merged = load_model(out, config=out.with_suffix(".yaml"), text_encoder=str(tokenizer)).model
    expected = fresh(sd_base)
    base_unet, base_text = outputs(expected)
    L.merge_lora(expected, adapters_a, 0.8)
    L.merge_lora(expected, adapters_b, 0.5)
    for theirs, ours, before_merge in zip(
        outputs(merged), outputs(expected), (base_unet, base_text), strict=True
    ):
        close(theirs, ours)
        assert (ours - before_merge).abs().max() > 0.05  # the LoRAs do change both
    with safe_open(str(out), "pt") as f:
        assert not any(k.startswith("model_ema.") for k in f.keys())


def test_merge_lora_cli_refuses_bad_arguments(sd_base, lora_a, tmp_path, capsys):
    base, yaml, tokenizer = sd_base
    files = lora_a[2]
    extra = ["--config", str(yaml), "--text-encoder", str(tokenizer)]
    before, yaml_before = base.read_bytes(), yaml.read_text()
    out = tmp_path / "out.safetensors"
    cases = [
        ([str(base), str(files["kohya"]), str(base)], "would overwrite the input"),
        (
            [str(base), str(files["kohya"]), str(yaml.with_suffix(".safetensors"))],
            r"overwrite the input .*\.yaml",
        ),
        (
            [str(base), str(files["kohya"]), str(out), "--scales", "0.8", "0.5"],
            r"--scales has 2 value\(s\) for 1",
        ),
        ([str(base), str(tmp_path / "none.safetensors"), str(out)], "no such file"),
        ([str(base), str(files["kohya"]), str(tmp_path / "out.ckpt")], r"name it \*\.safetensors"),
    ]
    for argv, words in cases:
        assert merge_main([*argv, *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and len(err.splitlines()) == 1
        assert re.search(words, err), err
    assert (
        base.read_bytes() == before
        and yaml.read_text() == yaml_before
        and not out.exists()
        and sorted(p.name for p in tmp_path.iterdir()) == []
    )
