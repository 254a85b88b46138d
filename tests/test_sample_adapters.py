"""sample.py lora= / embeddings= and the Pipeline API: adapters change exactly what they should."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from ldm.adapters import lora as L
from ldm.adapters.embeddings import init_embedding, save_embedding
from ldm.adapters.lora_files import save_lora
from ldm.config_checks import check_sample_config
from ldm.errors import UserError
from ldm.interop.load import load_model
from ldm.pipeline import Pipeline, parse_lora_spec
from sample import sample

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def adapters(sd_base, tmp_path_factory):
    """Two random LoRAs (UNet + text encoder) and a textual-inversion file made from the word 'red'."""
    file, config, tokenizer = sd_base
    root = tmp_path_factory.mktemp("adapters")
    paths = []
    for seed in (1, 2):
        model = load_model(file, config=config, text_encoder=str(tokenizer)).model
        L.add_lora(model.unet, L.unet_targets(model.unet, ["attn"]), rank=2)
        text = model.conditioner.conditioners["text"].transformer
        L.add_lora(text, L.text_targets(text, ["attn"]), rank=2)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for _, layer in L.lora_layers(model):
                w = layer.lora_B["default"].weight
                w.copy_(torch.randn(w.shape, generator=gen) * 0.2)
        paths.append(save_lora(root / f"lora{seed}.safetensors", L.lora_state(model), model=model))
    model = load_model(file, config=config, text_encoder=str(tokenizer)).model
    encoder = model.conditioner.conditioners["text"]
    vectors = init_embedding(encoder, "<sks>", "red")
    emb = save_embedding(root / "sks.safetensors", vectors, "<sks>", init_word="red")
    return paths, emb


def images(pipe: Pipeline, prompt: str) -> torch.Tensor:
    return pipe.txt2img(prompt, n=1, steps=2, seed=0, cfg_scale=3.0).tensors


def test_lora_scales_stack_like_one_merge(sd_base, adapters):
    file, config, tokenizer = sd_base
    (a, b), _ = adapters
    kw = {"config": config, "text_encoder": str(tokenizer), "device": "cpu"}
    both = Pipeline.from_file(file, lora=[f"{a}:0.8", (b, 0.5)], **kw)
    manual = load_model(file, config=config, text_encoder=str(tokenizer)).model
    from ldm.adapters.lora_files import load_lora

    L.merge_lora(manual, load_lora(a, manual), 0.8)
    L.merge_lora(manual, load_lora(b, manual), 0.5)
    for name, p in manual.named_parameters():
        assert torch.allclose(dict(both.model.named_parameters())[name], p, atol=1e-6), name
    # the text-encoder LoRA changes "" too: the cached null context follows the merged weights
    text = both.model.conditioner.conditioners["text"]
    assert torch.allclose(text.null_context, text.encode_prompts([""]), atol=1e-6)
    base = Pipeline.from_file(file, **kw)
    assert not torch.allclose(images(base, "a red circle"), images(both, "a red circle"), atol=1e-3)
    assert [x["scale"] for x in both.adapters] == [0.8, 0.5]


def test_embedding_token_samples_like_its_init_word(sd_base, adapters):
    file, config, tokenizer = sd_base
    _, emb = adapters
    pipe = Pipeline.from_file(
        file, config=config, text_encoder=str(tokenizer), device="cpu", embeddings=[emb]
    )
    assert pipe.adapters == [{"kind": "embedding", "path": str(emb), "token": "sks"}]  # A1111: the file stem
    token = pipe.adapters[0]["token"]
    assert torch.equal(images(pipe, f"a {token} circle"), images(pipe, "a red circle"))


def _sample_cfg(sd_base, tmp_path, *overrides: str):
    file, config, tokenizer = sd_base
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(
            "sample",
            overrides=[
                f"ckpt={file}",
                f"config={config}",
                f"text_encoder={tokenizer}",
                f"out_dir={tmp_path / 'out'}",
                "steps=2",
                "n=1",
                "progress=false",
                "prompt=a red circle",
                *overrides,
            ],
        )


def test_sample_py_records_the_adapters_and_refuses_missing_files(sd_base, adapters, tmp_path):
    (a, _), emb = adapters
    record = sample(_sample_cfg(sd_base, tmp_path, f"lora=[{a}:0.7]", f"embeddings=[{emb}]"))
    kinds = [(x["kind"], x.get("scale")) for x in record["parameters"]["adapters"]]
    assert kinds == [("lora", 0.7), ("embedding", None)]
    with pytest.raises(UserError, match="no such LoRA file"):
        check_sample_config(_sample_cfg(sd_base, tmp_path, f"lora=[{tmp_path / 'nope.safetensors'}:0.5]"))
    with pytest.raises(UserError, match="is a LoRA adapter, not a whole model"):
        load_model(a)


def test_parse_lora_spec():
    assert parse_lora_spec("a.safetensors:0.8") == ("a.safetensors", 0.8)
    assert parse_lora_spec("dir/a.safetensors") == ("dir/a.safetensors", 1.0)
    assert parse_lora_spec("C:/x/a.safetensors") == ("C:/x/a.safetensors", 1.0)
    assert parse_lora_spec(("a.safetensors", 0.5)) == ("a.safetensors", 0.5)
