"""ldm.conditioning: each conditioner's shapes and null value, per-key dropout, the container's kwargs."""

import copy
import inspect
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ldm.conditioning import (
    BERTEmbedder,
    ClassEmbedder,
    Conditioner,
    FrozenTextEncoder,
    InpaintingConditioner,
    SemanticMapConditioner,
    SuperResConditioner,
    default_text_encoder,
)
from ldm.conditioning.spatial import one_hot_area
from ldm.errors import UserError

MAX_LEN = 32  # the default is CLIP's 77; shorter keeps this file fast on 2 shared cores
PROMPTS = ["a photo of a cat", "an oil painting of a harbour at dawn", ""]


@pytest.fixture(scope="module")
def text_encoder() -> FrozenTextEncoder:
    """The offline all-MiniLM-L6-v2, loaded once for the whole module."""
    return FrozenTextEncoder(max_length=MAX_LEN)


def fake_encode(pixels: torch.Tensor) -> torch.Tensor:
    """A deterministic stand-in for the frozen autoencoder: f=8, 4 channels, encode(0) != 0."""
    weight = torch.linspace(-1.0, 1.0, 12).view(4, 3, 1, 1)
    return F.conv2d(F.avg_pool2d(pixels, 8), weight) + 0.25


def vocab_ids(*tokens: str) -> list[int]:
    """Ids straight from vocab.txt: a token's id is its line number."""
    lines = (Path(default_text_encoder()) / "vocab.txt").read_text(encoding="utf-8").splitlines()
    return [lines.index(t) for t in tokens]


# Frozen pretrained text encoder ---------------------------------------------------------------------


def test_text_encoder_loads_offline_and_encodes(text_encoder):
    from transformers import AutoModel, AutoTokenizer

    context = text_encoder({"caption": PROMPTS})
    assert context.shape == (3, MAX_LEN, 384)
    assert text_encoder.context_dim == text_encoder.out_dim == 384 and text_encoder.output == "crossattn"
    assert (context[0] - context[1]).abs().max() > 0.1  # different prompts, different contexts
    # Parity with a direct transformers call (BERT: padding masked out via attention_mask).
    tokenizer = AutoTokenizer.from_pretrained(default_text_encoder(), local_files_only=True)
    model = AutoModel.from_pretrained(default_text_encoder(), local_files_only=True).eval()
    tokens = tokenizer(
        PROMPTS, padding="max_length", max_length=MAX_LEN, truncation=True, return_tensors="pt"
    )
    with torch.no_grad():
        expected = model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
    torch.testing.assert_close(context, expected)


def test_text_encoder_null_is_the_fixed_empty_prompt(text_encoder):
    null = text_encoder.null({"caption": ["x", "y"]})
    assert null.shape == (2, MAX_LEN, 384)
    empty = text_encoder({"caption": [""]})
    torch.testing.assert_close(null[0], empty[0])
    torch.testing.assert_close(null[1], empty[0])
    torch.testing.assert_close(text_encoder.null({"caption": ["z"]})[0], null[0])  # fixed


def test_text_encoder_reads_cached_states(text_encoder):
    # cache_latents --text-encoder stores the states as caption_emb: used as they are, never re-encoded.
    states = text_encoder({"caption": PROMPTS[:2]})
    cached = text_encoder({"caption": ["ignored", "ignored"], "caption_emb": states.half()})
    torch.testing.assert_close(cached, states.half().float())
    assert text_encoder.null({"caption_emb": states}).shape == (2, MAX_LEN, 384)  # no caption needed
    with pytest.raises(UserError, match="caption_emb.*max_length=32.*--text-max-length 32"):
        text_encoder({"caption": ["a"], "caption_emb": torch.zeros(1, 77, 384)})
    manifest = {"text_encoder": {"model": text_encoder.model_name, "max_length": MAX_LEN}}
    text_encoder.check_cache(manifest, keys=["caption", "caption_emb"])  # same encoder: fine
    with pytest.raises(UserError, match="other-encoder"):
        text_encoder.check_cache(
            {"text_encoder": {"model": "other-encoder", "max_length": 32}}, ["caption_emb"]
        )
    text_encoder.check_cache({"text_encoder": {"model": "other-encoder"}}, ["caption"])  # cache not read


def test_text_encoder_is_frozen(text_encoder):
    assert not text_encoder.trainable
    assert not any(p.requires_grad for p in text_encoder.parameters())
    text_encoder.train()
    assert not text_encoder.transformer.training  # stays in eval mode (no dropout)
    assert not text_encoder({"caption": ["a"]}).requires_grad
    assert Conditioner([text_encoder]).trainable_parameters() == []
    assert not any(k.startswith("null_context") for k in text_encoder.state_dict())


def test_text_encoder_penultimate_layer():
    from transformers import AutoModel

    enc = FrozenTextEncoder(max_length=8, layer="penultimate")
    model = AutoModel.from_pretrained(default_text_encoder(), local_files_only=True).eval()
    tokens = enc.tokenizer(["a red bus"], padding="max_length", max_length=8, return_tensors="pt")
    with torch.no_grad():
        expected = model(**tokens, output_hidden_states=True).hidden_states[-2]
    torch.testing.assert_close(enc({"caption": "a red bus"}), expected)


def test_text_encoder_missing_path_names_it(tmp_path):
    missing = tmp_path / "no_such_encoder"
    with pytest.raises(UserError, match="no_such_encoder"):
        FrozenTextEncoder(str(missing))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="config.json"):
        FrozenTextEncoder(str(tmp_path / "empty"))


def test_text_encoder_max_length_beyond_positions():
    with pytest.raises(UserError, match="512"):
        FrozenTextEncoder(max_length=600)


def _tiny_clip(path) -> None:
    """A random 2-layer CLIP text model with a letter-level BPE tokenizer, saved like a hub folder."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in "abcdefghijklmnopqrstuvwxyz":
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    if "vocab" in inspect.signature(CLIPTokenizer.__init__).parameters:
        tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    else:  # transformers 4.x
        (path / "vocab.json").write_text(json.dumps(vocab))
        (path / "merges.txt").write_text("#version: 0.2\n")
        tokenizer = CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"))
    config = CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )  # fmt: skip
    torch.manual_seed(0)
    CLIPTextModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)


def test_clip_text_encoder_detected_from_config(tmp_path):
    from transformers import CLIPTextModel

    _tiny_clip(tmp_path)
    enc = FrozenTextEncoder(str(tmp_path), max_length=8)
    assert isinstance(enc.transformer, CLIPTextModel) and enc.is_clip
    context = enc({"caption": ["a cat", "dog"]})
    assert context.shape == (2, 8, 32) and enc.context_dim == 32
    assert (context[0, 1:] - context[1, 1:]).abs().max() > 1e-3
    # CLIP is causal and SD passes no mask: position 0 (start token) is the same for every prompt.
    torch.testing.assert_close(context[0, 0], context[1, 0])
    penultimate = FrozenTextEncoder(str(tmp_path), max_length=8, layer="penultimate")
    assert penultimate({"caption": ["a cat"]}).shape == (1, 8, 32)


# BERTEmbedder trained from scratch ------------------------------------------------------------------


def test_bert_embedder_wordpiece_ids_from_vocab():
    bert = BERTEmbedder(n_layer=1, n_embed=32, max_length=12, n_heads=4)
    ids = bert.token_ids(["A photo of a cat"])
    expected = vocab_ids("[CLS]", "a", "photo", "of", "a", "cat", "[SEP]") + vocab_ids("[PAD]") * 5
    assert ids.tolist() == [expected]
    assert expected[:7] == [101, 1037, 6302, 1997, 1037, 4937, 102]  # bert-base-uncased ids
    # Subwords split with '##' (WordPiece), long prompts truncated to max_length and closed by [SEP].
    sub = vocab_ids("[CLS]", "token", "##ization", "harbour", "##s", "[SEP]")
    assert bert.token_ids(["Tokenization harbours"])[0, :6].tolist() == sub
    assert bert.token_ids(["cat " * 20])[0].tolist() == [101] + [4937] * 10 + [102]


def test_bert_embedder_shapes_and_gradients():
    torch.manual_seed(0)
    bert = BERTEmbedder(n_layer=2, n_embed=32, max_length=10, n_heads=4)
    assert bert.trainable and bert.out_dim == 32
    context = bert({"caption": ["a cat", "a dog"]})
    assert context.shape == (2, 10, 32)
    assert (context[0] - context[1]).abs().max() > 1e-3
    context.square().mean().backward()
    assert bert.token_emb.weight.grad[4937].abs().sum() > 0  # "cat" got a gradient
    assert bert.token_emb.weight.grad[2000].abs().sum() == 0  # an unused token did not
    assert all(p.grad is not None for p in bert.encoder.parameters())
    null = bert.null({"caption": ["x", "y", "z"]})
    assert null.shape == (3, 10, 32)
    torch.testing.assert_close(null[2], bert({"caption": [""]})[0])
    assert len(Conditioner([bert]).trainable_parameters()) == len(list(bert.parameters()))


def test_bert_embedder_missing_vocab(tmp_path):
    with pytest.raises(UserError, match="vocab_missing.txt"):
        BERTEmbedder(1, 32, vocab=str(tmp_path / "vocab_missing.txt"))


# Class labels -----------------------------------------------------------------------------------------


def test_class_embedder_crossattn():
    emb = ClassEmbedder(n_classes=10, embed_dim=16)
    labels = torch.tensor([0, 3, 9])
    out = emb({"label": labels})
    assert out.shape == (3, 1, 16)
    torch.testing.assert_close(out[:, 0], emb.embedding.weight[labels])
    null = emb.null({"label": labels})
    torch.testing.assert_close(null[:, 0], emb.embedding.weight[[10, 10, 10]])
    with pytest.raises(UserError, match="n_classes=10"):
        emb({"label": torch.tensor([11])})


def test_class_embedder_class_mode_passes_ids():
    emb = ClassEmbedder(n_classes=10, output="class")
    labels = torch.tensor([0, 3, 9])
    assert torch.equal(emb({"label": labels}), labels)
    assert emb.null({"label": labels}).tolist() == [10, 10, 10]
    assert not emb.trainable
    cond = Conditioner({"cls": emb})
    assert cond.num_classes == 11 and cond.context_dim is None
    out = cond({"label": labels}, train=False)
    assert torch.equal(out["y"], labels) and out["context"] is None and out["concat"] is None


# Per-key dropout ----------------------------------------------------------------------------------------


def _class_dropout(p: float, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    labels = torch.arange(n) % 10
    cond = Conditioner([ClassEmbedder(10, output="class", dropout=p)])
    y = cond({"label": labels}, train=True, generator=torch.Generator().manual_seed(seed))["y"]
    return labels, y


def test_dropout_replaces_exactly_the_drawn_samples():
    labels, y = _class_dropout(0.3, 64, seed=7)
    dropped = torch.rand(64, generator=torch.Generator().manual_seed(7)) < 0.3  # the documented draw
    assert torch.equal(y, torch.where(dropped, torch.tensor(10), labels))
    assert torch.equal(y, _class_dropout(0.3, 64, seed=7)[1])  # seeded: reproducible
    assert not torch.equal(y, _class_dropout(0.3, 64, seed=8)[1])


def test_dropout_rates():
    assert (_class_dropout(1.0, 32)[1] == 10).all()
    labels, y = _class_dropout(0.0, 32)
    assert torch.equal(y, labels)
    fraction = (_class_dropout(0.5, 4000)[1] == 10).float().mean().item()
    assert 0.46 < fraction < 0.54
    cond = Conditioner([ClassEmbedder(10, output="class", dropout=1.0)])
    assert torch.equal(cond({"label": labels}, train=False)["y"], labels)  # no dropout outside training
    with pytest.raises(UserError, match="dropout=1.5"):
        ClassEmbedder(10, output="class", dropout=1.5)


def test_dropout_is_per_key_in_container_order(text_encoder):
    emb = ClassEmbedder(10, embed_dim=384, dropout=0.5)
    text_encoder.dropout = 0.5
    try:
        cond = Conditioner({"txt": text_encoder, "cls": emb})
        batch = {"caption": ["cat", "dog", "bird", "fish", "cow", "owl"], "label": torch.arange(6)}
        out = cond(batch, train=True, generator=torch.Generator().manual_seed(3))
    finally:
        text_encoder.dropout = 0.0
    g = torch.Generator().manual_seed(3)
    drop_txt, drop_cls = torch.rand(6, generator=g) < 0.5, torch.rand(6, generator=g) < 0.5
    assert drop_txt.tolist() != drop_cls.tolist()  # this seed draws different masks for the two keys
    context = out["context"]  # (6, MAX_LEN + 1, 384)
    plain = text_encoder(batch)
    with torch.no_grad():
        tokens = emb.embedding(torch.where(drop_cls, torch.tensor(10), batch["label"]))
    for i in range(6):
        expected_txt = text_encoder.null_context[0] if drop_txt[i] else plain[i]
        torch.testing.assert_close(context[i, :MAX_LEN], expected_txt)
        torch.testing.assert_close(context[i, MAX_LEN], tokens[i])


# Spatial concat conditions ----------------------------------------------------------------------------


def test_inpainting_concat_mask_and_masked_latents():
    image = torch.rand(2, 3, 64, 64) * 2 - 1
    mask = torch.zeros(2, 1, 64, 64)
    mask[:, :, 16:48, 8:40] = 1
    batch = {"masked_image": image * (1 - mask), "mask": mask}
    inpaint = InpaintingConditioner(latent_channels=4)
    out = inpaint(batch, encode_fn=fake_encode)
    assert out.shape == (2, 5, 8, 8) and inpaint.out_dim == 5
    torch.testing.assert_close(out[:, :1], mask[:, :, ::8, ::8])  # nearest resize, as SD-inpainting
    torch.testing.assert_close(out[:, 1:], fake_encode(batch["masked_image"]))
    null = inpaint.null(batch, encode_fn=fake_encode)  # everything masked
    assert (null[:, 0] == 1).all()
    torch.testing.assert_close(null[:, 1:], fake_encode(torch.zeros(2, 3, 64, 64)))
    prepared = inpaint.prepare({"image": image[0], "mask": mask[0, 0]})  # raw (3,H,W) image, (H,W) mask
    torch.testing.assert_close(prepared["masked_image"], batch["masked_image"][:1])
    with pytest.raises(ValueError, match="encode_fn"):
        inpaint(batch)
    with pytest.raises(UserError, match="latent_channels: 4"):
        InpaintingConditioner(latent_channels=3)(batch, encode_fn=fake_encode)


def test_superres_resizes_lowres_to_latent():
    lowres = torch.rand(2, 3, 16, 16) * 2 - 1
    same = SuperResConditioner()  # LDM-SR: x4 SR with an f=4 autoencoder
    assert torch.equal(same({"lowres": lowres}), lowres) and same.out_dim == 3
    up = SuperResConditioner(upscale=2.0)
    assert up({"lowres": lowres}).shape == (2, 3, 32, 32)
    assert up({"lowres": lowres}, latent_size=(24, 24)).shape == (2, 3, 24, 24)
    assert (up.null({"lowres": lowres}) == 0).all()
    encoded = SuperResConditioner(encode=True, upscale=4.0)
    out = encoded({"lowres": lowres}, encode_fn=fake_encode)  # 16 px -> 2 latent -> x4
    assert out.shape == (2, 4, 8, 8) and encoded.out_dim == 4


def test_semantic_map_one_hot_at_latent_resolution():
    torch.manual_seed(0)
    seg = torch.randint(0, 5, (2, 64, 64))
    area = SemanticMapConditioner(num_classes=5, downsample_factor=8)
    out = area({"segmap": seg})
    assert out.shape == (2, 5, 8, 8)
    torch.testing.assert_close(out.sum(1), torch.ones(2, 8, 8))  # class fractions per latent cell
    reference = F.interpolate(F.one_hot(seg, 5).permute(0, 3, 1, 2).float(), size=(8, 8), mode="area")
    torch.testing.assert_close(out, reference)
    fractions = one_hot_area(seg, 5, (6, 6))  # a non-integer factor takes the full-resolution path
    assert fractions.shape == (2, 5, 6, 6)
    torch.testing.assert_close(fractions.sum(1), torch.ones(2, 6, 6))
    nearest = SemanticMapConditioner(num_classes=5, mode="nearest")({"segmap": seg})
    torch.testing.assert_close(nearest, F.one_hot(seg[:, ::8, ::8], 5).permute(0, 3, 1, 2).float())
    remapped = SemanticMapConditioner(num_classes=5, out_channels=3)
    assert remapped.trainable and not area.trainable
    out = remapped({"segmap": seg})
    assert out.shape == (2, 3, 8, 8) and remapped.out_dim == 3
    out.sum().backward()
    assert remapped.remap.weight.grad.abs().sum() > 0
    assert (remapped.null({"segmap": seg}) == 0).all()
    with pytest.raises(UserError, match="num_classes=5"):
        area({"segmap": torch.full((1, 8, 8), 255)})


# The container ------------------------------------------------------------------------------------------


def _shapes(kwargs: dict) -> dict:
    return {k: None if v is None else tuple(v.shape) for k, v in kwargs.items()}


def test_container_txt2img(text_encoder):
    cond = Conditioner({"txt": text_encoder})
    assert cond.context_dim == 384 and cond.concat_channels == 0 and cond.num_classes is None
    out = cond({"caption": PROMPTS}, train=False)
    assert _shapes(out) == {"context": (3, MAX_LEN, 384), "concat": None, "y": None}
    uncond = cond.null_conditioning({"caption": PROMPTS})
    torch.testing.assert_close(uncond["context"][1], out["context"][2])  # the "" prompt
    c, u = cond.encode_with_null({"caption": PROMPTS[0]}, batch_size=4)  # one prompt for 4 images
    assert c["context"].shape == u["context"].shape == (4, MAX_LEN, 384)
    torch.testing.assert_close(c["context"][3], out["context"][0])
    cond.check_unet(context_dim=384, in_channels=4, latent_channels=4)
    with pytest.raises(UserError, match=r"context_dim is 768 .* 384"):
        cond.check_unet(context_dim=768, in_channels=4, latent_channels=4)


def test_container_class_conditional_both_modes():
    labels = torch.tensor([1, 2, 3, 4])
    xattn = Conditioner([ClassEmbedder(1000, embed_dim=64)])
    assert _shapes(xattn({"label": labels}, train=False)) == {
        "context": (4, 1, 64),
        "concat": None,
        "y": None,
    }
    assert xattn.context_dim == 64 and xattn.num_classes is None
    ids = Conditioner([ClassEmbedder(1000, output="class")])
    assert _shapes(ids({"label": labels}, train=False)) == {"context": None, "concat": None, "y": (4,)}
    assert ids.null_conditioning({"label": labels})["y"].tolist() == [1000] * 4
    assert ids.encode({"label": 7}, batch_size=2)["y"].tolist() == [7, 7]
    ids.check_unet(context_dim=None, in_channels=4, latent_channels=4, num_classes=1001)
    with pytest.raises(UserError, match=r"num_classes is 1000 .* needs 1001"):
        ids.check_unet(context_dim=None, in_channels=4, latent_channels=4, num_classes=1000)


def test_container_inpainting_hybrid_with_text(text_encoder):
    cond = Conditioner({"txt": text_encoder, "inpaint": InpaintingConditioner()})
    cond.set_encode_fn(fake_encode)
    mask = torch.zeros(2, 1, 64, 64)
    mask[..., 32:, :] = 1
    image = torch.rand(2, 3, 64, 64) * 2 - 1
    batch = {"caption": ["a cat", "a dog"], "masked_image": image * (1 - mask), "mask": mask, "image": image}
    out = cond(batch, train=False)
    assert _shapes(out) == {"context": (2, MAX_LEN, 384), "concat": (2, 5, 8, 8), "y": None}
    assert cond.concat_channels == 5
    uncond = cond.null_conditioning(batch)
    torch.testing.assert_close(uncond["concat"], out["concat"])  # CompVis: concat kept for guidance
    torch.testing.assert_close(uncond["context"], text_encoder.null_context.expand(2, -1, -1))
    strict = Conditioner({"txt": text_encoder, "inpaint": InpaintingConditioner()}, uncond_keeps_concat=False)
    assert (strict.null_conditioning(batch, encode_fn=fake_encode)["concat"][:, 0] == 1).all()
    # Sampling from raw inputs: one prompt, one (3,H,W) image and an (H,W) mask.
    c, u = cond.encode_with_null({"caption": "a cat", "image": image[0], "mask": mask[0, 0]})
    torch.testing.assert_close(c["concat"], out["concat"][:1])
    torch.testing.assert_close(u["concat"], c["concat"])
    cond.check_unet(context_dim=384, in_channels=9, latent_channels=4)  # SD-inpainting's 9 channels
    with pytest.raises(UserError, match=r"in_channels is 4 .* = 9"):
        cond.check_unet(context_dim=384, in_channels=4, latent_channels=4)
    spatial_only = Conditioner([InpaintingConditioner()])
    spatial_only.set_encode_fn(fake_encode)
    assert copy.deepcopy(spatial_only)._encode_fn is None  # EMA copies never drag the autoencoder along


def test_container_superres_and_semantic():
    lowres = torch.rand(2, 3, 16, 16)
    sr = Conditioner({"lowres": SuperResConditioner()})
    assert _shapes(sr({"lowres": lowres}, train=False)) == {
        "context": None,
        "concat": (2, 3, 16, 16),
        "y": None,
    }
    sr.check_unet(context_dim=None, in_channels=6, latent_channels=3)  # LDM-SR: 3 latent + 3 low-res channels
    seg = Conditioner([SemanticMapConditioner(182, downsample_factor=4, out_channels=3)])
    out = seg({"segmap": torch.randint(0, 182, (2, 32, 32))}, train=False)
    assert _shapes(out) == {"context": None, "concat": (2, 3, 8, 8), "y": None}
    both = Conditioner([SuperResConditioner(upscale=0.5), SemanticMapConditioner(5, downsample_factor=2)])
    batch = {"lowres": lowres, "segmap": torch.randint(0, 5, (2, 16, 16))}
    assert both(batch, train=False)["concat"].shape == (2, 8, 8, 8)  # 3 + 5 channels along C


def test_container_user_errors(text_encoder):
    with pytest.raises(UserError, match=r"384.*64|64.*384"):
        Conditioner([text_encoder, ClassEmbedder(10, embed_dim=64)])
    with pytest.raises(UserError, match="Only one"):
        Conditioner([ClassEmbedder(10, output="class"), ClassEmbedder(5, output="class", input_key="other")])
    with pytest.raises(UserError, match="not a conditioner"):
        Conditioner([torch.nn.Linear(2, 2)])
    cond = Conditioner({"txt": text_encoder, "cls": ClassEmbedder(10, embed_dim=384)})
    with pytest.raises(UserError, match="'label'"):
        cond({"caption": ["a"]}, train=False)
    with pytest.raises(UserError, match="batch size"):
        cond({"caption": ["a", "b"], "label": torch.tensor([1, 2, 3])}, train=False)
    assert Conditioner([])({"image": torch.zeros(1)}, train=False) == {
        "context": None,
        "concat": None,
        "y": None,
    }


def test_container_skips_null_entries():
    cond = Conditioner({"txt": None, "cls": ClassEmbedder(10, output="class")})
    assert list(cond.conditioners) == ["cls"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_container_on_gpu_encodes_cpu_inputs(text_encoder):
    cond = Conditioner({"txt": text_encoder, "cls": ClassEmbedder(10, embed_dim=384, dropout=0.5)}).cuda()
    try:
        c, u = cond.encode_with_null({"caption": "a cat", "label": 3}, batch_size=2)
        assert c["context"].device.type == u["context"].device.type == "cuda"
        assert c["context"].shape == (2, MAX_LEN + 1, 384)
        batch = {"caption": ["a", "b"], "label": torch.tensor([1, 2], device="cuda")}
        out = cond(batch, train=True, generator=torch.Generator().manual_seed(0))  # CPU generator
        assert out["context"].device.type == "cuda"
    finally:
        cond.cpu()
