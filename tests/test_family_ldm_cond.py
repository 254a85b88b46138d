"""Parity with the original CompVis code for the LDM paper's conditional families (tests/goldens/README.md).

`ldm_cin256` (ClassEmbedder -> cross-attention, VQ first stage, EMA shadows) and `ldm_txt2img_1p4b`
(BERTEmbedder, KL first stage) are loaded from their tiny original checkpoint + yaml through `load_model`,
and every piece is compared with what the original code returned: single passes to 1e-5 relative, a
10-step DDIM trajectory with classifier-free guidance (scale 3) to 1e-4.
"""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ldm.conditioning import BERTEmbedder
from ldm.errors import UserError
from ldm.interop import registry
from ldm.interop.compvis import read_yaml
from ldm.interop.load import load_model
from ldm.interop.registry import BuildContext
from ldm.samplers import (
    ClassifierFreeGuidance,
    DiscreteDenoiser,
    StepSchedule,
    sample_ddim,
    start_x,
    to_variance_preserving,
)

GOLDENS = Path(__file__).parent / "goldens"
CIN, TXT = GOLDENS / "ldm_cin256", GOLDENS / "ldm_txt2img_1p4b"
VOCAB = TXT / "vocab"
PROMPTS = ["A photo of a cat", "Paintings of red houses at night."]  # as make_ldm_cond.py


def close(out: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    """Equal to `tol` relative to the reference's largest magnitude (elementwise) and in norm."""
    assert ref.abs().max() > 0.1  # a real signal, not zeros
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < tol, f"relative error {rel:.2e}"
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol * ref.abs().max().item())


def ddim_cfg3(model, x_T: torch.Tensor, cond: dict, uncond: dict) -> torch.Tensor:
    """CompVis DDIMSampler, 10 steps, eta 0, scale 3: timesteps 901, 801, ..., 1 (test_samplers_reference)."""
    pick = lambda d: {k: v for k, v in d.items() if v is not None}  # noqa: E731
    denoiser = ClassifierFreeGuidance(
        DiscreteDenoiser(model.net, model.schedule, model.parameterization), scale=3.0, uncond=pick(uncond)
    )
    sigmas = StepSchedule(10, "leading", offset=1, final="min")(model.schedule.alphas_cumprod)
    out = sample_ddim(denoiser, start_x(x_T, sigmas[0]), sigmas, extra_args=pick(cond), disable=True)
    return to_variance_preserving(out, sigmas[-1])


@pytest.fixture(scope="module")
def cin():
    loaded = load_model(CIN / "model.safetensors", config=CIN / "config.yaml")
    return loaded, load_file(str(CIN / "io.safetensors"))


@pytest.fixture(scope="module")
def txt():
    loaded = load_model(TXT / "model.safetensors", config=TXT / "config.yaml", text_encoder=str(VOCAB))
    return loaded, load_file(str(TXT / "io.safetensors"))


# -- ldm_cin256 ------------------------------------------------------------------------------------------


def test_cin256_unet_uses_ema_weights(cin):
    loaded, io = cin
    assert loaded.used_ema and loaded.input_keys == ("label",)
    with torch.no_grad():
        eps = loaded.model.net(io["x"], io["t"].long(), context=io["context"])
    close(eps, io["eps"], 1e-5)
    torch.testing.assert_close(loaded.model.schedule.alphas_cumprod, io["alphas_cumprod"], rtol=1e-5, atol=0)


def test_cin256_raw_weights_are_not_the_ema_ones(cin):
    _, io = cin
    raw = load_model(CIN / "model.safetensors", config=CIN / "config.yaml", use_ema=False)
    assert not raw.used_ema
    with torch.no_grad():
        eps = raw.model.net(io["x"], io["t"].long(), context=io["context"])
    assert (eps - io["eps"]).abs().max() > 1e-2


def test_cin256_class_context_and_null_class(cin):
    loaded, io = cin
    embedder = loaded.model.conditioner.conditioners["label"]
    with torch.no_grad():
        context = embedder({"label": io["class_labels"].long()})  # ids 0, 7, 999 and the null id 1000
        null = embedder.null({"label": torch.tensor([5, 6])})
    close(context, io["class_context"], 1e-5)
    assert context.shape == (4, 1, 32) and embedder.n_classes == 1000
    torch.testing.assert_close(null, io["class_context"][3:].expand(2, 1, 32))
    with pytest.raises(UserError, match="n_classes=1000"):
        embedder({"label": torch.tensor([1001])})


def test_cin256_vq_first_stage(cin):
    loaded, io = cin
    codec = loaded.model.first_stage
    with torch.no_grad():
        h = codec.encode_pixels(io["image"], sample=False)  # pre-quantisation latent, scale_factor 1
        decoded = codec.decode(io["fs_encoded"])  # quantise -> decode, as VQModelInterface.decode
    assert float(codec.scale_factor) == 1.0  # the yaml sets none: CompVis' default
    close(h, io["fs_encoded"], 1e-5)
    close(decoded, io["fs_decoded"], 1e-5)


def test_cin256_ddim_trajectory_with_null_class_guidance(cin):
    loaded, io = cin
    with torch.no_grad():
        cond, uncond = loaded.model.conditioner.encode_with_null(
            {"label": io["ddim_labels"].long()}, batch_size=2
        )
        out = ddim_cfg3(loaded.model, io["x_T"], cond, uncond)
    close(out, io["ddim10_cfg3"], 1e-4)


def test_cin256_sample_end_to_end(cin):
    loaded, _ = cin
    images = loaded.model.sample(
        {"label": [3, 999]},
        seeds=[0, 1],
        cfg_scale=2.0,
        sampler=sample_ddim,
        steps=StepSchedule(2, "leading"),
        latent_size=(8, 8),
    )
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()


def _class_ctx(rows: int, yaml_rows: int | None = None) -> BuildContext:
    params = read_yaml(CIN / "config.yaml")
    params["cond_stage_config"]["params"]["n_classes"] = yaml_rows or rows
    state = {"cond_stage_model.embedding.weight": torch.randn(rows, 32)}
    return BuildContext(params=params, state=state, yaml_path=CIN / "config.yaml")


def test_cin256_v1_layout_has_no_null_class():
    registry.load_families()
    ctx = _class_ctx(1000)  # models/ldm/cin256: 1000 rows, all real classes
    embedder = registry.COND_STAGE["ClassEmbedder"](ctx)["label"]
    weight = ctx.state["cond_stage_model.embedding.weight"]
    torch.testing.assert_close(embedder({"label": torch.tensor([999])})[:, 0], weight[[999]])
    with pytest.raises(UserError, match="cfg_scale=1"):
        embedder.null({"label": torch.tensor([0])})
    with pytest.raises(UserError, match="no null class"):
        embedder({"label": torch.tensor([1000])})


def test_cin256_class_rows_mismatch_names_yaml_key_and_shapes():
    registry.load_families()
    with pytest.raises(
        UserError, match=r"cond_stage_config\.params: n_classes=1001.*\(1001, 32\).*\(1000, 32\)"
    ):
        registry.COND_STAGE["ClassEmbedder"](_class_ctx(1000, yaml_rows=1001))


# -- ldm_txt2img_1p4b ------------------------------------------------------------------------------------


def test_txt2img_tokenizer_matches_original(txt):
    loaded, io = txt
    bert = loaded.model.conditioner.conditioners["text"]
    ids = bert.token_ids(PROMPTS)
    assert torch.equal(ids, io["token_ids"].long())  # [CLS] ... [SEP] then [PAD] up to 77
    assert ids.shape == (2, 77) and ids[0, 0] == 2 and ids[0, 6] == 3 and (ids[0, 7:] == 0).all()


def test_txt2img_bert_context(txt):
    loaded, io = txt
    bert = loaded.model.conditioner.conditioners["text"]
    with torch.no_grad():
        from_ids = bert.encode_ids(io["random_ids"].long())
        from_text = bert({"caption": PROMPTS})
        null = bert.null({"caption": ["x"]})
    close(from_ids, io["random_ids_context"], 1e-5)
    close(from_text, io["text_context"], 1e-5)
    close(null, io["null_context"], 1e-5)


def test_txt2img_unet(txt):
    loaded, io = txt
    assert not loaded.used_ema  # use_ema: False, no model_ema.* in the file
    with torch.no_grad():
        eps = loaded.model.net(io["x"], io["t"].long(), context=io["context"])
    close(eps, io["eps"], 1e-5)


def test_txt2img_kl_first_stage(txt):
    loaded, io = txt
    ae = loaded.model.first_stage.autoencoder
    with torch.no_grad():
        posterior = ae.encode(io["image"])
        decoded = ae.decode(io["fs_posterior_mean"])
    close(posterior.mean, io["fs_posterior_mean"], 1e-5)
    close(posterior.logvar, io["fs_posterior_logvar"], 1e-5)
    close(decoded, io["fs_decoded"], 1e-5)
    assert abs(float(loaded.model.first_stage.scale_factor) - 0.18215) < 1e-7


def test_txt2img_ddim_trajectory_with_empty_prompt_guidance(txt):
    loaded, io = txt
    with torch.no_grad():
        cond, uncond = loaded.model.conditioner.encode_with_null({"caption": PROMPTS}, batch_size=2)
        out = ddim_cfg3(loaded.model, io["x_T"], cond, uncond)
    close(out, io["ddim10_cfg3"], 1e-4)


def test_txt2img_sample_end_to_end(txt):
    loaded, _ = txt
    images = loaded.model.sample(
        {"caption": "a red house"},
        seeds=[0, 1],
        cfg_scale=5.0,
        sampler=sample_ddim,
        steps=StepSchedule(2, "leading"),
        latent_size=(8, 8),
    )
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()


def test_bert_embedder_keeps_the_original_layout():
    """Our trained BERTEmbedder and the original's cond_stage_model.transformer.* are one set of names."""
    original = load_file(str(TXT / "model.safetensors"))
    theirs = {
        k[len("cond_stage_model.") :]: tuple(v.shape)
        for k, v in original.items()
        if k.startswith("cond_stage_model.") and ".to_logits." not in k
    }
    ours = BERTEmbedder(n_layer=2, n_embed=32, vocab=str(VOCAB))
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == theirs


def test_txt2img_vocab_too_large_names_text_encoder():
    # Without text_encoder= the tokenizer is bert-base-uncased's (30522 tokens): too many for 40 rows.
    with pytest.raises(UserError, match=r"vocab_size.*text_encoder="):
        load_model(TXT / "model.safetensors", config=TXT / "config.yaml")
