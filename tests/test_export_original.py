"""Export back to the original CompVis / Stability layout (`ldm.interop.export`), proven by round trips.

Every golden original file (tests/goldens/<family>) is loaded with its yaml, exported, and the export compared
with the original: the same keys (minus the few the original carries that we do not model, named below, plus
`scale_factor`, which we always write), the same tensors (schedule buffers within 2e-7 relative: recomputed
in float64 as `register_schedule` does), and loading the export again gives the same model bit for bit
(every tensor, UNet output, decode, conditioner output).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_interop import tiny_clip_text_model, tiny_clip_tokenizer
from train_helpers import tiny_ae, tiny_data  # noqa: F401 - fixtures

from ldm.conditioning.base import BaseConditioner
from ldm.errors import UserError
from ldm.interop import export
from ldm.interop.load import load_model

GOLDENS = Path(__file__).parent / "goldens"
OPENCLIP_UNUSED = {"cond_stage_model.model.logit_scale", "cond_stage_model.model.text_projection"}
NOT_MODELLED = {  # original keys our model does not hold (not used to sample), so not in the export
    "ldm_txt2img_1p4b": {  # the BERT wrapper's language-model head, never used for embeddings
        "cond_stage_model.transformer.to_logits.weight",
        "cond_stage_model.transformer.to_logits.bias",
    },
    "sd2": OPENCLIP_UNUSED,  # OpenCLIP's pooled-output projection and contrastive temperature
    "sd2_inpaint": OPENCLIP_UNUSED,
    "sd_x4_upscaler": OPENCLIP_UNUSED,
}
FAMILIES = [
    "ldm_bsr_sr",
    "ldm_celeba_vq",
    "ldm_churches_kl",
    "ldm_cin256",
    "ldm_inpainting_big",
    "ldm_semantic",
    "ldm_txt2img_1p4b",
    "sd2",
    "sd2_inpaint",
    "sd_x4_upscaler",
]
SCHEDULE = (*export.SCHEDULE_KEYS, "low_scale_model.")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("clip_tokenizer")
    tiny_clip_tokenizer(folder)
    return str(folder)


@pytest.fixture(scope="module")
def clip_folders(tmp_path_factory) -> tuple[str, str]:
    """(a tiny random CLIPTextModel + tokenizer save_pretrained folder, the tokenizer-only folder)."""
    root = tmp_path_factory.mktemp("clip_run")
    tokenizer = tiny_clip_tokenizer(root / "tokenizer")
    tiny_clip_text_model(tokenizer).save_pretrained(root / "full")
    tokenizer.save_pretrained(root / "full")
    return str(root / "full"), str(root / "tokenizer")


def _text_encoder(family: str, tokenizer: str) -> str:
    return str(GOLDENS / family / "vocab") if family == "ldm_txt2img_1p4b" else tokenizer


def _same_model(a, b) -> None:
    """Every tensor equal, and the UNet / decoder / conditioner give the same outputs."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    torch.testing.assert_close(b.schedule.alphas_cumprod, a.schedule.alphas_cumprod, rtol=2e-7, atol=0)
    g = torch.Generator().manual_seed(0)
    first = next(a.unet.parameters())
    in_ch = a.unet.input_blocks[0][0].weight.shape[1]
    x, t = torch.randn(2, in_ch, 8, 8, generator=g), torch.tensor([10, 500])
    context = torch.randn(2, 77, a.unet.context_dim, generator=g) if a.unet.context_dim else None
    y = torch.tensor([3, 20]) if getattr(a.unet, "num_classes", None) else None
    z = torch.randn(2, a.first_stage.latent_channels, 8, 8, generator=g).to(first)
    with torch.no_grad():
        assert torch.equal(a.unet(x, t, context=context, y=y), b.unet(x, t, context=context, y=y))
        assert torch.equal(a.decode(z), b.decode(z))
        batch = {"caption": ["a red circle", ""], "label": torch.tensor([3, 7])}
        for name, c in a.conditioner.conditioners.items():
            if set(c.input_keys) <= set(batch):
                out_a, out_b = c(batch), b.conditioner.conditioners[name](batch)
                assert torch.equal(out_a, out_b) and out_a.abs().max() > 0, name


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_keys_and_outputs(family, tokenizer, tmp_path):
    folder, te = GOLDENS / family, _text_encoder(family, tokenizer)
    yaml = folder / "config.yaml"
    source = export.load_source(folder / "model.safetensors", yaml, te)
    out, original_layout = export.export_original(source, tmp_path / "out.safetensors")
    assert original_layout and (tmp_path / "out.yaml").read_text() == yaml.read_text()
    theirs, ours = load_file(str(folder / "model.safetensors")), load_file(str(out))
    assert set(ours) == (set(theirs) - NOT_MODELLED.get(family, set())) | {"scale_factor"}
    for k in set(ours) & set(theirs):
        if k.startswith(SCHEDULE) or k in export.SCHEDULE_KEYS:
            torch.testing.assert_close(ours[k], theirs[k].float(), rtol=2e-7, atol=1e-30, msg=k)
        else:
            assert torch.equal(ours[k], theirs[k].to(ours[k].dtype)), k
    for use_ema in (False, True):
        before = load_model(folder / "model.safetensors", config=yaml, text_encoder=te, use_ema=use_ema)
        after = load_model(out, config=yaml, text_encoder=te, use_ema=use_ema)
        assert after.used_ema == before.used_ema
        _same_model(before.model, after.model)


def test_ema_only_puts_the_ema_weights_in_the_unet(tmp_path):
    folder = GOLDENS / "ldm_celeba_vq"  # the one golden with LitEma shadows (they differ from the raw ones)
    source = export.load_source(folder / "model.safetensors", folder / "config.yaml")
    export.export_original(source, tmp_path / "ema.safetensors", ema="only", dtype="fp16")
    export.export_original(source, tmp_path / "raw.safetensors", ema="none")
    ema, raw = load_file(str(tmp_path / "ema.safetensors")), load_file(str(tmp_path / "raw.safetensors"))
    assert not any(k.startswith("model_ema.") for k in (*ema, *raw))
    key = "model.diffusion_model.out.2.weight"
    assert ema[key].dtype == torch.float16 and ema["alphas_cumprod"].dtype == torch.float32
    original = load_file(str(folder / "model.safetensors"))
    assert torch.equal(ema[key], original["model_ema.diffusion_modelout2weight"].half())
    assert torch.equal(raw[key], original[key].float())
    reloaded = load_model(tmp_path / "ema.safetensors", config=folder / "config.yaml")
    with_ema = load_model(folder / "model.safetensors", config=folder / "config.yaml", use_ema=True)
    torch.testing.assert_close(  # fp16 export: the EMA weights rounded to fp16
        reloaded.model.unet.out[2].weight, with_ema.model.unet.out[2].weight, rtol=1e-3, atol=1e-4
    )


def test_cli_bad_output_name_and_missing_source(tmp_path, capsys):
    assert export.main([str(tmp_path / "nothing.ckpt"), str(tmp_path / "out.safetensors")]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    assert export.main([str(tmp_path), str(tmp_path / "out.ckpt")]) == 2
    assert "name it *.safetensors" in capsys.readouterr().err


def test_cast_state_rejects_unknown_dtype():
    with pytest.raises(UserError, match="--dtype fp8"):
        export.cast_state({}, "fp8")


# -- train.py runs -----------------------------------------------------------------------------------------


def _train(tiny_data, tiny_ae, run_dir, extra):  # noqa: F811
    from train_helpers import compose_train, tiny_overrides

    import train

    overrides = tiny_overrides("txt2img", tiny_data, run_dir, tiny_ae, max_steps=2, every=2)
    cfg = compose_train(
        overrides + ["callbacks.export.original=true", "callbacks.image_logger.every_n_steps=0"] + extra
    )
    train.train(cfg)
    return run_dir


def test_minilm_run_has_no_original_layout_and_exports_ours(tiny_data, tiny_ae, tmp_path, caplog):  # noqa: F811
    extra = ["model.unet.pooled_context=false"]  # (true, the recipe's default, is refused too: not original)
    run = _train(tiny_data, tiny_ae, tmp_path / "run", extra)  # the txt2img recipe: MiniLM text encoder
    assert (run / "model.safetensors").is_file() and not (run / "model.original.safetensors").exists()
    assert "'text' (FrozenTextEncoder" in caplog.text
    assert "has no original CompVis/Stability counterpart" in caplog.text
    out = tmp_path / "ours.safetensors"
    assert export.main([str(run), str(out)]) == 0  # says so, and writes our layout from last.ckpt
    assert "Writing our own export layout" in caplog.text
    state = load_file(str(out))
    assert any(k.startswith("conditioner.") for k in state) and not any(
        k.startswith("cond_stage") for k in state
    )
    exported = load_model(run / "model.safetensors")
    again = load_model(out)  # the EMA weights (the CLI's default keeps them in place for our layout)
    _same_model(exported.model, again.model)

    # merge_lora on a model trained here (no original layout): our layout, equal to the merge in memory
    from ldm.adapters import lora as L
    from ldm.adapters.lora_files import save_lora
    from ldm.interop import merge_lora

    tuned = load_model(run / "model.safetensors").model
    L.add_lora(tuned.unet, L.unet_targets(tuned.unet, ["attn"]), rank=2)
    with torch.no_grad():
        for _, layer in L.lora_layers(tuned):
            layer.lora_B["default"].weight.normal_(0, 0.1)
    adapter = save_lora(tmp_path / "lora.safetensors", L.lora_state(tuned), model=tuned)
    merged = tmp_path / "merged.safetensors"
    args = [str(run / "model.safetensors"), str(adapter), str(merged), "--scales", "0.5"]
    assert merge_lora.main(args) == 0
    expect = load_model(run / "model.safetensors").model
    L.merge_lora(expect, L.lora_state(tuned), 0.5)
    _same_model(expect, load_model(merged).model)


def test_clip_run_exports_the_sd_layout(tiny_data, tiny_ae, tmp_path, clip_folders):  # noqa: F811
    full, tokenizer = clip_folders
    extra = [
        f"model.conditioner.conditioners.text.model={full}",
        "model.conditioner.conditioners.text.max_length=77",
        "model.unet.context_dim=64",
        "model.unet.pooled_context=false",
    ]
    run = _train(tiny_data, tiny_ae, tmp_path / "run", extra)
    original, yaml = run / "model.original.safetensors", run / "model.original.yaml"
    state = load_file(str(original))
    assert "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" in state
    assert "alphas_cumprod" in state and not any(k.startswith(("conditioner.", "model_ema.")) for k in state)
    ours = load_model(run / "model.safetensors")
    theirs = load_model(original, config=yaml, text_encoder=tokenizer)
    _same_model(ours.model, theirs.model)
    # without config=: the <name>.yaml beside it wins over the run's config.yaml in the same folder
    beside = load_model(original, text_encoder=tokenizer)
    assert beside.format == "compvis"  # not our own loading path through the run's config.yaml
    _same_model(ours.model, beside.model)
    # the CLI from the run folder (last.ckpt): raw UNet + LitEma shadows, as the released full files
    out = tmp_path / "full.safetensors"
    assert export.main([str(run), str(out)]) == 0
    full_state = load_file(str(out))
    assert "model_ema.num_updates" in full_state and int(full_state["model_ema.num_updates"]) == 2
    with_ema = load_model(out, config=out.with_suffix(".yaml"), text_encoder=tokenizer, use_ema=True)
    _same_model(ours.model, with_ema.model)


# -- full size: recognised like the released files (meta tensors, no memory) ------------------------------


class FrozenTextEncoder(BaseConditioner):
    """A stand-in named as the real class (exporters dispatch on it) over a full-size meta CLIPTextModel."""

    input_keys = ("caption",)

    def __init__(self, width: int, layers: int, act: str) -> None:
        from transformers import CLIPTextConfig, CLIPTextModel

        super().__init__()
        config = CLIPTextConfig(
            vocab_size=49408,
            hidden_size=width,
            intermediate_size=4 * width,
            num_hidden_layers=layers,
            num_attention_heads=width // 64,
            hidden_act=act,
        )
        with torch.device("meta"):
            self.transformer = CLIPTextModel(config)
        self.is_clip = True

    @property
    def out_dim(self) -> int:
        return self.transformer.config.hidden_size


@pytest.mark.parametrize(
    ("yaml_name", "text"),
    [("sd1.yaml", (768, 12, "quick_gelu")), ("sd2_inpainting.yaml", (1024, 24, "gelu"))],
)
def test_full_size_export_is_recognised_as_the_released_family(yaml_name, text):
    from ldm.conditioning import Conditioner, InpaintingConditioner
    from ldm.diffusion.loss import DiffusionLoss
    from ldm.diffusion.schedules import NoiseSchedule
    from ldm.interop import compvis, recognise
    from ldm.models.first_stage import LatentCodec
    from ldm.models.latent_diffusion import LatentDiffusion

    params = compvis.read_yaml(recognise.CONFIG_DIR / yaml_name)
    with torch.device("meta"):
        unet = compvis.build_unet(params)
        autoencoder, ae_config = compvis.build_autoencoder(params)
    conditioners = {"text": FrozenTextEncoder(*text)}
    if params["unet_config"]["params"]["in_channels"] == 9:
        conditioners = {"inpaint": InpaintingConditioner(latent_channels=4), **conditioners}
    model = LatentDiffusion(
        unet,
        Conditioner(conditioners),
        LatentCodec(autoencoder, 0.18215, ae_config),
        DiffusionLoss(NoiseSchedule()),
    )
    state = export.original_state(model)
    assert recognise.recognise(state) == recognise.CONFIG_DIR / yaml_name


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("callbacks.export.original=maybe", "must be true or false"),
        ("callbacks.export.original_dtype=fp8", "use one of fp32, fp16, bf16"),
        ("callbacks.export.original_ema_only=1", "must be true or false"),
    ],
)
def test_bad_export_options_are_one_line_before_training(override, message):
    from train_helpers import compose_train

    from ldm.config_checks import TRAIN_CHECKS, run_checks

    with pytest.raises(UserError, match=f"{override.split('=')[0]}=.*{message}"):
        run_checks(compose_train(["experiment=txt2img", override]), TRAIN_CHECKS)


def test_clip_run_exports_a_diffusers_folder(tiny_data, tiny_ae, tmp_path, clip_folders):  # noqa: F811
    diffusers = pytest.importorskip("diffusers", reason="pip install 'ldm[diffusers]' (part of .[dev])")
    full, _ = clip_folders
    extra = [
        f"model.conditioner.conditioners.text.model={full}",
        "model.conditioner.conditioners.text.max_length=77",
        "model.unet.context_dim=64",
        "model.unet.pooled_context=false",
    ]
    run = _train(tiny_data, tiny_ae, tmp_path / "run", extra)
    assert export.main([str(run), str(tmp_path / "sd"), "--format", "diffusers"]) == 0
    ours = load_model(run / "model.safetensors").model  # the EMA weights, as the folder
    unet = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "sd" / "unet", local_files_only=True)
    scheduler = diffusers.DDIMScheduler.from_pretrained(tmp_path / "sd" / "scheduler", local_files_only=True)
    torch.testing.assert_close(
        scheduler.alphas_cumprod.float(), ours.schedule.alphas_cumprod, rtol=1e-6, atol=1e-7
    )
    assert scheduler.config.prediction_type == ("v_prediction" if ours.parameterization == "v" else "epsilon")
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 64, generator=g)
    t = torch.tensor([3, 900])
    with torch.no_grad():
        theirs = unet.eval()(x, t, encoder_hidden_states=context).sample
        torch.testing.assert_close(theirs, ours.unet(x, t, context=context), rtol=1e-5, atol=1e-5)
    back = load_model(tmp_path / "sd").model  # and imported back as a base model
    assert back.parameterization == ours.parameterization
    torch.testing.assert_close(
        back.schedule.alphas_cumprod, ours.schedule.alphas_cumprod, rtol=1e-6, atol=1e-7
    )
    with torch.no_grad():
        torch.testing.assert_close(back.unet(x, t, context=context), ours.unet(x, t, context=context))
