"""The web page's glue without a browser (ldm.app): a click draws sample.py's images, progress counts every
step, LoRA lists never stack, bad input is one line, the page offers the model's tasks and conf/sampler."""

from __future__ import annotations

import copy
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from ldm_fixtures import AUTOENCODER, MODELS, SIZE, save_autoencoder, stage2_config
from PIL import Image

from ldm.adapters import lora as L
from ldm.adapters.lora_files import save_lora
from ldm.app import Request, Session
from ldm.app.session import editor_image_and_mask
from ldm.errors import UserError
from ldm.interop.checkpoint import save_safetensors
from ldm.interop.load import load_model
from ldm.pipeline import SAMPLERS, Pipeline

REPO = Path(__file__).resolve().parents[1]
MASK_BOX = (slice(4, 16), slice(12, 28))  # rows, columns painted white (= regenerate)


def build_tiny_model(folder: Path, kind: str = "txt2img") -> Path:
    """A tiny exported stage-2 model (random weights, 32 px, f = 4), as ldm_fixtures.build_sample_root's."""
    torch.manual_seed(0)
    ae_path = save_autoencoder(folder / "ae" / "model.safetensors", AUTOENCODER)
    conditioners, unet = MODELS[kind]
    cfg = stage2_config(ae_path, copy.deepcopy(conditioners), **unet)
    module = instantiate(copy.deepcopy(cfg))
    with torch.no_grad():  # zero-initialised output convs would make the UNet ignore t and the condition
        for p in module.unet.parameters():
            if not p.any():
                p.normal_(0, 0.05)
    module.ema.update(module.model)
    config = module.export_config({"model": cfg, "data": {"resolution": SIZE}})
    return save_safetensors(module.export_state_dict(), folder / kind / "model.safetensors", config)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("app_model"))


@pytest.fixture(scope="module")
def session(model_file, tmp_path_factory) -> Session:
    return Session.from_file(model_file, device="cpu", out_dir=tmp_path_factory.mktemp("app_out"))


@pytest.fixture(scope="module")
def lora_file(model_file, tmp_path_factory) -> Path:
    """A random LoRA on the tiny UNet's attention layers (kohya keys)."""
    model = load_model(model_file).model
    L.add_lora(model.unet, L.unet_targets(model.unet, ["attn"]), rank=2)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in L.lora_layers(model):
            w = layer.lora_B["default"].weight
            w.copy_(torch.randn(w.shape, generator=gen) * 0.2)
    return save_lora(
        tmp_path_factory.mktemp("app_lora") / "style.safetensors", L.lora_state(model), model=model
    )


def pixels(images) -> list[np.ndarray]:
    return [np.asarray(Image.open(i) if isinstance(i, Path) else i) for i in images]


def same(a, b) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(pixels(a), pixels(b)))


def editor_value() -> dict:
    """What gradio's ImageMask hands over: an RGBA background and one RGBA layer with a painted box."""
    yy, xx = np.mgrid[:SIZE, :SIZE]
    rgb = np.stack([xx * 8, yy * 8, np.full_like(xx, 128)], -1).astype(np.uint8)
    background = Image.fromarray(np.dstack([rgb, np.full((SIZE, SIZE), 255, np.uint8)]), "RGBA")
    layer = np.zeros((SIZE, SIZE, 4), np.uint8)
    layer[MASK_BOX] = (255, 255, 255, 200)  # a brush stroke: colour with alpha
    return {"background": background, "layers": [Image.fromarray(layer, "RGBA")], "composite": background}


TXT = dict(prompt="a red circle", negative_prompt="blue", n=2, seed=5, steps=3, sampler="dpmpp_2m")
TXT.update(cfg_scale=3.0, height=24, width=40)


def test_a_click_draws_what_pipeline_and_sample_py_draw(session, model_file, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO))
    from sample import sample

    out = session.generate(Request(**TXT))
    assert [im.size for im in out.images] == [(40, 24)] * 2  # PIL: (width, height)
    assert [p.name for p in out.files] == ["0000_seed5.png", "0001_seed6.png"]
    assert same(out.files, out.images)  # the gallery's PNGs are the returned images
    assert out.captions == [
        "seed 5 · dpmpp_2m · 3 steps · cfg 3.0 — a red circle",
        "seed 6 · dpmpp_2m · 3 steps · cfg 3.0 — a red circle",
    ]
    kw = {k: v for k, v in TXT.items() if k != "prompt"}
    ref = Pipeline.from_file(model_file, device="cpu").txt2img("a red circle", **kw)
    assert same(out.images, ref.images)
    assert out.record["parameters"] == ref.record["parameters"]  # sampler recorded as sample_dpmpp_2m
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        overrides = [f"{k}={v}" for k, v in TXT.items() if k != "sampler"]
        cfg = compose("sample", [f"ckpt={model_file}", "sampler=dpmpp_2m", "device=cpu", "progress=false",
                                 f"out_dir={tmp_path}", *overrides])  # fmt: skip
    sample(cfg)
    assert same(out.files, [tmp_path / p.name for p in out.files])  # sample.py's PNGs, pixel for pixel
    with zipfile.ZipFile(out.zip_path) as z:
        names = sorted(Path(n).name for n in z.namelist())
        assert names == ["0000_seed5.png", "0001_seed6.png", "grid.png", "run.json"]
        assert json.loads(z.read(f"{out.folder.name}/run.json"))["seeds"] == [5, 6]
        params = json.loads(Image.open(z.open(f"{out.folder.name}/0001_seed6.png")).text["parameters"])
    assert (params["seed"], params["prompt"], params["cfg_scale"], params["steps"]) == (
        6,
        "a red circle",
        3.0,
        3,
    )


def test_progress_counts_every_step_of_every_batch(session):
    steps: list[tuple[int, int]] = []
    session.generate(Request(prompt="x", n=5, steps=3, sampler="euler_a"), on_step=lambda *s: steps.append(s))
    assert steps == [(i, 6) for i in range(1, 7)]  # 5 images = batches of 4 + 1, 3 steps each
    steps.clear()
    image, _ = editor_image_and_mask(editor_value())
    session.generate(
        Request(task="img2img", image=image, strength=0.5, steps=4), on_step=lambda *s: steps.append(s)
    )
    assert steps == [(1, 2), (2, 2)]  # strength 0.5 of 4 steps


def test_painted_mask_and_edit_tasks(session):
    value = editor_value()
    image, mask = editor_image_and_mask(value)
    assert image.mode == "RGB" and np.array_equal(np.asarray(image), np.asarray(value["background"])[..., :3])
    expected = np.zeros((SIZE, SIZE), np.uint8)
    expected[MASK_BOX] = 255
    assert mask.mode == "L" and np.array_equal(np.asarray(mask), expected)
    assert (
        editor_image_and_mask({**value, "layers": [Image.new("RGBA", (SIZE, SIZE))]})[1] is None
    )  # unpainted
    assert editor_image_and_mask(None) == (None, None)

    kw = dict(prompt="a blue square", steps=3, n=1, seed=2)
    inpaint = session.generate(Request(task="inpaint", image=image, mask=mask, **kw))
    ref = Pipeline(session.pipe.loaded, device="cpu").inpaint(image, Image.fromarray(expected), **kw)
    assert same(inpaint.images, ref.images)
    kept = np.asarray(inpaint.images[0])[24:, :]  # rows far below the painted box keep the input exactly
    assert np.array_equal(kept, np.asarray(image)[24:, :])
    assert session.generate(Request(task="outpaint", image=image, pad=[8, 0, 0, 4], **kw)).images[0].size == (
        40,
        36,
    )
    assert session.generate(Request(task="img2img", image=image, strength=0.6, **kw)).images[0].size == (
        32,
        32,
    )
    assert session.generate(Request(task="uncond", steps=2)).images[0].size == (32, 32)


def test_lora_lists_replace_each_other_and_never_stack(session, model_file, lora_file):
    click = dict(prompt="a red circle", n=1, steps=2, seed=3)
    base = session.generate(Request(**click)).images
    full = session.generate(Request(**click, loras=f"{lora_file}:1.0")).images
    assert not same(full, base)
    assert same(session.generate(Request(**click, loras=f"{lora_file}:1.0")).images, full)  # not merged twice
    half = session.generate(Request(**click, loras=f"{lora_file}:0.5")).images
    ref = Pipeline.from_file(model_file, device="cpu", lora=[(str(lora_file), 0.5)])
    assert same(half, ref.txt2img("a red circle", n=1, steps=2, seed=3).images)  # base + 0.5, not 1.5
    assert [(a["kind"], a["scale"]) for a in session.pipe.adapters] == [("lora", 0.5)]
    assert same(session.generate(Request(**click)).images, base)  # the base weights, restored exactly
    assert session.pipe.adapters == [] and session.base_weights == {}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"prompt": "  "}, r"^The prompt is empty: type what to draw"),
        ({"task": "img2img"}, r"^task=img2img needs an input image: upload one"),
        ({"task": "inpaint", "image": Image.new("RGB", (32, 32))}, r"^task=inpaint needs a mask: paint"),
        ({"task": "outpaint", "image": Image.new("RGB", (32, 32))}, r"^task=outpaint needs a border"),
        ({"task": "semantic"}, r"^task 'semantic': this model supports txt2img, img2img, inpaint"),
        (
            {"height": 30},
            r"^height=30: must be a multiple of 4 \(the autoencoder's factor\), e.g. height=28\.$",
        ),
        ({"width": -8}, r"^width=-8: must be a whole number between 0 and 4096 \(a multiple of 4"),
        ({"width": "wide"}, r"^width='wide': must be a whole number"),
        ({"steps": 0}, r"^steps=0: must be a whole number between 1 and 1000\.$"),
        ({"n": 2.5}, r"^n=2.5: must be a whole number between 1 and 64\.$"),
        ({"cfg_scale": -1}, r"^cfg_scale=-1: must be a number >= 0"),
        ({"sampler": "k_lms"}, r"^sampler 'k_lms': use one of ddim, ddpm, plms"),
        ({"loras": "missing.safetensors:0.5"}, r"^LoRA missing.safetensors: no such file"),
        (
            {"task": "img2img", "image": Image.new("RGB", (32, 32)), "strength": 0.1, "steps": 5},
            r"runs no step",
        ),
    ],
)
def test_bad_input_is_one_line_before_any_work(session, change, message):
    before = sorted(session.out_dir.iterdir())
    with pytest.raises(UserError, match=message) as error:
        session.generate(Request(**{"prompt": "a red circle", "steps": 2, **change}))
    assert "\n" not in str(error.value)
    assert sorted(session.out_dir.iterdir()) == before  # nothing written


def test_page_offers_the_models_tasks_and_conf_samplers(session, tmp_path):
    gr = pytest.importorskip("gradio")
    from ldm.app.page import FIELDS, build_page, make_handler, visibility

    assert (
        sorted(session.samplers)
        == sorted(SAMPLERS)
        == sorted(p.stem for p in (REPO / "conf/sampler").glob("*.yaml"))
    )
    demo = build_page(session)
    by_id = {b.elem_id: b for b in demo.blocks.values() if getattr(b, "elem_id", None)}
    assert set(FIELDS) <= set(by_id)
    assert (
        [c[0] for c in by_id["task"].choices]
        == list(session.tasks)
        == ["txt2img", "img2img", "inpaint", "outpaint", "uncond"]
    )
    assert [c[0] for c in by_id["sampler"].choices] == list(SAMPLERS)
    assert (by_id["height"].value, by_id["width"].value) == session.default_size == (SIZE, SIZE)
    assert visibility(session, "inpaint") == {
        "prompt": True, "image": True, "mask": True,
        "strength": False, "pad": False, "segmap": False, "label": False,
    }  # fmt: skip
    assert not any(visibility(session, "uncond").values())

    handler, shown = make_handler(session), []
    values = {k: getattr(by_id[k], "value", None) for k in FIELDS}
    values.update(prompt="a red circle", n=2, steps=2, height=24, width=40)
    gallery, zip_path, summary = handler(
        *[values[k] for k in FIELDS], progress=lambda p, **kw: shown.append(p)
    )
    assert [Image.open(path).size for path, _ in gallery] == [(40, 24)] * 2
    assert gallery[1][1] == "seed 1 · ddim · 2 steps · cfg 5.0 — a red circle"
    assert Path(zip_path).suffix == ".zip" and summary.startswith("2 image(s) of 40×24 in ")
    assert shown == [(1, 2), (2, 2)]
    with pytest.raises(gr.Error, match="The prompt is empty"):
        handler(*[{**values, "prompt": ""}[k] for k in FIELDS], progress=lambda *a, **k: None)


def test_command_line(model_file, capsys):
    from ldm.app.__main__ import OPTIONS, main, parse_args

    opts = parse_args([f"ckpt={model_file}", "port=8123", "share=false", "device=cpu"])
    assert opts == {**OPTIONS, "ckpt": str(model_file), "port": 8123, "device": "cpu"}
    for argv, message in [
        ([], r"pass ckpt=<model file>"),
        (
            [f"ckpt={model_file}", "prot=8000"],
            r"'prot=8000': expected key=value with key one of ckpt, config",
        ),
        ([f"ckpt={model_file}", "port=http"], r"port=http: must be a whole number from 0 to 65535"),
        ([f"ckpt={model_file}", "share=maybe"], r"share=maybe: use true or false"),
    ]:
        with pytest.raises(UserError, match=message):
            parse_args(argv)
    with pytest.raises(SystemExit) as exit_:
        main([f"ckpt={model_file.parent / 'nope.safetensors'}", "device=cpu"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "nope.safetensors" in err and "\n" not in err


def test_class_model_offers_only_its_task(tmp_path):
    model = build_tiny_model(tmp_path, "class")
    session = Session.from_file(model, device="cpu", out_dir=tmp_path / "out")
    assert session.tasks == ("class",) and session.inputs("class") == ("label",)
    out = session.generate(Request(task="class", label="2, 0", n=2, steps=2, seed=1))
    assert [e["label"] for e in out.record["images"]] == [2, 2, 0, 0]
    assert out.captions[2] == "seed 3 · ddim · 2 steps · cfg 5.0 · class 0"
    with pytest.raises(UserError, match=r"^label='red': give class ids as whole numbers"):
        session.generate(Request(task="class", label="red"))
