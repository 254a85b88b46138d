"""Fine-tuning released weights in one command (experiment=finetune): the module the base file describes,
what stays frozen, EMA, param groups, optimizers, validation images, accumulation, resume, bad input."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from train_helpers import compose_train, load_ckpt

import train
from ldm.config_checks import check_train_config
from ldm.errors import UserError
from ldm.models.first_stage import weights_identity
from ldm.training import optim as optim_lib
from ldm.training.finetune import TunedTextEncoder, check_data_keys, module_from_base
from ldm.training.runtime import find_user_error

GOLDENS = Path(__file__).parent / "goldens"
CIN = GOLDENS / "ldm_cin256"
BSR = GOLDENS / "ldm_bsr_sr"
OPTIM = {"lr": 1e-3, "warmup_steps": 0, "schedule": "constant"}


def sd_module(sd_base, **kw):
    file, config, tokenizer = sd_base
    kw.setdefault("optim", dict(OPTIM))
    return module_from_base(
        str(file), base_config=str(config), text_encoder=str(tokenizer), resolution=64, **kw
    )


def cin_module(**kw):
    kw.setdefault("optim", dict(OPTIM))
    return module_from_base(str(CIN / "model.safetensors"), base_config=str(CIN / "config.yaml"), **kw)


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def fit_steps(module, batch, steps: int) -> None:
    """`steps` optimizer steps on one fixed batch, as configure_optimizers sets them up (no Trainer)."""
    opt = optim_lib.build_optimizer(module.param_groups(), **module.optim)["optimizer"]
    for i in range(steps):
        loss, _ = module.model.training_loss(batch, True, torch.Generator().manual_seed(100 + i))
        loss.backward()
        opt.step()
        opt.zero_grad()
        if module.ema is not None:
            module.ema.update(module.model)


def fixed_loss(module, batch, n: int = 8) -> float:
    """Mean loss over n fixed (t, noise) draws: comparable before and after training."""
    with torch.no_grad():
        return (
            sum(
                float(module.model.training_loss(batch, False, torch.Generator().manual_seed(i))[0])
                for i in range(n)
            )
            / n
        )


def shapes_batch(n: int, size: int, key: str) -> dict:
    """Coloured squares on grey (labels 0..n-1 / captions), a deterministic batch."""
    gen = torch.Generator().manual_seed(0)
    image = torch.full((n, 3, size, size), -0.2)
    for i in range(n):
        colour = torch.rand(3, 1, 1, generator=gen) * 2 - 1
        image[i, :, size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = colour
    cond = torch.arange(n) if key == "label" else ["a red circle"] * n
    return {"image": image, key: cond}


# -- the module the base file describes ----------------------------------------------------------------


def test_sd_base_builds_unet_trainable_rest_frozen_scale_and_schedule_from_the_file(sd_base):
    file, _, _ = sd_base
    module = sd_module(sd_base)
    model = module.model
    state = load_file(str(file))
    assert float(model.first_stage.scale_factor) == pytest.approx(0.18215)  # the file's, not re-fitted
    assert model.parameterization == "eps"
    torch.testing.assert_close(model.schedule.alphas_cumprod, state["alphas_cumprod"].float())
    assert all(p.requires_grad for p in model.unet.parameters())
    assert not any(p.requires_grad for p in model.first_stage.parameters())
    assert not any(p.requires_grad for p in model.conditioner.parameters())
    # EMA starts from the base UNet (= the file's weights), and only the UNet is averaged
    unet_file = {k[len("model.diffusion_model.") :]: v for k, v in state.items() if "diffusion_model" in k}
    ema = module.ema.averaged_state(module.model)
    assert {k[5:] for k in module.ema._names} == set(unet_file)
    for name, value in unet_file.items():
        assert torch.equal(ema["unet." + name], value.float()), name
    assert [g["name"] for g in module.param_groups()] == ["unet"]
    assert module.base["scale_factor"] == pytest.approx(0.18215)


def test_cin256_label_model_loss_goes_down_first_stage_bit_identical_ema_from_base():
    module = cin_module(optim={"lr": 3e-3, "warmup_steps": 0})
    assert module.model.input_keys == ("label",)
    first = snapshot(module.model.first_stage)
    ema_start = {
        k: v.clone() for k, v in module.ema.averaged_state(module.model).items() if k.startswith("unet.")
    }
    assert all(torch.equal(v, module.model.state_dict()[k]) for k, v in ema_start.items())
    assert module.model.conditioner.conditioners  # the class embedding trains with the UNet (as the base did)
    assert all(p.requires_grad for p in module.model.conditioner.parameters())
    batch = shapes_batch(4, 16, "label")
    before = fixed_loss(module, batch)
    fit_steps(module, batch, 30)
    after = fixed_loss(module, batch)
    assert after < 0.7 * before, (before, after)
    assert same(first, snapshot(module.model.first_stage))
    assert int(module.ema.num_updates) == 30


def test_gradient_checkpointing_sets_every_unet_block_and_gives_the_same_gradients():
    plain, ckpt = cin_module(), cin_module(gradient_checkpointing=True)
    flags = [m.use_checkpoint for m in ckpt.model.unet.modules() if hasattr(m, "use_checkpoint")]
    assert flags and all(flags)
    assert not any(m.use_checkpoint for m in plain.model.unet.modules() if hasattr(m, "use_checkpoint"))
    batch = shapes_batch(2, 16, "label")
    for module in (plain, ckpt):
        loss, _ = module.model.training_loss(batch, True, torch.Generator().manual_seed(0))
        loss.backward()
    for (name, a), b in zip(plain.model.unet.named_parameters(), ckpt.model.unet.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_trainable_text_encoder_gets_its_own_lr_and_changes_first_stage_does_not(sd_base):
    module = sd_module(sd_base, train_text_encoder=True, text_encoder_lr=1e-2, cond_dropout=0.0)
    text = (
        module.model.conditioner.conditioners["text"]
        if "text" in module.model.conditioner.conditioners
        else None
    )
    text = text or next(iter(module.model.conditioner.conditioners.values()))
    assert isinstance(text, TunedTextEncoder)
    groups = module.param_groups()
    assert [g["name"] for g in groups][0] == "unet" and len(groups) == 2
    assert groups[1]["lr"] == 1e-2
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in text.transformer.parameters()}
    built = optim_lib.build_optimizer(groups, **module.optim)["optimizer"]
    assert [g["lr"] for g in built.param_groups] == [1e-3, 1e-2]
    first, text_before = snapshot(module.model.first_stage), snapshot(text.transformer)
    fit_steps(module, shapes_batch(2, 64, "caption"), 2)
    assert same(first, snapshot(module.model.first_stage))
    assert not same(text_before, snapshot(text.transformer))
    frozen = sd_module(sd_base)
    fit_steps(frozen, shapes_batch(2, 64, "caption"), 1)
    assert same(text_before, snapshot(next(iter(frozen.model.conditioner.conditioners.values())).transformer))


# -- optimizers --------------------------------------------------------------------------------------


def _one_step(factory, **options) -> torch.Tensor:
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(8, 4))
    built = optim_lib.build_optimizer([w], lr=1e-2, optimizer=factory, warmup_steps=2, **options)
    before = w.detach().clone()
    (w**2).sum().backward()
    built["optimizer"].step()
    built["lr_scheduler"]["scheduler"].step()
    assert built["optimizer"].param_groups[0]["lr"] == pytest.approx(1e-2)  # warm-up: 0.5x, then 1x
    return (w.detach() - before).abs().max()


@pytest.mark.parametrize("name", ["adamw", "adafactor", "prodigy"])
def test_each_optimizer_builds_steps_and_keeps_the_warmup_schedule(name):
    if name == "prodigy":
        pytest.importorskip("prodigyopt", reason="prodigyopt not installed (pip install 'ldm[optim]')")
    assert _one_step(getattr(optim_lib, name)) > 0


def test_adamw_8bit_refused_on_cpu_and_bitsandbytes_named_when_missing():
    w = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(UserError, match="CUDA GPUs only.*optim=adamw"):
        optim_lib.build_optimizer([w], lr=1e-3, optimizer=optim_lib.adamw_8bit)
    with pytest.raises(UserError, match=r"pip install 'ldm\[optim\]'"):
        optim_lib._require("surely_not_installed_pkg", "adamw_8bit")


def test_build_adamw_keeps_its_behaviour_and_unknown_options_are_named():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(3))
    built = optim_lib.build_adamw([w], lr=1e-3, betas=(0.9, 0.99), weight_decay=0.01, warmup_steps=4)
    opt = built["optimizer"]
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["betas"] == (0.9, 0.99)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3 / 4)
    with pytest.raises(UserError, match="takes no option 'momentum'"):
        optim_lib.build_optimizer([w], lr=1e-3, optimizer=optim_lib.adafactor, momentum=0.9)


def test_optim_group_composes_into_model_optim():
    cfg = compose_train(["experiment=finetune", "optim=prodigy", "base_model=x"])
    assert cfg.model.optim.optimizer._target_ == "ldm.training.optim.prodigy"
    assert compose_train(["experiment=txt2img"]).model.optim.get("optimizer") is None


# -- the command end to end ------------------------------------------------------------------------------


def finetune_overrides(data: Path, out: Path, base: Path, config: Path, steps: int, *extra: str) -> list[str]:
    return [
        "experiment=finetune",
        "trainer=cpu",
        "logger=csv",
        f"paths.runs_dir={out.parent}",
        f"paths.output_dir={out}",
        f"base_model={base}",
        f"base_config={config}",
        f"data.train_shards={data}/train-*.tar",
        "data.val_shards=null",
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
        "model.optim.warmup_steps=0",
        "model.optim.lr=1e-3",
        "validation.seeds=[3]",
        *extra,
    ]


def cin_overrides(data: Path, out: Path, steps: int, *extra: str) -> list[str]:
    return finetune_overrides(
        data,
        out,
        CIN / "model.safetensors",
        CIN / "config.yaml",
        steps,
        "data.resolution=16",
        "data.keys=[image,label]",
        "validation.prompts=[0,4]",
        *extra,
    )


def test_command_cin256_accumulates_validates_and_exports(tiny_data, tmp_path):
    out = tmp_path / "run"
    overrides = cin_overrides(
        tiny_data,
        out,
        2,
        "trainer.accumulate_grad_batches=2",
        "validation.every_n_steps=1",
        "+callbacks.probe._target_=train_helpers.RankProbe",
        f"+callbacks.probe.out_dir={tmp_path / 'probe'}",
    )
    train.train(compose_train(overrides))
    probe = torch.load(tmp_path / "probe" / "rank0.pt", weights_only=True)
    assert probe["global_step"] == 2 and len(probe["keys"]) == 4  # 4 batches, 2 optimizer steps
    last = load_ckpt(out / "checkpoints" / "last.ckpt")
    assert int(last["state_dict"]["ema.num_updates"]) == 2  # one EMA update per optimizer step
    step0 = json.loads((out / "images" / "validation_step000000.json").read_text())
    step2 = json.loads((out / "images" / "validation_step000002.json").read_text())
    assert step0["images"] == step2["images"] == [{"label": 0, "seed": 3}, {"label": 4, "seed": 3}]
    assert step2["rows"] == ["base model (step 0)", "step 2"]
    from PIL import Image

    w0, h0 = Image.open(out / "images" / "validation_step000000.png").size
    w2, h2 = Image.open(out / "images" / "validation_step000002.png").size
    assert w0 == w2 and h2 > h0  # the base row above the current one
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        config = json.loads(f.metadata()["config"])
        assert float(f.get_tensor("scale_factor")) == pytest.approx(1.0)  # VQ base: the file's (none = 1)
    assert config["finetuned_from"]["path"].endswith("ldm_cin256/model.safetensors")
    # the fine-tune samples like any model: rebuilt from its base file, with the run's (EMA) weights
    from ldm.interop.load import load_model
    from ldm.pipeline import Pipeline

    loaded = load_model(out / "model.safetensors")
    assert loaded.format == "export" and loaded.input_keys == ("label",)
    ema = {k[len("ema.") :]: v for k, v in last["state_dict"].items() if k.startswith("ema.unet")}
    unet = loaded.model.unet.state_dict()
    assert all(
        torch.equal(unet[n], ema["unet" + n.replace(".", "")])
        for n in unet
        if "unet" + n.replace(".", "") in ema
    )
    images = Pipeline(loaded, device="cpu").class_cond([0, 4], steps=2).images
    assert len(images) == 2 and images[0].size == (16, 16)


def test_command_sd_v1_with_prompts_and_bf16(sd_base, tiny_data, tmp_path):
    file, config, tokenizer = sd_base
    out = tmp_path / "run"
    overrides = finetune_overrides(
        tiny_data,
        out,
        file,
        config,
        2,
        f"text_encoder={tokenizer}",
        "data.resolution=64",
        "trainer.precision=bf16-mixed",
        "validation.every_n_steps=2",
        "validation.prompts=[a red circle]",
        "model.gradient_checkpointing=true",
    )
    metrics = train.train(compose_train(overrides))
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    info = json.loads((out / "images" / "validation_step000002.json").read_text())
    assert info["images"] == [{"caption": "a red circle", "seed": 3}]


def test_command_bsr_sr_reads_lowres_from_the_superres_task(tiny_data, tmp_path):
    overrides = finetune_overrides(
        tiny_data,
        tmp_path / "run",
        BSR / "model.safetensors",
        BSR / "config.yaml",
        1,
        "data.resolution=32",
        "data.keys=[image]",
        "data/task=superres",
        "validation.every_n_steps=1",
    )
    metrics = train.train(compose_train(overrides))
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    assert (tmp_path / "run" / "images" / "validation_step000001.png").is_file()


def test_resume_last_matches_the_uninterrupted_run(tiny_data, tmp_path):
    straight, parts = tmp_path / "a" / "run", tmp_path / "b" / "run"
    train.train(compose_train(cin_overrides(tiny_data, straight, 4, "validation.every_n_steps=0")))
    train.train(compose_train(cin_overrides(tiny_data, parts, 2, "validation.every_n_steps=0")))
    resumed = [*cin_overrides(tiny_data, parts, 4, "validation.every_n_steps=0"), "ckpt_path=last"]
    train.train(compose_train(resumed))
    a = load_ckpt(straight / "checkpoints" / "step000004.ckpt")
    b = load_ckpt(parts / "checkpoints" / "step000004.ckpt")
    assert a["global_step"] == b["global_step"] == 4
    differ = [k for k in a["state_dict"] if not torch.equal(a["state_dict"][k], b["state_dict"][k])]
    assert not differ, differ[:3]


# -- latent cache made with the base model's own autoencoder ------------------------------------------


def test_cache_latents_with_base_model_records_its_autoencoder(tiny_data, tmp_path):
    from ldm.data.cache_latents import cache_latents, check_latent_manifest

    out = tmp_path / "cache"
    manifest = cache_latents(
        None,
        f"{tiny_data}/train-000000.tar",
        out,
        base_model=str(CIN / "model.safetensors"),
        base_config=str(CIN / "config.yaml"),
        num_workers=0,
        batch_size=8,
    )
    module = cin_module()
    identity = weights_identity(module.model.first_stage.autoencoder)
    assert manifest["autoencoder"]["identity"] == identity and manifest["resolution"] == 16
    assert manifest["latent_shape"] == [4, 8, 8]
    check_latent_manifest(out, identity)  # what the fine-tune run checks in on_fit_start
    run = tmp_path / "run"
    overrides = cin_overrides(tiny_data, run, 2, "data.latents=true", "data.flip=false", "data.crop=center")
    overrides = [o for o in overrides if not o.startswith("data.train_shards=")]
    metrics = train.train(
        compose_train([*overrides, f"data.train_shards={out}/train-*.tar", "data.keys=[label]"])
    )
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))


def test_cache_with_the_base_text_encoder_fits_the_finetune_module(sd_base, tiny_data, tmp_path):
    from ldm.data.cache_latents import cache_latents

    file, config, tokenizer = sd_base
    manifest = cache_latents(
        None,
        f"{tiny_data}/val-000000.tar",
        tmp_path / "cache",
        base_model=str(file),
        base_config=str(config),
        base_tokenizer=str(tokenizer),
        text_encoder="base",
        num_workers=0,
    )
    assert manifest["resolution"] == 64 and manifest["latent_shape"] == [4, 8, 8]  # the base's native size
    assert manifest["text_encoder"] == {"model": str(tokenizer), "max_length": 77}
    module = sd_module(sd_base)
    assert manifest["autoencoder"]["identity"] == weights_identity(module.model.first_stage.autoencoder)
    text = next(iter(module.model.conditioner.conditioners.values()))
    text.check_cache(manifest, ["caption_emb"])  # the fine-tune's encoder accepts these states


# -- bad input: one line each ----------------------------------------------------------------------------


def _train_error(overrides: list[str]) -> str:
    with pytest.raises(Exception) as info:
        train.train(compose_train(overrides))
    error = find_user_error(info.value)
    assert error is not None, info.value
    assert "\n" not in str(error)
    return str(error)


def test_bad_config_rows_refuse_before_work(tmp_path):
    def problem(*overrides: str) -> str:
        with pytest.raises(UserError) as info:
            check_train_config(
                compose_train(["experiment=finetune", f"paths.output_dir={tmp_path}", *overrides])
            )
        return str(info.value)

    base = f"base_model={CIN / 'model.safetensors'}"
    assert "base_model=null: experiment=finetune needs the model to start from" in problem()
    assert "no such file" in problem(f"base_model={tmp_path / 'missing.safetensors'}")
    assert "model.text_encoder_lr=1e-06: the text encoder is frozen" in problem(
        base, "model.text_encoder_lr=1e-6"
    )
    assert "CUDA GPUs only" in problem(base, "optim=adamw_8bit", "trainer=cpu")
    assert "no such folder" in problem(base, f"text_encoder={tmp_path / 'nothing'}")
    assert "validation.prompt_file=" in problem(base, f"validation.prompt_file={tmp_path / 'p.txt'}")


def test_prompt_file_adds_prompts(tmp_path):
    from ldm.training.validation import read_prompts

    (tmp_path / "p.txt").write_text("a red circle\n\n a blue square \n")
    assert read_prompts(["x"], str(tmp_path / "p.txt")) == ["x", "a red circle", "a blue square"]


def test_factory_refuses_missing_base_and_text_lr_without_text_training():
    with pytest.raises(UserError, match="base_model is not set"):
        module_from_base(None, optim=dict(OPTIM))
    with pytest.raises(UserError, match="add model.train_text_encoder=true"):
        cin_module(text_encoder_lr=1e-6)
    with pytest.raises(UserError, match="has no text encoder"):
        cin_module(train_text_encoder=True)


def test_sd_base_without_tokenizer_names_text_encoder(sd_base):
    file, config, _ = sd_base
    with pytest.raises(UserError, match="pass text_encoder=<local folder with the CLIP tokenizer"):
        module_from_base(str(file), optim=dict(OPTIM), base_config=str(config))


def test_unsupported_family_message_passes_through_train(tiny_data, tmp_path):
    weird = tmp_path / "weird.safetensors"
    weights = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(7, 5, 3, 3)}
    save_file({**weights, "alphas_cumprod": torch.linspace(1, 0, 1000)}, weird)  # original, unknown UNet
    overrides = finetune_overrides(tiny_data, tmp_path / "run", weird, CIN / "config.yaml", 1)
    overrides = [o for o in overrides if not o.startswith("base_config=")]
    message = _train_error(overrides)
    assert message.startswith(f"{weird} is an original CompVis/Stability checkpoint")
    assert "no supported family matches without its yaml: pass base_config=<its inference yaml>" in message
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_resolution_other_than_native_warns_with_the_native_size(caplog):
    with caplog.at_level(logging.WARNING, logger="ldm.training.finetune"):
        cin_module(resolution=32)
    assert "data.resolution=32 but model.safetensors was trained at 16 px" in caplog.text


def test_data_that_cannot_feed_the_base_conditioner_is_named(tiny_data, tmp_path):
    from ldm.data.datamodule import ShardDataModule

    dm = ShardDataModule(f"{tiny_data}/train-*.tar", keys=["image", "caption"])
    with pytest.raises(UserError, match=r"reads batch key 'label'.*data.keys=\[image,label\]"):
        check_data_keys(("label",), dm.options, dm.task, "cin.safetensors")
    with pytest.raises(UserError, match="data/task=superres"):
        check_data_keys(("lowres",), dm.options, dm.task, "bsr.safetensors")
    with pytest.raises(UserError, match="no data option delivers"):
        check_data_keys(("depth",), dm.options, dm.task, "depth.safetensors")
    sr = ShardDataModule(
        f"{tiny_data}/train-*.tar", keys=["image"], task={"_target_": "ldm.data.degradations.SuperResolution"}
    )
    check_data_keys(("lowres",), sr.options, sr.task, "bsr.safetensors")
    message = _train_error(cin_overrides(tiny_data, tmp_path / "run", 1, "data.keys=[image,caption]"))
    assert "reads batch key 'label'" in message
