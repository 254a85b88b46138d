"""Speed switches (ldm/training/speed.py): torch.compile and channels-last change no result beyond float
tolerance, keep the plain parameter names, and go through train.py, resume and sampling unchanged.

The fast tests compile with TorchDynamo's `eager` backend (graph capture, guards and recompiles as with
inductor, but no C++ code generation: seconds instead of minutes on 2 cores); the inductor test is slow.
"""

from __future__ import annotations

import copy
import subprocess
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from ldm_fixtures import TINY_AE, bare_trainer, ldm_config, make_batch, save_tiny_autoencoder
from omegaconf import OmegaConf
from safetensors import safe_open
from train_helpers import PYTHON, REPO, compose_train, free_port, load_ckpt, subprocess_env, tiny_overrides

import train
from ldm import config_checks
from ldm.errors import UserError
from ldm.modules.unet import UNetModel
from ldm.pipeline import Pipeline
from ldm.training import speed
from ldm.training.optim import adamw, build_optimizer, fused_adamw_supported
from ldm.training.speed import is_compiled, prepare_for_speed

FAST_BACKEND = "eager"
CL = torch.channels_last


def tiny_unet() -> UNetModel:
    """A 2-level UNet with self- and cross-attention, every weight random (no zero-initialised output)."""
    torch.manual_seed(0)
    unet = UNetModel(
        in_channels=4, out_channels=4, model_channels=32, num_res_blocks=1, attention_resolutions=[2],
        channel_mult=[1, 2], num_head_channels=32, context_dim=16,
    )  # fmt: skip
    with torch.no_grad():
        for p in unet.parameters():
            p.normal_(0, 0.05)
    return unet


def unet_inputs() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 16, 16, generator=g)  # (B, C, h, w) latents
    context = torch.randn(2, 5, 16, generator=g)  # (B, tokens, context_dim)
    target = torch.randn(2, 4, 16, 16, generator=g)
    return x, torch.tensor([10, 900]), context, target


def unet_step(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Output, loss, flat gradient and the weights after one SGD step (lr 0.1). SGD, not Adam: Adam divides
    by |g|, which turns float noise in gradients that are zero in exact arithmetic (conv biases right before
    a GroupNorm, ~1e-10) into lr-sized steps (measured 4e-4 with lr 1e-3 for channels-last vs NCHW)."""
    x, t, context, target = unet_inputs()
    out = unet(x, t, context=context)
    loss = F.mse_loss(out, target)
    loss.backward()
    grad = torch.cat([p.grad.flatten() for p in unet.parameters()])
    torch.optim.SGD(unet.parameters(), lr=0.1).step()
    weights = torch.cat([p.detach().flatten() for p in unet.parameters()])
    return {"out": out.detach(), "loss": loss.detach(), "grad": grad, "weights": weights}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||: summation-order noise of float32 kernels is ~1e-7."""
    return float((a - b).norm() / b.norm())


# ---- the function ------------------------------------------------------------------------------------


def test_compile_keeps_plain_names_and_results():
    from torch._dynamo.utils import counters

    eager = tiny_unet()
    compiled = prepare_for_speed(copy.deepcopy(eager), compile=True, compile_backend=FAST_BACKEND)
    assert is_compiled(compiled) and not is_compiled(eager) and type(compiled) is UNetModel
    assert list(compiled.state_dict()) == list(eager.state_dict())  # no `_orig_mod.` prefix
    graphs = counters["stats"]["unique_graphs"]
    a, b = unet_step(compiled), unet_step(eager)
    assert counters["stats"]["unique_graphs"] > graphs  # the forward really went through TorchDynamo
    for key in a:  # the eager backend runs the captured graph with the same kernels: bit-exact
        assert torch.equal(a[key], b[key]), key
    compiled.load_state_dict(eager.state_dict())  # plain names load both ways
    eager.load_state_dict(compiled.state_dict())


def test_compiled_autoencoder_takes_new_batch_sizes_with_a_posterior_draw():
    """Train, validation and image-logging batches differ in size. Under dynamic shapes torch 2.13 fails on
    the posterior's `torch.randn(size, generator=None)` with a symbolic batch; static shapes recompile."""
    torch.manual_seed(0)
    eager = instantiate(TINY_AE)
    compiled = prepare_for_speed(copy.deepcopy(eager), compile=True, compile_backend=FAST_BACKEND)
    for n in (1, 2, 3):
        x = torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(n)) * 2 - 1
        torch.manual_seed(n)
        dec, _ = compiled(x, sample_posterior=True)
        torch.manual_seed(n)
        assert torch.equal(dec, eager(x, sample_posterior=True)[0]) and dec.shape == (n, 3, 32, 32)


@pytest.mark.slow
def test_inductor_compiled_unet_equals_eager_within_float_tolerance():
    """The real backend (C++ code generation: minutes on 2 shared cores the first time, seconds once inductor
    has cached it): fused kernels, another summation order. Measured: loss equal, output 3.0e-7 and gradient
    5.5e-7 relative."""
    eager = tiny_unet()
    compiled = prepare_for_speed(copy.deepcopy(eager), compile=True)  # inductor, mode default
    a, b = unet_step(compiled), unet_step(eager)
    assert list(compiled.state_dict()) == list(eager.state_dict())
    assert float((a["loss"] - b["loss"]).abs() / b["loss"]) < 1e-6
    for key in ("out", "grad", "weights"):
        assert rel(a[key], b[key]) < 1e-5, (key, rel(a[key], b[key]))


def test_channels_last_unet_equals_nchw_within_1e_5():
    nchw = tiny_unet()
    nhwc = prepare_for_speed(copy.deepcopy(nchw), channels_last=True)
    conv = nhwc.input_blocks[0][0].weight
    assert conv.is_contiguous(memory_format=CL) and not conv.is_contiguous()
    a, b = unet_step(nhwc), unet_step(nchw)
    assert float((a["loss"] - b["loss"]).abs() / b["loss"]) < 1e-6
    for key in ("out", "grad", "weights"):
        assert rel(a[key], b[key]) < 1e-5, (key, rel(a[key], b[key]))
    # The measured difference is float noise (~1e-7), not zero: the NHWC kernels did run.
    assert rel(a["out"], b["out"]) > 0
    assert list(nhwc.state_dict()) == list(nchw.state_dict())


def test_channels_last_autoencoder_equals_nchw_within_1e_5():
    torch.manual_seed(0)
    nchw = instantiate(TINY_AE)
    nhwc = prepare_for_speed(copy.deepcopy(nchw), channels_last=True)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    results = []
    for model in (nhwc, nchw):
        dec, posterior = model(x, sample_posterior=False)  # (2, 3, 32, 32), posterior mode
        loss = F.l1_loss(dec, x) + 1e-6 * posterior.kl().mean()
        loss.backward()
        grad = torch.cat([p.grad.flatten() for p in model.parameters()])
        results.append((dec.detach(), loss.detach(), grad))
    (dec_a, loss_a, grad_a), (dec_b, loss_b, grad_b) = results
    assert dec_a.is_contiguous(memory_format=CL)
    assert rel(dec_a, dec_b) < 1e-5 and rel(grad_a, grad_b) < 1e-5
    assert float((loss_a - loss_b).abs() / loss_b) < 1e-6


def test_bad_mode_and_backend_are_user_errors():
    with pytest.raises(UserError, match=r"model.compile_mode=fast: use one of default, reduce-overhead"):
        prepare_for_speed(torch.nn.Linear(2, 2), compile=True, compile_mode="fast")
    with pytest.raises(UserError, match=r"model.compile_backend=tvm: use one of inductor"):
        prepare_for_speed(torch.nn.Linear(2, 2), compile=True, compile_backend="tvm")
    # config_checks keeps its own copy (it must not import torch): the two lists agree
    assert config_checks.COMPILE_MODES == speed.COMPILE_MODES
    assert config_checks.COMPILE_BACKENDS == speed.COMPILE_BACKENDS


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.compile_mode=fast", "model.compile_mode=fast: use one of default, reduce-overhead"),
        ("model.compile=yes", "model.compile=yes: must be true or false"),
        ("model.channels_last=1", "model.channels_last=1: must be true or false"),
        ("+model.compile_backend=tvm", "model.compile_backend=tvm: use one of inductor, aot_eager, eager"),
        ("+model.optim.fused=maybe", "model.optim.fused=maybe: must be true or false"),
        ("+model.optim.optimizer.fused=2", "model.optim.optimizer.fused=2: must be true or false"),
    ],
)
def test_config_checks_name_the_key(override, message, tmp_path):
    cfg = compose_train(["experiment=autoencoder_kl", f"paths.output_dir={tmp_path}", override])
    with pytest.raises(UserError, match=message):
        config_checks.check_train_config(cfg)


def test_adamw_is_fused_on_cpu_and_equal_to_the_per_tensor_loop():
    fused_unet, loop_unet = tiny_unet(), tiny_unet()
    fused = adamw([{"params": list(fused_unet.parameters())}], lr=1e-3, weight_decay=0.01)
    loop = torch.optim.AdamW(loop_unet.parameters(), lr=1e-3, weight_decay=0.01, foreach=False)
    assert fused.defaults["fused"] is True and fused_adamw_supported(fused.param_groups)
    for step in range(3):
        g = torch.Generator().manual_seed(step)
        for a, b in zip(fused_unet.parameters(), loop_unet.parameters()):
            a.grad = torch.randn(a.shape, generator=g)
            b.grad = a.grad.clone()
        fused.step()
        loop.step()
    a = torch.cat([p.detach().flatten() for p in fused_unet.parameters()])
    b = torch.cat([p.detach().flatten() for p in loop_unet.parameters()])
    assert 0 < (a - b).abs().max() < 1e-6  # float rounding, not another algorithm
    one = [torch.nn.Parameter(torch.ones(2))]
    assert build_optimizer(one, lr=1.0)["optimizer"].defaults["fused"] is True  # model.optim: the default
    assert not build_optimizer(one, lr=1.0, fused=False)["optimizer"].defaults["fused"]  # model.optim.fused
    on_meta = [{"params": [torch.nn.Parameter(torch.ones(2, device="meta"))]}]
    with pytest.raises(UserError, match=r"model.optim.fused=true: .* no fused AdamW for parameters on meta"):
        adamw(on_meta, lr=1.0, fused=True)


def test_every_model_config_documents_the_switches():
    conf = Path(__file__).resolve().parents[1] / "conf" / "model"
    for name in ("ldm", "finetune", "lora", "autoencoder_kl", "autoencoder_vq"):
        text = (conf / f"{name}.yaml").read_text()
        cfg = OmegaConf.load(conf / f"{name}.yaml")
        assert (cfg.compile, cfg.compile_mode, cfg.channels_last) == (False, "default", False), name
        for key in ("compile:", "compile_mode:", "channels_last:"):
            line = next(line for line in text.splitlines() if line.startswith(key))
            assert "#" in line, f"{name}.yaml: {key} has no comment"


# ---- the modules ---------------------------------------------------------------------------------------


def test_modules_apply_the_switches(tmp_path):
    ae_path = save_tiny_autoencoder(tmp_path)
    cfg = ldm_config(ae_path, "class")
    module = instantiate({**cfg, "compile": True, "compile_backend": FAST_BACKEND, "channels_last": True})
    assert is_compiled(module.unet) and not is_compiled(module.first_stage.autoencoder)
    assert module.unet.input_blocks[0][0].weight.is_contiguous(memory_format=CL)
    # EMA copies the parameters by their plain names (CompVis: dots removed), in the same memory format
    shadow = dict(module.ema.named_buffers())["unetinput_blocks00weight"]
    assert shadow.is_contiguous(memory_format=CL)
    assert all("_orig_mod" not in k for k in module.state_dict())
    ae_cfg = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf/model/autoencoder_kl.yaml")
    ae_cfg.autoencoder = TINY_AE
    ae_cfg.loss.perceptual_weight = 0.0
    ae_module = instantiate(ae_cfg, compile=True, compile_backend=FAST_BACKEND, channels_last=True)
    assert is_compiled(ae_module.autoencoder)
    assert ae_module.autoencoder.encoder.conv_in.weight.is_contiguous(memory_format=CL)
    assert ae_module.hparams.channels_last is True  # saved with the checkpoint's hyperparameters


def test_bf16_mixed_loss_within_half_a_percent_of_fp32(tmp_path):
    """trainer.precision=bf16-mixed (CPU autocast): the first step's loss against full float32 (measured:
    0.59527 vs 0.59543, 2.8e-4 relative; bf16 keeps 8 mantissa bits, 3.9e-3 per rounding)."""
    ae_path = save_tiny_autoencoder(tmp_path)
    batch = make_batch("class")
    losses = {}
    for precision in ("32-true", "bf16-mixed"):
        torch.manual_seed(0)
        module = instantiate(ldm_config(ae_path, "class"))
        with torch.no_grad():  # random output layers: the prediction carries the UNet's arithmetic
            for p in module.unet.parameters():
                p.normal_(0, 0.05)
        probe = _LossProbe()
        loader = torch.utils.data.DataLoader([batch], batch_size=None)
        bare_trainer(1, callbacks=[probe], precision=precision).fit(module, loader)
        losses[precision] = probe.losses[0]
    full, bf16 = losses["32-true"], losses["bf16-mixed"]
    assert full > 0.1 and abs(bf16 - full) / full < 5e-3, losses
    assert bf16 != full  # autocast did change the arithmetic


class _LossProbe(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


# ---- train.py: checkpoint names, EMA, resume, export and sampling with model.compile=true --------------

EXPERIMENT = "class_cond"  # condition dropout, noise and timesteps drawn per step: a strict comparison


def _run(data: Path, ae: Path, run_dir: Path, steps: int, *extra: str) -> None:
    overrides = tiny_overrides(EXPERIMENT, data, run_dir, ae, max_steps=steps, every=2)
    train.train(compose_train(overrides + list(extra)))


def _assert_same_state(a: dict, b: dict) -> None:
    assert a["global_step"] == b["global_step"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    differ = [k for k in a["state_dict"] if not torch.equal(a["state_dict"][k], b["state_dict"][k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"
    assert len(a["optimizer_states"]) == len(b["optimizer_states"])
    for opt_a, opt_b in zip(a["optimizer_states"], b["optimizer_states"]):
        assert opt_a["state"].keys() == opt_b["state"].keys()
        for i, state in opt_a["state"].items():
            for name, value in state.items():
                assert torch.equal(value, opt_b["state"][i][name]), f"AdamW state[{i}][{name}] differs"


def test_train_compiled_saves_plain_names_resumes_and_samples_like_eager(tiny_data, tiny_ae, tmp_path):
    from torch._dynamo.utils import counters

    compiled = ("model.compile=true", f"+model.compile_backend={FAST_BACKEND}")
    _run(tiny_data, tiny_ae, tmp_path / "eager", 4)
    graphs = counters["stats"]["unique_graphs"]
    _run(tiny_data, tiny_ae, tmp_path / "compiled", 2, *compiled)  # previews (eval, no grad) at step 2
    assert counters["stats"]["unique_graphs"] >= graphs + 2  # training and preview graphs were captured
    _run(tiny_data, tiny_ae, tmp_path / "compiled", 4, *compiled, "ckpt_path=last")
    eager, comp = (tmp_path / name / "checkpoints" for name in ("eager", "compiled"))

    for step in (2, 4):  # before and after the resume: UNet, EMA (model_ema-style buffers) and AdamW
        ckpt = load_ckpt(comp / f"step{step:06d}.ckpt")
        assert not [k for k in ckpt["state_dict"] if "_orig_mod" in k]
        assert any(k.startswith("ema.") for k in ckpt["state_dict"])
        _assert_same_state(ckpt, load_ckpt(eager / f"step{step:06d}.ckpt"))
    assert load_ckpt(comp / "last.ckpt")["state_dict"]["ema.num_updates"] == 4

    export = tmp_path / "compiled" / "model.safetensors"
    with safe_open(str(export), "pt") as f:
        keys = list(f.keys())
    assert "model.diffusion_model.input_blocks.0.0.weight" in keys
    assert not [k for k in keys if "_orig_mod" in k]
    images = [
        Pipeline.from_file(tmp_path / name / "model.safetensors", device="cpu")
        .class_cond(1, n=2, steps=3, seed=0)
        .tensors
        for name in ("compiled", "eager")
    ]
    assert images[0].shape == (2, 3, 32, 32)
    assert torch.equal(images[0], images[1])


def test_train_autoencoder_compiled_equals_eager_and_channels_last_within_1e_5(tiny_data, tmp_path):
    def run(name: str, steps: int, *extra: str) -> dict:
        overrides = tiny_overrides("autoencoder_kl", tiny_data, tmp_path / name, None, max_steps=steps)
        return train.train(compose_train(overrides + list(extra)))

    from torch._dynamo.utils import counters

    run("eager", 2)
    graphs = counters["stats"]["unique_graphs"]
    run("compiled", 2, "model.compile=true", f"+model.compile_backend={FAST_BACKEND}")
    assert counters["stats"]["unique_graphs"] > graphs  # the autoencoder's forward went through TorchDynamo
    eager, comp = (load_ckpt(tmp_path / name / "checkpoints" / "last.ckpt") for name in ("eager", "compiled"))
    assert not [k for k in comp["state_dict"] if "_orig_mod" in k]
    assert len(comp["optimizer_states"]) == 2  # generator and discriminator (the GAN is on from step 1)
    _assert_same_state(comp, eager)
    with safe_open(str(tmp_path / "compiled" / "model.safetensors"), "pt") as f:
        assert "encoder.conv_in.weight" in f.keys()

    # One step: the logged losses come from the initial weights, so only the NHWC kernels differ
    first = run("eager1", 1)
    nhwc = run("channels_last1", 1, "model.channels_last=true")
    for key in ("train/rec_loss", "train/g_loss", "train/kl_loss"):
        assert abs(nhwc[key] - first[key]) <= 1e-5 * abs(first[key]), (key, nhwc[key], first[key])


@pytest.mark.slow
def test_ddp_compiled_ranks_share_weights_with_plain_names(tiny_data, tiny_ae, tmp_path):
    """trainer=ddp_cpu (2 processes, gloo) with model.compile=true: DDP wraps the module whose UNet call is
    compiled; the all-reduced weights agree on both ranks and the checkpoint has plain names."""
    probe_dir, run_dir = tmp_path / "probe", tmp_path / "runs" / "run"
    args = [
        a for a in tiny_overrides(EXPERIMENT, tiny_data, run_dir, tiny_ae, max_steps=2) if a != "trainer=cpu"
    ]
    args += [
        "trainer=ddp_cpu",
        "model.compile=true",
        f"+model.compile_backend={FAST_BACKEND}",
        "+callbacks.probe._target_=train_helpers.RankProbe",
        f"+callbacks.probe.out_dir={probe_dir}",
    ]
    env = subprocess_env(MASTER_PORT=str(free_port()))
    result = subprocess.run(
        [PYTHON, "train.py", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=400
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ranks = [torch.load(probe_dir / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert [p["world_size"] for p in ranks] == [2, 2] and [p["global_step"] for p in ranks] == [2, 2]
    for name in ("unet", "ema_unet"):
        a, b = ranks[0][name], ranks[1][name]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    ckpt = load_ckpt(run_dir / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 2 and not [k for k in ckpt["state_dict"] if "_orig_mod" in k]
