"""bench/gpu_check.py's sections, each (check, seconds) -> its figures: UNet / LoRA / fine-tune training
steps, sampling, the DDP / FSDP smoke runs of train.py and the autoencoder; SECTIONS names them."""

from __future__ import annotations

import json
import os
import re
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import yaml
from common import count_flops
from gpu_check_util import (
    CONTEXT_LEN,
    GRACE_S,
    LATENT_FACTOR,
    REPO,
    SD1_YAML,
    Check,
    Skipped,
    fit_batch,
    run_variants,
    timed,
)

from ldm.errors import UserError

# train.py overrides of the smoke runs that depend on nothing: a tiny UNet, no image grids, one val batch.
SMOKE_OVERRIDES = """experiment=class_cond trainer.devices=1 logger=csv data.num_workers=0
    data.shuffle_buffer=16 trainer.limit_val_batches=1 trainer.log_every_n_steps=1
    +trainer.enable_model_summary=false callbacks.image_logger.every_n_steps=0
    callbacks.periodic_checkpoint.every_n_train_steps=100000
    model.unet.model_channels=32 model.unet.channel_mult=[1,2] model.unet.attention_resolutions=[2]
    model.unet.num_res_blocks=1 model.preview_steps=2 model.optim.warmup_steps=0""".split()


# ---- the models and the training step --------------------------------------------------------------------


def sd1_params() -> tuple[dict, dict]:
    """(UNet params, autoencoder ddconfig) of SD 1.x, from our built-in inference yaml."""
    params = yaml.safe_load(SD1_YAML.read_text())["model"]["params"]
    return dict(params["unet_config"]["params"]), dict(params["first_stage_config"]["params"]["ddconfig"])


def build_unet(c: Check, use_checkpoint: bool = False) -> torch.nn.Module:
    """The SD 1.x UNet (narrower in the dry run), float32 weights, built on the device in train mode."""
    from ldm.modules.unet import UNetModel

    torch.manual_seed(0)
    with c.device:
        return UNetModel.from_compvis_config(
            {**sd1_params()[0], **c.sizes.unet, "use_checkpoint": use_checkpoint}
        ).train()


def sd_schedule():
    """SD 1.x's noise schedule: scaled_linear betas 0.00085 -> 0.012 over 1000 steps (a NoiseSchedule)."""
    from ldm.diffusion.schedules import NoiseSchedule

    return NoiseSchedule("scaled_linear", 1000, 0.00085, 0.012)


def sd_loss(c: Check) -> torch.nn.Module:
    """Our training objective with SD 1.x's schedule and eps-prediction."""
    from ldm.diffusion.loss import DiffusionLoss

    return DiffusionLoss(sd_schedule(), "eps").to(c.device)


def train_inputs(c: Check, context_dim: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random clean latents (B, 4, L, L) and text context (B, 77, context_dim) on the device."""
    gen = torch.Generator(c.device).manual_seed(1)
    x0 = torch.randn(batch, 4, c.sizes.latent, c.sizes.latent, generator=gen, device=c.device)
    return x0, torch.randn(batch, CONTEXT_LEN, context_dim, generator=gen, device=c.device)


def loss_backward(c: Check, net: Callable, loss_fn, x0, context, fmt=torch.contiguous_format) -> None:
    """One DiffusionLoss forward (autocast) + backward; the UNet input in memory format `fmt`."""
    with c.autocast():
        eps = lambda x, t, **cond: net(x.contiguous(memory_format=fmt), t, **cond)  # noqa: E731
        loss, _ = loss_fn(eps, x0, {"context": context})
    loss.backward()


def train_variant(c: Check, unet, make_optimizer, seconds: float, compile=False, channels_last=False) -> dict:
    """The training step of `unet` (its trainable parameters) at the largest batch that fits: timing, peak
    memory, FLOPs per step (counted on the eager module: the same maths), images/s, TFLOP/s, MFU."""
    loss_fn = sd_loss(c)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    unet.to(memory_format=fmt)
    model = c.compile(unet) if compile else unet
    params = [p for p in unet.parameters() if p.requires_grad]

    def run(batch: int) -> dict:
        unet.zero_grad(set_to_none=True)  # no gradients left from a batch that did not fit
        x0, context = train_inputs(c, unet.context_dim, batch)
        x0 = x0.contiguous(memory_format=fmt)
        optimizer = make_optimizer(params)

        def step() -> None:
            loss_backward(c, model, loss_fn, x0, context, fmt)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        c.reset_peak()
        result = timed(step, c.sync, c.sizes.warmup, c.sizes.max_steps, seconds)
        result["peak_mem_gib"] = c.peak_gib()
        optimizer.state.clear()  # its memory back before the FLOP count
        result["flops_per_step"] = count_flops(lambda: loss_backward(c, unet, loss_fn, x0, context, fmt))
        unet.zero_grad(set_to_none=True)
        result["images_per_s"] = batch / result["step_s"]
        return {**result, **c.rates(result["flops_per_step"], result["step_s"])}

    try:
        return fit_batch(run, c.sizes.batch)
    finally:
        unet.to(memory_format=torch.contiguous_format)


def adamw(params: list) -> torch.optim.Optimizer:
    """torch AdamW as optim=adamw builds it (fused on CUDA)."""
    from ldm.training.optim import adamw as factory

    return factory([{"params": params}], lr=1e-5, weight_decay=0.01)


def adamw_8bit(params: list) -> torch.optim.Optimizer:
    """bitsandbytes' 8-bit AdamW as optim=adamw_8bit builds it; Skipped (with the reason) if it can't run."""
    from ldm.training.optim import adamw_8bit as factory

    try:
        return factory([{"params": params}], lr=1e-5, weight_decay=0.01)
    except UserError as e:
        raise Skipped(str(e)) from None


# ---- sections: each (check, seconds) -> its figures ------------------------------------------------------


def section_unet_train(c: Check, seconds: float) -> dict:
    unet = build_unet(c)
    specs = {
        f"{'compile' if comp else 'eager'}{'+channels_last' if cl else ''}": (
            lambda s, comp=comp, cl=cl: train_variant(c, unet, adamw, s, compile=comp, channels_last=cl)
        )
        for comp in (False, True)
        for cl in (False, True)
    }
    params = sum(p.numel() for p in unet.parameters())
    return dict(params=params, latent=c.sizes.latent, **run_variants(specs, seconds))


def section_lora_train(c: Check, seconds: float) -> dict:
    from ldm.adapters.lora import add_lora, unet_targets

    unet = build_unet(c)
    layers = add_lora(unet, unet_targets(unet, ["attn"]), rank=4)
    for name, p in unet.named_parameters():
        p.requires_grad_("lora_" in name)  # the base stays frozen: no weight gradients, no AdamW state
    trainable = sum(p.numel() for p in unet.parameters() if p.requires_grad)
    variants = run_variants({"eager": lambda s: train_variant(c, unet, adamw, s)}, seconds)
    return dict(rank=4, lora_layers=layers, trainable_params=trainable, **variants)


def section_finetune_train(c: Check, seconds: float) -> dict:
    def variant(make_optimizer) -> Callable[[float], dict]:
        def run(s: float) -> dict:
            make_optimizer([torch.zeros(1, device=c.device, requires_grad=True)])  # Skipped if it cannot run
            unet = build_unet(c, use_checkpoint=True)  # fresh: no other variant's optimizer state
            result = train_variant(c, unet, make_optimizer, s)
            result["flops_with_recompute"] = result["flops_per_step"]  # checkpointing runs forwards twice
            for m in unet.modules():  # model FLOPs (for MFU): the same step without the recomputation
                if hasattr(m, "use_checkpoint"):
                    m.use_checkpoint = False
            x0, context = train_inputs(c, unet.context_dim, result["batch"])
            result["flops_per_step"] = count_flops(lambda: loss_backward(c, unet, sd_loss(c), x0, context))
            return {**result, **c.rates(result["flops_per_step"], result["step_s"])}

        return run

    specs = {"adamw_8bit": variant(adamw_8bit), "adamw": variant(adamw)}
    return dict(gradient_checkpointing=True, **run_variants(specs, seconds))


def section_sampling(c: Check, seconds: float) -> dict:
    from ldm.samplers import ClassifierFreeGuidance, DiscreteDenoiser, StepSchedule, sample_dpmpp_2m, start_x

    unet = build_unet(c).eval().requires_grad_(False)
    schedule = sd_schedule().to(c.device)
    sigmas = StepSchedule(c.sizes.sample_steps, spacing="leading")(schedule.alphas_cumprod).to(c.device)
    gen = torch.Generator(c.device).manual_seed(2)
    x_T = torch.randn(1, 4, c.sizes.latent, c.sizes.latent, generator=gen, device=c.device)
    cond, uncond = torch.randn(2, 1, CONTEXT_LEN, unet.context_dim, generator=gen, device=c.device)
    calls: list[int] = []  # the batch of every UNet call

    def variant(compile: bool) -> Callable[[float], dict]:
        def run(s: float) -> dict:
            net = c.compile(unet) if compile else unet

            def eps(x, t, **kw):
                calls.append(x.shape[0])
                return net(x, t, **kw)

            guided = ClassifierFreeGuidance(DiscreteDenoiser(eps, schedule, "eps"), 7.5, {"context": uncond})

            @torch.no_grad()
            def sample() -> torch.Tensor:
                with c.autocast():
                    x = start_x(x_T, sigmas[0])
                    return sample_dpmpp_2m(guided, x, sigmas, extra_args={"context": cond}, disable=True)

            calls.clear()
            c.reset_peak()
            result = timed(sample, c.sync, 1, c.sizes.max_runs, s)
            result["peak_mem_gib"] = c.peak_gib()
            result["run_s"] = result.pop("step_s")  # one whole sampling run
            result["unet_calls_per_run"] = len(calls) / (1 + result["timed_steps"])  # warm-up run + timed
            result.update(unet_batch=max(calls), it_per_s=c.sizes.sample_steps / result["run_s"])
            x_t, t = x_T.expand(2, -1, -1, -1), torch.full((2,), 999.0, device=c.device)
            with torch.no_grad(), c.autocast():
                per_call = count_flops(lambda: unet(x_t, t, context=torch.cat([uncond, cond])))
            result["flops_per_run"] = per_call * result["unet_calls_per_run"]
            return {**result, **c.rates(result["flops_per_run"], result["run_s"])}

        return run

    variants = run_variants({"eager": variant(False), "compile": variant(True)}, seconds)
    return dict(sampler="dpmpp_2m", steps=c.sizes.sample_steps, cfg_scale=7.5, **variants)


def section_autoencoder(c: Check, seconds: float) -> dict:
    from ldm.models.autoencoder import AutoencoderKL

    side = c.sizes.latent * LATENT_FACTOR
    torch.manual_seed(0)
    with c.device:
        ae = AutoencoderKL({**sd1_params()[1], **c.sizes.ae, "resolution": side}, embed_dim=4)
    ae.eval().requires_grad_(False)

    def variant(decode: bool) -> Callable[[float], dict]:
        def measure(batch: int, s: float) -> dict:
            shape = (batch, 4, c.sizes.latent, c.sizes.latent) if decode else (batch, 3, side, side)
            x = torch.randn(shape, device=c.device)

            @torch.no_grad()
            def step() -> torch.Tensor:
                with c.autocast():
                    return ae.decode_latent(x) if decode else ae.encode_latent(x)

            c.reset_peak()
            result = timed(step, c.sync, c.sizes.warmup, c.sizes.max_steps, s)
            result.update(peak_mem_gib=c.peak_gib(), flops_per_step=count_flops(step))
            result["images_per_s"] = batch / result["step_s"]
            return {**result, **c.rates(result["flops_per_step"], result["step_s"])}

        return lambda s: fit_batch(lambda batch: measure(batch, s), c.sizes.ae_batch)

    variants = run_variants({"encode": variant(False), "decode": variant(True)}, seconds)
    return dict(params=sum(p.numel() for p in ae.parameters()), resolution=side, **variants)


def section_ddp_smoke(c: Check, seconds: float) -> dict:
    return train_smoke(c, "ddp" if c.cuda else "ddp_cpu", seconds, speed_keys=True)


def section_fsdp_smoke(c: Check, seconds: float) -> dict:
    if not c.cuda:
        raise Skipped("FSDP needs CUDA (Lightning's FSDPStrategy); the CPU dry run checks DDP only")
    return train_smoke(c, "fsdp", seconds, speed_keys=False)


def train_smoke(c: Check, trainer: str, seconds: float, speed_keys: bool) -> dict:
    """`python train.py trainer=<trainer> trainer.devices=1`, a tiny class_cond run: exit status, steps, it/s
    (the median of the progress lines' rates). `speed_keys`: also model.channels_last (and on CUDA
    model.compile), where conf/model/ldm.yaml has those keys."""
    data = shapes_data(c)
    resolution = json.loads((data / "manifest.json").read_text())["resolution"]
    work, steps = Path(c.args.out) / f"{trainer}_smoke", c.sizes.smoke_steps
    overrides = [f"trainer={trainer}", *SMOKE_OVERRIDES, f"paths.runs_dir={work / 'runs'}"]
    overrides += [
        f"paths.output_dir={work / 'runs' / time.strftime('%Y%m%d-%H%M%S')}",
        f"first_stage_ckpt={tiny_autoencoder(work / 'autoencoder' / 'model.safetensors', resolution)}",
        f"data.train_shards={data}/train-*.tar",
        f"data.val_shards={data}/val-*.tar",
        f"data.resolution={resolution}",
        f"data.batch_size={c.sizes.smoke_batch}",
        f"trainer.max_steps={steps}",
        f"trainer.val_check_interval={steps}",
    ]
    model_keys = yaml.safe_load((REPO / "conf" / "model" / "ldm.yaml").read_text())
    if speed_keys and "channels_last" in model_keys:
        overrides.append("model.channels_last=true")
    if speed_keys and "compile" in model_keys and c.cuda:
        overrides.append("model.compile=true")
    env = dict(os.environ, LDM_PROGRESS="lines", WANDB_MODE="offline", MASTER_PORT=str(free_port()))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            [sys.executable, str(REPO / "train.py"), *overrides],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=max(seconds, 60.0) + GRACE_S,
        )
    except subprocess.TimeoutExpired as e:
        raise TimeoutError(f"train.py {trainer} did not finish in {e.timeout:.0f} s") from None
    output = proc.stdout + proc.stderr
    rates = [float(r) for r in re.findall(r"([0-9.]+) it/s", output)]
    result = dict(
        trainer=trainer,
        overrides=overrides,
        returncode=proc.returncode,
        steps=max((int(s) for s in re.findall(rf"step (\d+)/{steps}\b", output)), default=0),
        wall_s=time.perf_counter() - start,
        it_per_s=statistics.median(rates) if rates else None,
    )
    if proc.returncode != 0 or result["steps"] != steps:
        return dict(result, status="failed", error=f"train.py exit {proc.returncode}: {output[-3000:]}")
    return result


def shapes_data(c: Check) -> Path:
    """The shapes shards: --data, else data/shards/shapes (`make data`'s); built by data/make_dataset.py if
    absent. A dry run without --data and without `make data`'s set builds a small one under --out."""
    default = REPO / "data" / "shards" / "shapes"
    data = Path(c.args.data) if c.args.data else default
    if not c.args.data and c.args.dry_run and not (default / "manifest.json").is_file():
        data = Path(c.args.out) / "shapes"
    if not (data / "manifest.json").is_file():
        sizes = c.sizes.data_args if data != default else ()  # the default folder gets the standard set
        cmd = [sys.executable, str(REPO / "data" / "make_dataset.py"), "--out", str(data), *sizes]
        made = subprocess.run(cmd, capture_output=True, text=True)
        if made.returncode != 0:
            raise RuntimeError(f"data/make_dataset.py --out {data} failed: {made.stderr[-2000:]}")
    return data


def tiny_autoencoder(path: Path, resolution: int) -> Path:
    """A random KL autoencoder (f=4, 4 latent channels) saved as stage 1 saves one; enough for a smoke run."""
    from ldm.interop.checkpoint import save_safetensors
    from ldm.models.autoencoder import AutoencoderKL

    ddconfig = dict(double_z=True, z_channels=4, resolution=resolution, in_channels=3, out_ch=3, ch=32)
    ddconfig.update(ch_mult=[1, 2, 2], num_res_blocks=1, attn_resolutions=[], dropout=0.0)
    config = {"_target_": "ldm.models.autoencoder.AutoencoderKL", "embed_dim": 4, "ddconfig": ddconfig}
    torch.manual_seed(0)
    return save_safetensors(AutoencoderKL(ddconfig, 4).state_dict(), path, {"model": {"autoencoder": config}})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SECTIONS: dict[str, Callable[[Check, float], dict]] = {
    "unet_train": section_unet_train,
    "lora_train": section_lora_train,
    "finetune_train": section_finetune_train,
    "sampling": section_sampling,
    "ddp_smoke": section_ddp_smoke,
    "fsdp_smoke": section_fsdp_smoke,
    "autoencoder": section_autoencoder,
}
