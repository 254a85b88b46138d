"""LoRA training (experiment=lora) on the tiny SD-1.x-structured base and on a cin256 golden (labels)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from test_finetune import OPTIM, fit_steps, fixed_loss, shapes_batch
from train_helpers import compose_train, load_ckpt

import train
from ldm.adapters import lora as L
from ldm.errors import UserError
from ldm.interop.load import load_model
from ldm.training.lora import lora_module_from_base

GOLDENS = Path(__file__).parent / "goldens"
CIN = GOLDENS / "ldm_cin256"
LORA = {"rank": 4, "alpha": None, "dropout": 0.0, "targets": ["attn"], "text_encoder": False}


def sd_lora(sd_base, lora=None, **kw):
    file, config, tokenizer = sd_base
    kw.setdefault("optim", dict(OPTIM))
    kw.setdefault("ema_decay", 0)
    return lora_module_from_base(
        str(file),
        lora={**LORA, **(lora or {})},
        base_config=str(config),
        text_encoder=str(tokenizer),
        resolution=64,
        **kw,
    )


def unet_out(model, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    ctx = torch.randn(2, 77, 64, generator=gen)
    with torch.no_grad():
        return model.unet(x, torch.tensor([10, 700]), context=ctx)


def randomise_up(model, std: float = 0.05, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in L.lora_layers(model):
            for up in layer.lora_B.values():
                up.weight.copy_(torch.randn(up.weight.shape, generator=gen) * std)


def test_zero_init_lora_leaves_the_output_exactly_unchanged_and_only_adapters_train(sd_base):
    file, config, tokenizer = sd_base
    base = load_model(file, config=config, text_encoder=str(tokenizer)).model
    module = sd_lora(sd_base, {"targets": ["attn", "proj", "ff", "conv"], "text_encoder": True})
    assert torch.equal(unet_out(base), unet_out(module.model))  # exactly: lora_B starts at zero
    trainable = [n for n, p in module.model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert not any(p.requires_grad for p in module.model.first_stage.parameters())
    groups = module.param_groups()
    assert [g["name"] for g in groups] == ["unet", "text"]
    assert sum(p.numel() for g in groups for p in g["params"]) == module.lora["trainable_parameters"]
    # the summary counts what was wrapped: every CrossAttention has 4 projections, etc.
    n_attn = sum(type(m).__name__ == "CrossAttention" for m in base.unet.modules())
    n_st = sum(type(m).__name__ == "SpatialTransformer" for m in base.unet.modules())
    assert module.lora["unet_layers"] >= 4 * n_attn + 2 * n_st + 2 * n_st  # attn + proj + ff (+ conv)
    assert module.lora["text_layers"] == 2 * 6  # 2 CLIP layers x (q, k, v, out, fc1, fc2)


def test_adapter_is_small_and_merged_equals_unmerged(sd_base):
    file, config, tokenizer = sd_base
    module = sd_lora(sd_base, {"rank": 1, "targets": ["attn"]})
    summary = module.lora
    share = summary["trainable_parameters"] / summary["unet_parameters"]
    assert share < 0.05, share  # rank 1 on the attention projections of the tiny UNet
    randomise_up(module.model)
    merged = load_model(file, config=config, text_encoder=str(tokenizer)).model
    assert L.merge_lora(merged, L.lora_state(module.model)) == summary["unet_layers"]
    a, b = unet_out(module.model), unet_out(merged)
    assert (a - b).abs().max() < 1e-5 and (
        a - unet_out(load_model(file, config=config, text_encoder=str(tokenizer)).model)
    ).abs().max() > 1e-3


def test_conv_rank_and_alpha_reach_peft_layers(sd_base):
    module = sd_lora(sd_base, {"rank": 4, "alpha": 8, "targets": ["attn", "conv"], "conv_rank": 2})
    state = L.lora_state(module.model)
    conv3 = [w for n, w in state.items() if w.down.ndim == 4 and w.down.shape[-1] == 3]
    linear = [w for n, w in state.items() if w.down.ndim == 2]
    assert conv3 and all(w.rank == 2 and w.alpha == 2.0 for w in conv3)
    assert linear and all(w.rank == 4 and w.alpha == 8.0 for w in linear)


def test_lora_training_moves_only_the_adapter_and_lowers_the_loss(sd_base):
    optim = {**OPTIM, "lr": 1e-2}
    module = sd_lora(sd_base, {"rank": 8, "targets": list(L.TARGET_GROUPS)}, cond_dropout=0.0, optim=optim)
    batch = shapes_batch(4, 64, "caption")
    frozen = {n: p.detach().clone() for n, p in module.model.named_parameters() if not p.requires_grad}
    before = fixed_loss(module, batch)
    fit_steps(module, batch, 30)
    after = fixed_loss(module, batch)
    assert after < 0.7 * before, (before, after)  # measured: 1.026 -> 0.501
    for n, p in module.model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


def test_lora_on_a_label_model_cin256():
    module = lora_module_from_base(
        str(CIN / "model.safetensors"),
        optim=dict(OPTIM),
        lora=dict(LORA),
        base_config=str(CIN / "config.yaml"),
        ema_decay=0.9,
    )
    assert module.lora["unet_layers"] > 0
    assert set(module.ema._names) == {n for n, p in module.model.named_parameters() if p.requires_grad}
    batch = shapes_batch(4, 16, "label")
    before = fixed_loss(module, batch)
    fit_steps(module, batch, 20)
    assert fixed_loss(module, batch) < before


def test_untrained_base_is_refused(sd_base, tmp_path):
    """A fresh UNet's output conv is zero: no gradient reaches the adapters (a user run learnt nothing)."""
    from safetensors.torch import load_file, save_file

    file, config, tokenizer = sd_base
    state = load_file(str(file))
    state["model.diffusion_model.out.2.weight"] = torch.zeros_like(
        state["model.diffusion_model.out.2.weight"]
    )
    save_file(state, tmp_path / "fresh.safetensors")
    with pytest.raises(UserError, match="untrained"):
        sd_lora((tmp_path / "fresh.safetensors", config, tokenizer))


def test_lora_bad_options_name_the_fix(sd_base):
    with pytest.raises(UserError, match="lora.targets"):
        sd_lora(sd_base, {"targets": ["attention"]})
    with pytest.raises(UserError, match="lora.rank"):
        sd_lora(sd_base, {"rank": 0})
    with pytest.raises(UserError, match="lora.text_encoder=true"):
        sd_lora(sd_base, {"text_encoder_lr": 1e-5})
    with pytest.raises(UserError, match="no text encoder"):
        lora_module_from_base(
            str(CIN / "model.safetensors"),
            optim=dict(OPTIM),
            lora={**LORA, "text_encoder": True},
            base_config=str(CIN / "config.yaml"),
        )


# -- the command -----------------------------------------------------------------------------------------


def lora_overrides(data: Path, out: Path, sd_base, steps: int, *extra: str) -> list[str]:
    file, config, tokenizer = sd_base
    return [
        "experiment=lora",
        "trainer=cpu",
        "logger=csv",
        f"paths.runs_dir={out.parent}",
        f"paths.output_dir={out}",
        f"base_model={file}",
        f"base_config={config}",
        f"text_encoder={tokenizer}",
        f"data.train_shards={data}/train-*.tar",
        "data.val_shards=null",
        "data.batch_size=2",
        "data.num_workers=0",
        "data.shuffle_buffer=16",
        "data.resolution=64",
        f"trainer.max_steps={steps}",
        "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false",
        "+trainer.enable_model_summary=false",
        "callbacks.periodic_checkpoint.every_n_train_steps=1",
        "callbacks.best_checkpoint=null",
        "model.preview_steps=2",
        "model.optim.lr=1e-3",
        "validation.seeds=[3]",
        "validation.every_n_steps=0",
        *extra,
    ]


def test_command_checkpoints_only_the_adapter_resumes_exactly_and_exports_both_files(
    sd_base, tiny_data, tmp_path
):
    straight, parts = tmp_path / "a" / "run", tmp_path / "b" / "run"
    extra = ("model.lora.text_encoder=true", "model.lora.text_encoder_lr=5e-4", "model.ema_decay=0.9")
    train.train(compose_train(lora_overrides(tiny_data, straight, sd_base, 3, *extra)))
    train.train(compose_train(lora_overrides(tiny_data, parts, sd_base, 2, *extra)))
    train.train(compose_train([*lora_overrides(tiny_data, parts, sd_base, 3, *extra), "ckpt_path=last"]))
    a = load_ckpt(straight / "checkpoints" / "step000003.ckpt")
    b = load_ckpt(parts / "checkpoints" / "step000003.ckpt")
    keys = set(a["state_dict"])
    assert keys and all(".lora_A." in k or ".lora_B." in k or k.startswith("ema.") for k in keys)
    assert any("conditioner" in k for k in keys)  # the text-encoder LoRA is in too
    ups = [v for k, v in a["state_dict"].items() if ".lora_B." in k and not k.startswith("ema.")]
    assert ups and all(float(v.abs().max()) > 0 for v in ups)  # trained: every up weight left its zero init
    differ = [k for k in keys if not torch.equal(a["state_dict"][k], b["state_dict"][k])]
    assert not differ, differ[:3]
    size = (straight / "checkpoints" / "step000003.ckpt").stat().st_size
    file = sd_base[0]
    assert size < 0.5 * file.stat().st_size  # adapter + optimizer state, not the base model
    assert not (straight / "model.safetensors").exists()
    with safe_open(str(straight / "lora.safetensors"), "pt") as f:
        kohya = f.metadata()
        assert len(list(f.keys())) > 0
    assert json.loads(kohya["ss_network_dim"]) == 4 and float(kohya["ss_network_alpha"]) == 4.0
    with safe_open(str(straight / "pytorch_lora_weights.safetensors"), "pt") as f:
        peft_meta = json.loads(f.metadata()["lora_adapter_metadata"])
        assert all(".lora_A." in k or ".lora_B." in k for k in f.keys())
    assert peft_meta["unet.r"] == 4 and float(peft_meta["unet.lora_alpha"]) == 4.0
    with safe_open(str(straight / "lora.safetensors"), "pt") as f:
        assert all(k.startswith(("lora_unet_", "lora_te_")) for k in f.keys())


def test_lora_checkpoint_does_not_resume_a_full_finetune(sd_base, tiny_data, tmp_path):
    out = tmp_path / "run"
    train.train(compose_train(lora_overrides(tiny_data, out, sd_base, 1)))
    last = out / "checkpoints" / "last.ckpt"
    ckpt = load_ckpt(last)
    bad = copy.deepcopy(ckpt)
    bad["state_dict"] = {k: v for k, v in bad["state_dict"].items() if "attn1" not in k}
    torch.save(bad, tmp_path / "bad.ckpt")
    with pytest.raises(Exception) as info:
        train.train(
            compose_train(
                [
                    *lora_overrides(tiny_data, tmp_path / "run2", sd_base, 2),
                    f"ckpt_path={tmp_path / 'bad.ckpt'}",
                ]
            )
        )
    assert "missing there" in str(info.value) or "missing there" in repr(info.value.__cause__)


def test_command_bf16_gradient_checkpointing_and_sampling_with_the_exported_lora(
    sd_base, tiny_data, tmp_path
):
    from ldm.pipeline import Pipeline

    file, config, tokenizer = sd_base
    out = tmp_path / "run"
    extra = ("trainer.precision=bf16-mixed", "model.gradient_checkpointing=true", "model.lora.rank=2")
    metrics = train.train(compose_train(lora_overrides(tiny_data, out, sd_base, 2, *extra)))
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    base = Pipeline.from_file(file, config=config, text_encoder=str(tokenizer), device="cpu")
    tuned = Pipeline.from_file(
        file,
        config=config,
        text_encoder=str(tokenizer),
        device="cpu",
        lora=[f"{out / 'lora.safetensors'}:1.0"],
    )
    kw = {"n": 1, "steps": 2, "seed": 0}
    a = base.txt2img("a red circle", **kw).tensors
    b = tuned.txt2img("a red circle", **kw).tensors
    assert tuned.adapters[0]["layers"] > 0 and not torch.equal(a, b)
    record = tuned.txt2img("a red circle", **kw).record
    assert record["parameters"]["adapters"][0]["scale"] == 1.0  # also in each PNG's parameters
    # scale 0 is the base model exactly
    zero = Pipeline.from_file(
        file, config=config, text_encoder=str(tokenizer), device="cpu", lora=[(out / "lora.safetensors", 0.0)]
    )
    assert torch.equal(zero.txt2img("a red circle", **kw).tensors, a)


@pytest.mark.slow
def test_lora_ddp_ranks_hold_the_same_adapter(tiny_data, tmp_path):
    import subprocess

    from train_helpers import PYTHON, REPO, free_port, subprocess_env

    out, probe = tmp_path / "run", tmp_path / "probe"
    args = [
        "experiment=lora",
        "trainer=ddp_cpu",
        "logger=csv",
        f"paths.runs_dir={tmp_path}",
        f"paths.output_dir={out}",
        f"base_model={CIN / 'model.safetensors'}",
        f"base_config={CIN / 'config.yaml'}",
        f"data.train_shards={tiny_data}/train-*.tar",
        "data.val_shards=null",
        "data.keys=[image,label]",
        "data.resolution=16",
        "data.batch_size=2",
        "data.num_workers=0",
        "trainer.max_steps=2",
        "trainer.enable_progress_bar=false",
        "callbacks.best_checkpoint=null",
        "validation.every_n_steps=0",
        "model.optim.lr=1e-2",
        "+callbacks.probe._target_=train_helpers.RankProbe",
        f"+callbacks.probe.out_dir={probe}",
    ]
    env = subprocess_env(MASTER_PORT=str(free_port()))
    result = subprocess.run(
        [PYTHON, "train.py", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ranks = [torch.load(probe / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    lora = [{k: v for k, v in r["unet"].items() if "lora_" in k} for r in ranks]
    assert lora[0] and all(torch.equal(lora[0][k], lora[1][k]) for k in lora[0])
    moved = [k for k in lora[0] if not torch.equal(lora[0][k], ranks[0]["unet_start"][k])]
    assert moved
    base = [k for k in ranks[0]["unet"] if "lora_" not in k]
    assert all(torch.equal(ranks[0]["unet"][k], ranks[0]["unet_start"][k]) for k in base)
    assert (out / "lora.safetensors").is_file()
