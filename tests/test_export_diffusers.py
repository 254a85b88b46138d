"""Interop with the real peer: a fine-tuned tiny SD model exported by us, loaded by diffusers (offline).

The tiny SD 1.x-structured model of tests/test_interop.py (`tiny_sd`: the SD v1 reference tiny weights, a tiny
random CLIPTextModel and tokenizer) gets every weight nudged, as a fine-tune would (raw and EMA differently),
then is exported both ways:

- the diffusers folder (`--format diffusers`), read back with `UNet2DConditionModel` / `AutoencoderKL` /
  `CLIPTextModel` / `CLIPTokenizer` `.from_pretrained` and the whole `StableDiffusionPipeline`;
- the original-layout single file, read by diffusers' single-file loader with local configs only
  (`from_single_file(path, config=<our folder>, original_config=<the yaml>, local_files_only=True)`).

UNet output, VAE decode and text-encoder states must equal ours within 1e-5; the scheduler's alphas_cumprod
ours within 1e-6. Then the folder is imported back as a base model (`load_model(<folder>)`).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_interop import clip, tiny_sd  # noqa: F401 - fixtures

from ldm.interop import export
from ldm.interop.load import load_model

diffusers = pytest.importorskip("diffusers", reason="pip install 'ldm[diffusers]' (part of .[dev])")
PROMPTS = ["a red circle", ""]
TOL = 1e-5


def _nudge(model: torch.nn.Module, seed: int, scale: float = 0.02) -> dict[str, torch.Tensor]:
    """Every parameter + scale * N(0, 1) (seeded): what a few fine-tuning steps do to the weights."""
    g = torch.Generator().manual_seed(seed)
    return {n: p.detach() + scale * torch.randn(p.shape, generator=g) for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def exported(tiny_sd, clip, tmp_path_factory):  # noqa: F811 - the fixture imported above
    """(ours with the EMA weights, single file, yaml, diffusers folder, tokenizer folder)."""
    root, _ = tiny_sd
    yaml, tokenizer = root / "v1-tiny.yaml", str(clip[1])
    source = export.load_source(root / "tiny-sd.safetensors", yaml, tokenizer)
    with torch.no_grad():  # a "fine-tune": raw weights moved, and EMA weights moved differently
        raw = _nudge(source.model, 0)
        for name, p in source.model.named_parameters():
            p.copy_(raw[name])
        ema = _nudge(source.model, 1, 0.01)
    source.ema = {k: v for k, v in ema.items() if k.startswith("unet.")}
    text_ema = {k: v for k, v in ema.items() if k.startswith("conditioner.")}
    source.ema.update(text_ema)  # a trainable text encoder's EMA goes with --ema-only / the folder
    out = tmp_path_factory.mktemp("export")
    single, folder = out / "tuned.safetensors", out / "tuned_diffusers"
    export.export_original(source, single, ema="only")
    from ldm.interop.diffusers_io import export_diffusers

    export_diffusers(source, folder, ema="only")
    ours = load_model(single, config=yaml, text_encoder=tokenizer)
    for name, p in ours.model.named_parameters():  # exactly the EMA weights (first stage: no EMA, raw)
        assert torch.equal(p, (source.ema if name in source.ema else raw)[name]), name
    return ours.model, single, yaml, folder, tokenizer


def _inputs(model):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([10, 700])
    context = torch.randn(2, 77, model.unet.context_dim, generator=g)
    z = torch.randn(2, 4, 8, 8, generator=g)
    return x, t, context, z


def _close(theirs: torch.Tensor, ours: torch.Tensor, tol: float = TOL) -> float:
    error = (theirs.float() - ours.float()).abs().max().item()
    assert ours.abs().max() > 0.05 and error < tol, f"max abs error {error:.2e}"
    return error


def _check_unet_vae(model, unet, vae) -> None:
    x, t, context, z = _inputs(model)
    with torch.no_grad():
        _close(unet(x, t, encoder_hidden_states=context).sample, model.unet(x, t, context=context))
        theirs = vae.decode(z / vae.config.scaling_factor).sample.clamp(-1, 1)
        _close(theirs, model.decode(z))
        image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(4)) * 2 - 1
        _close(vae.encode(image).latent_dist.mean * vae.config.scaling_factor, model.encode_fn(image))


def _check_text(model, text_encoder, tokenizer) -> None:
    ids = tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        theirs = text_encoder(ids.input_ids)[0]
        _close(theirs, model.conditioner.conditioners["text"].encode_prompts(PROMPTS))


def test_diffusers_folder_loads_with_from_pretrained(exported):
    model, _, _, folder, _ = exported
    from transformers import CLIPTextModel, CLIPTokenizer

    assert sorted(p.name for p in folder.iterdir()) == [
        "model_index.json",
        "scheduler",
        "text_encoder",
        "tokenizer",
        "unet",
        "vae",
    ]
    unet = diffusers.UNet2DConditionModel.from_pretrained(folder / "unet", local_files_only=True)
    vae = diffusers.AutoencoderKL.from_pretrained(folder / "vae", local_files_only=True)
    _check_unet_vae(model, unet.eval(), vae.eval())
    text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder", local_files_only=True).eval()
    _check_text(model, text_encoder, CLIPTokenizer.from_pretrained(folder / "tokenizer"))
    assert vae.config.scaling_factor == pytest.approx(float(model.first_stage.scale_factor))


def test_diffusers_pipeline_folder_and_scheduler(exported):
    model, _, _, folder, _ = exported
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    torch.testing.assert_close(
        pipe.scheduler.alphas_cumprod.float(), model.schedule.alphas_cumprod, rtol=1e-6, atol=1e-7
    )
    assert pipe.scheduler.config.prediction_type == "epsilon"
    _check_unet_vae(model, pipe.unet, pipe.vae)
    _check_text(model, pipe.text_encoder, pipe.tokenizer)


def test_single_file_loads_in_diffusers_with_local_configs(exported):
    model, single, yaml, folder, _ = exported
    for where in ({"original_config": str(yaml)}, {"config": str(folder)}):  # the yaml, or a local folder
        unet = diffusers.UNet2DConditionModel.from_single_file(
            str(single),
            **where,
            **({"subfolder": "unet"} if "config" in where else {}),
            local_files_only=True,
        )
        vae = diffusers.AutoencoderKL.from_single_file(
            str(single), **where, **({"subfolder": "vae"} if "config" in where else {}), local_files_only=True
        )
        _check_unet_vae(model, unet.eval(), vae.eval())
    # The whole pipeline needs the text encoder's and tokenizer's configs too: from the local folder (with
    # only original_config= diffusers would fetch openai/clip-vit-large-patch14's from the Hub).
    pipe = diffusers.StableDiffusionPipeline.from_single_file(
        str(single), config=str(folder), local_files_only=True
    )
    _check_unet_vae(model, pipe.unet, pipe.vae)
    _check_text(model, pipe.text_encoder, pipe.tokenizer)


def test_diffusers_folder_imports_as_a_base_model(exported):
    model, _, _, folder, _ = exported
    loaded = load_model(folder)  # the folder's own tokenizer/
    assert loaded.format == "diffusers" and loaded.image_size == 64
    back = loaded.model
    single = folder.parent / "from_folder.safetensors"  # and back to one original-layout file (+ its yaml)
    assert export.main([str(folder), str(single)]) == 0
    again = load_model(single, config=single.with_suffix(".yaml"), text_encoder=str(folder / "tokenizer"))
    assert load_file(str(single)).keys() >= {
        "cond_stage_model.transformer.text_model.final_layer_norm.weight"
    }
    theirs = again.model.state_dict()
    for name, value in model.state_dict().items():
        assert torch.equal(theirs[name], value), name
    theirs = back.state_dict()
    for name, value in model.state_dict().items():  # the same weights, every one, bit for bit
        assert torch.equal(theirs[name], value), name
    torch.testing.assert_close(back.schedule.alphas_cumprod, model.schedule.alphas_cumprod, rtol=1e-6, atol=0)
    assert float(back.first_stage.scale_factor) == pytest.approx(float(model.first_stage.scale_factor))
    x, t, context, z = _inputs(model)
    # Same weights bit for bit; CPU kernels may still round differently by an ulp or two (1e-6 relative).
    with torch.no_grad():
        ours = model.unet(x, t, context=context)
        torch.testing.assert_close(back.unet(x, t, context=context), ours, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(back.decode(z), model.decode(z), rtol=1e-6, atol=1e-6)
        text = back.conditioner.conditioners["text"].encode_prompts(PROMPTS)
        ours = model.conditioner.conditioners["text"].encode_prompts(PROMPTS)
        torch.testing.assert_close(text, ours, rtol=1e-6, atol=1e-6)


# -- SD 2.x: OpenCLIP text encoder (penultimate layer), linear attention projections ----------------------


@pytest.fixture(scope="module")
def sd2_exported(tmp_path_factory):
    """The tiny SD 2 golden (tests/goldens/sd2), nudged, exported both ways."""
    from test_interop import tiny_clip_tokenizer

    from ldm.interop.diffusers_io import export_diffusers

    golden = Path(__file__).parent / "goldens" / "sd2"
    tokenizer = tmp_path_factory.mktemp("sd2_tokenizer")
    tiny_clip_tokenizer(tokenizer)
    source = export.load_source(golden / "model.safetensors", golden / "config.yaml", str(tokenizer))
    with torch.no_grad():  # a "fine-tune" of the UNet
        moved = _nudge(source.model.unet, 2)
        for name, p in source.model.unet.named_parameters():
            p.copy_(moved[name])
    out = tmp_path_factory.mktemp("sd2_export")
    export.export_original(source, out / "sd2.safetensors")
    export_diffusers(source, out / "sd2_diffusers")
    return source.model, out / "sd2.safetensors", golden / "config.yaml", out / "sd2_diffusers"


def test_sd2_diffusers_folder_and_single_file(sd2_exported):
    model, single, yaml, folder = sd2_exported
    from transformers import CLIPTextModel, CLIPTokenizer

    unet = diffusers.UNet2DConditionModel.from_pretrained(folder / "unet", local_files_only=True)
    vae = diffusers.AutoencoderKL.from_pretrained(folder / "vae", local_files_only=True)
    assert unet.config.use_linear_projection
    _check_unet_vae(model, unet.eval(), vae.eval())
    text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder", local_files_only=True).eval()
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    assert tokenizer.pad_token_id == 0  # OpenCLIP pads with id 0
    assert text_encoder.config.num_hidden_layers == 1  # penultimate of 2 = the model without its last layer
    _check_text(model, text_encoder, tokenizer)
    unet = diffusers.UNet2DConditionModel.from_single_file(
        str(single), original_config=str(yaml), local_files_only=True
    )
    vae = diffusers.AutoencoderKL.from_single_file(
        str(single), original_config=str(yaml), local_files_only=True
    )
    _check_unet_vae(model, unet.eval(), vae.eval())
    pipe = diffusers.StableDiffusionPipeline.from_single_file(
        str(single), config=str(folder), local_files_only=True
    )
    _check_text(model, pipe.text_encoder, pipe.tokenizer)


def test_sd2_diffusers_folder_imports_as_a_base_model(sd2_exported):
    model, _, _, folder = sd2_exported
    back = load_model(folder).model
    x, t, context, z = _inputs(model)
    with torch.no_grad():
        torch.testing.assert_close(back.unet(x, t, context=context), model.unet(x, t, context=context))
        text = back.conditioner.conditioners["text"].encode_prompts(PROMPTS)
        ours = model.conditioner.conditioners["text"].encode_prompts(PROMPTS)
        torch.testing.assert_close(text, ours, rtol=1e-6, atol=1e-6)


def test_cli_writes_the_diffusers_folder_and_refuses_other_models(exported, tmp_path, capsys):
    _, single, yaml, _, tokenizer = exported
    out = tmp_path / "cli_diffusers"
    args = [
        str(single),
        str(out),
        "--format",
        "diffusers",
        "--config",
        str(yaml),
        "--text-encoder",
        tokenizer,
    ]
    assert export.main(args) == 0
    assert (out / "model_index.json").is_file() and (
        out / "unet" / "diffusion_pytorch_model.safetensors"
    ).is_file()
    cin = Path(__file__).parent / "goldens" / "ldm_cin256"
    args = [str(cin / "model.safetensors"), str(tmp_path / "cin"), "--format", "diffusers"]
    assert export.main([*args, "--config", str(cin / "config.yaml")]) == 2
    assert "Stable Diffusion text-to-image models" in capsys.readouterr().err
    assert not (tmp_path / "cin").exists()


def test_sample_py_takes_a_diffusers_folder(exported, tmp_path):
    """`python sample.py ckpt=<diffusers folder>`: the config checks let a pipeline folder through."""
    import json
    import subprocess
    import sys

    folder = exported[3]
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [
            sys.executable,
            "sample.py",
            f"ckpt={folder}",
            "prompt=a red circle",
            "n=1",
            "steps=2",
            "device=cpu",
            f"out_dir={tmp_path}",
        ],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    record = json.loads((tmp_path / "run.json").read_text())
    assert record["checkpoint"]["format"] == "diffusers" and record["size"] == {"height": 64, "width": 64}
