"""LoRA step vs full fine-tune step (ours), side by side with diffusers' train_text_to_image_lora.py recipe.

Three children (`bench/common.py`), each its own process, on the weights and batch `bench_finetune.prepare`
writes (SD v1 layout: UNet, kl-f8 VAE, CLIP text encoder; online VAE encoding, eps objective, SD's
scaled_linear schedule, AdamW lr 1e-4, grad-norm clip 1.0, constant LR):

- ours-full: `bench_finetune.serve_ours` as it is: the whole UNet trains, EMA 0.9999 (what
  `experiment=finetune` does; its default decay is 0.999), under a real Lightning `Trainer`.
- ours-lora: the same pieces as one plain `LatentDiffusion`, then what `experiment=lora` does to it:
  `ldm.training.lora.add_lora_to_model(model, text, rank=R, alpha=R, targets=["attn"])` (peft LoRA on every
  CrossAttention to_q/to_k/to_v/to_out.0; all other weights frozen), `LoraModule.from_model(...)` (param
  groups hold only the adapters), `ema_decay=0`, the same Lightning `Trainer` as ours-full.
- diffusers-lora: the loop body of `examples/text_to_image/train_text_to_image_lora.py` (accelerate
  emulated, one process): `unet/vae/text_encoder.requires_grad_(False)`, `unet.add_adapter(LoraConfig(r=R,
  lora_alpha=R, init_lora_weights="gaussian", target_modules=["to_k", "to_q", "to_v", "to_out.0"]))`, AdamW
  over the LoRA parameters only, the step of `bench_finetune.serve_diffusers` without its EMA: the recipe
  has no EMA, which is why ours-lora runs with `ema_decay=0`. One deliberate difference: the recipe's
  `params_to_clip = lora_layers` clips an exhausted `filter` (the optimizer consumed it), i.e. nothing; here
  the clip gets the LoRA parameters, as the recipe means and as Lightning's `gradient_clip_val` does.
  `--precision bf16` is the recipe's `--mixed_precision=bf16`: UNet (adapters included), VAE and text
  encoder cast to bf16, the UNet forward autocast; ours is Lightning's `bf16-mixed` (fp32 weights, autocast).

Parity, per run: before any update, both LoRA sides load the same non-zero adapter values (drawn here,
keyed by our CompVis layer paths, e.g. `input_blocks.1.1.transformer_blocks.0.attn1.to_q`, and renamed to
diffusers' `down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q` by `ldm.adapters.unet_names`; the
diffusers child checks that every renamed layer holds the identical base weight tensor) and compute the
UNet output on fixed inputs in float32; the parent asserts they agree within 1e-4 (and that the adapters
moved the output, so the check is not of the base model alone). The trainable parameter counts (and the
parameters the optimizers hold) of the two LoRA sides must be equal: they wrap the same layers.

Timing and memory as in bench_finetune: on CPU the children alternate step by step (ABC CBA ...), medians
after warmup; peak memory = CPU peak-RSS growth over the RSS after imports (CUDA: max allocated);
MALLOC_MMAP_THRESHOLD_=65536 for all children (see bench_finetune's docstring).

    python bench/bench_lora.py                                   # small UNet, 256 px, batch 2, CPU
    python bench/bench_lora.py --size tiny --resolution 64 --batch-size 1 --steps 2 --warmup 1
    python bench/bench_lora.py --device cuda --size sd --resolution 512 --batch-size 1 --precision bf16 \\
        --gradient-checkpointing --variants ours-lora,diffusers-lora   # SD 1.x LoRA on a GPU (goal < 8 GB)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_finetune as ft  # noqa: E402
from common import current_rss_bytes, peak_memory_bytes, reply, run_children, serve_steps  # noqa: E402

NAMES = ("ours-full", "ours-lora", "diffusers-lora")
CHECKED = ("ours-lora", "diffusers-lora")  # the two sides of the parity check and the count assertion
RECIPE_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]  # the recipe's target_modules = our lora.targets=[attn]
PRECISION = {"fp32": "float32", "bf16": "bf16"}  # -> bench_finetune's dtype names
LORA_FILE, NAMES_FILE = "lora.safetensors", "lora_names.json"
TOLERANCE = 1e-4
UP_STD = 0.05  # the drawn adapters' `up` entries: a visible change of the output (see check_parity)


# ---- parent: the shared adapter values ------------------------------------------------------------------


def prepare_lora(args: argparse.Namespace, workdir: Path) -> dict[str, str]:
    """Draw the adapter both LoRA sides load for the parity check; returns {our path: diffusers path}.

    Writes `lora.safetensors` ({path}.down (r, in), {path}.up (out, r), our UNet-relative CompVis paths of
    the layers `lora.targets=[attn]` selects) and `lora_names.json` (the diffusers module path of each, from
    `ldm.adapters.unet_names.diffusers_path`). down ~ N(0, 1/r), up ~ N(0, UP_STD^2): a weight change of
    ~UP_STD per entry, visible in the output, unlike the zero `up` both libraries start from."""
    import torch
    from safetensors.torch import save_file

    from ldm.adapters.lora import unet_targets
    from ldm.adapters.unet_names import diffusers_path, num_res_blocks

    unet = ft.build_our_unet(args.size)
    layers = dict(unet.named_modules())
    n = num_res_blocks(unet)
    gen = torch.Generator().manual_seed(5)
    tensors, names = {}, {}
    for path in unet_targets(unet, ["attn"]):
        out_features, in_features = layers[path].weight.shape
        tensors[f"{path}.down"] = torch.randn(args.rank, in_features, generator=gen) / args.rank**0.5
        tensors[f"{path}.up"] = torch.randn(out_features, args.rank, generator=gen) * UP_STD
        theirs = diffusers_path(path, n)
        if theirs is None:
            raise RuntimeError(f"ldm.adapters.unet_names has no diffusers name for {path}")
        names[path] = theirs
    save_file(tensors, str(workdir / LORA_FILE))
    (workdir / NAMES_FILE).write_text(json.dumps(names))
    return names


def load_adapter(unet, workdir: Path, rename: dict[str, str] | None = None) -> int:
    """Copy the drawn adapter into the peft LoRA layers of `unet` (names mapped by `rename`); returns the
    number of layers set. Every drawn layer must exist and be wrapped, else KeyError."""
    import torch
    from safetensors.torch import load_file

    tensors = load_file(str(workdir / LORA_FILE))
    layers = dict(unet.named_modules())
    paths = sorted({k.rsplit(".", 1)[0] for k in tensors})
    with torch.no_grad():
        for path in paths:
            layer = layers[rename[path] if rename else path]
            layer.lora_A["default"].weight.copy_(tensors[f"{path}.down"])
            layer.lora_B["default"].weight.copy_(tensors[f"{path}.up"])
    return len(paths)


def exact_check(device, compute):
    """`compute()` with TF32 off (cuDNN convolutions and matmuls), so the parity outputs are float32 maths."""
    import torch

    if device.type != "cuda":
        return compute()
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        return compute()
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


# ---- children -------------------------------------------------------------------------------------------


def serve(args: argparse.Namespace) -> None:
    """Child process: build one side, write its parity outputs (LoRA sides), then time steps on request."""
    # Every child pays the same imports before the memory baseline.
    import diffusers.models.autoencoders.autoencoder_kl  # noqa: F401
    import diffusers.models.unets.unet_2d_condition  # noqa: F401
    import peft  # noqa: F401
    import pytorch_lightning  # noqa: F401
    import torch
    import transformers  # noqa: F401
    from diffusers.training_utils import EMAModel  # noqa: F401
    from safetensors.torch import load_file

    import ldm.training.diffusion_module  # noqa: F401
    import ldm.training.lora  # noqa: F401

    if args.threads:
        torch.set_num_threads(args.threads)
    workdir, device = Path(args.workdir), torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
    rss_before = current_rss_bytes()
    inputs = load_file(str(workdir / "inputs.safetensors"))
    prompts = json.loads((workdir / "prompts.json").read_text())
    dtype = PRECISION[args.precision]

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    if args.only == "ours-full":  # serve_ours reports the UNet's size: all of it trains, nothing else does
        info = ft.serve_ours(args, workdir, device, inputs, prompts, "online", args.gradient_checkpointing,
                             dtype, sync, None)  # fmt: skip
        info = dict(trainable=info["params"], optimizer_params=None, ema_updates=info["ema_updates"])
    elif args.only == "ours-lora":
        info = serve_ours_lora(args, workdir, device, inputs, prompts, dtype, sync)
    else:
        info = serve_diffusers_lora(args, workdir, device, inputs, dtype, sync)
    peak_mem = peak_memory_bytes(device, rss_before)
    process_s = time.process_time()  # the child's whole CPU time: imports, build, parity, every step
    reply(json.dumps(dict(peak_mem=peak_mem, threads=torch.get_num_threads(), process_s=process_s, **info)))


def serve_ours_lora(args, workdir, device, inputs, prompts, dtype, sync) -> dict[str, Any]:
    """ours-lora: bench_finetune's pieces as a plain LatentDiffusion + experiment=lora's adapter set-up."""
    import torch
    from safetensors.torch import load_file, save_file

    from ldm.conditioning.conditioner import Conditioner
    from ldm.conditioning.text import FrozenTextEncoder
    from ldm.diffusion.loss import DiffusionLoss
    from ldm.diffusion.schedules import NoiseSchedule
    from ldm.models.autoencoder import AutoencoderKL
    from ldm.models.first_stage import LatentCodec
    from ldm.models.latent_diffusion import LatentDiffusion
    from ldm.training.lora import LoraModule, add_lora_to_model

    unet_state, vae_state = (load_file(str(workdir / f"{n}.safetensors")) for n in ("unet", "vae"))
    unet = ft.build_our_unet(args.size, use_checkpoint=args.gradient_checkpointing)
    unet.load_state_dict(unet_state, strict=True)
    autoencoder = AutoencoderKL(ft.ddconfig(args.size, args.resolution), 4)
    autoencoder.load_state_dict(vae_state, strict=True)
    del unet_state, vae_state
    text = FrozenTextEncoder(
        model=str(workdir / "clip"), max_length=ft.MAX_LEN, layer="last", cached_key=None
    )
    schedule = NoiseSchedule("scaled_linear", 1000, 0.00085, 0.012, zero_terminal_snr=False)
    model = LatentDiffusion(
        unet, Conditioner({"txt": text}), LatentCodec(autoencoder, scale_factor=ft.SCALE),
        DiffusionLoss(schedule, parameterization="eps", loss_type="l2", min_snr_gamma=None),
        sample_posterior=True,
    )  # fmt: skip
    summary = add_lora_to_model(model, ["txt"], rank=args.rank, alpha=args.rank, targets=["attn"])
    optim = dict(lr=ft.LR, betas=ft.BETAS, weight_decay=ft.WEIGHT_DECAY, warmup_steps=0, schedule="constant")
    module = LoraModule.from_model(model, optim=optim, ema_decay=0.0, sampler=None)
    module.lora = summary
    module.to(device)

    x, t, ctx = (inputs[k].to(device) for k in ("check_x", "check_t", "check_context"))
    with torch.no_grad():  # parity outputs, float32, before any update
        module.train()
        base = exact_check(device, lambda: module.unet(x, t, context=ctx))  # up = 0: the base model
        layers = load_adapter(module.unet, workdir)
        adapted = exact_check(device, lambda: module.unet(x, t, context=ctx))
    save_file(
        {"unet": adapted.float().cpu(), "unet_base": base.float().cpu()}, str(workdir / "ours-lora.check")
    )

    batch = {"image": inputs["image"], "caption": prompts}

    trainer = ft.fit_driven(module, batch, ft.StepDriver(sync), device, dtype)  # serve_ours' Trainer
    held = sum(p.numel() for g in trainer.optimizers[0].param_groups for p in g["params"])
    return dict(
        trainable=sum(p.numel() for p in module.parameters() if p.requires_grad),
        optimizer_params=held,
        summary_trainable=summary["trainable_parameters"],
        layers=summary["unet_layers"],
        adapter_set=layers,
        ema=module.ema is not None,
    )


def serve_diffusers_lora(args, workdir, device, inputs, dtype, sync) -> dict[str, Any]:
    """diffusers-lora: train_text_to_image_lora.py's set-up and loop body (see the module docstring)."""
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
    from diffusers.optimization import get_scheduler
    from peft import LoraConfig
    from safetensors.torch import load_file, save_file
    from transformers import CLIPTextModel

    ours_unet, vae_state = (load_file(str(workdir / f"{n}.safetensors")) for n in ("unet", "vae"))
    unet = ft.build_diffusers_unet(args.size, args.resolution // 8)
    state = {f"model.diffusion_model.{k}": v for k, v in ours_unet.items()}
    unet.load_state_dict(convert_ldm_unet_checkpoint(state, dict(unet.config)), strict=True)
    vae = ft.build_diffusers_vae(args.size, args.resolution)
    state = {f"first_stage_model.{k}": v for k, v in vae_state.items()}
    vae.load_state_dict(convert_ldm_vae_checkpoint(state, dict(vae.config)), strict=True)
    del state, vae_state
    text_encoder = CLIPTextModel.from_pretrained(str(workdir / "clip"))
    noise_scheduler = DDPMScheduler(  # SD v1's scheduler_config.json
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="epsilon", clip_sample=False,
    )  # fmt: skip

    # ---- the recipe's set-up (it casts to weight_dtype before add_adapter; here after the fp32 parity
    # check, which leaves the same dtypes: the cast of a bf16 base gives bf16 adapters either way)
    unet.requires_grad_(False)
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    config = LoraConfig(
        r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian", target_modules=RECIPE_TARGETS
    )
    unet.add_adapter(config)
    unet.train()
    unet.to(device)

    names = json.loads((workdir / NAMES_FILE).read_text())
    layers = dict(unet.named_modules())
    for ours, theirs in names.items():  # the name table agrees with the weights: identical base tensors
        if not torch.equal(layers[theirs].base_layer.weight.cpu(), ours_unet[f"{ours}.weight"]):
            raise AssertionError(f"{ours} -> {theirs}: the base weights differ")
    wrapped = sum(1 for m in layers.values() if hasattr(m, "lora_A") and "default" in m.lora_A)
    if wrapped != len(names):  # the recipe wraps exactly the layers ours does
        raise AssertionError(f"diffusers wraps {wrapped} layers, ours {len(names)}")
    del ours_unet
    x, t, ctx = (inputs[k].to(device) for k in ("check_x", "check_t", "check_context"))
    with torch.no_grad():  # parity outputs, float32, before any update
        base = exact_check(device, lambda: unet(x, t, encoder_hidden_states=ctx).sample)  # B = 0
        load_adapter(unet, workdir, rename=names)
        adapted = exact_check(device, lambda: unet(x, t, encoder_hidden_states=ctx).sample)
    save_file(
        {"unet": adapted.float().cpu(), "unet_base": base.float().cpu()},
        str(workdir / "diffusers-lora.check"),
    )

    weight_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    unet.to(device, dtype=weight_dtype)
    vae.to(device, dtype=weight_dtype)
    text_encoder.to(device, dtype=weight_dtype)
    lora_layers = [p for p in unet.parameters() if p.requires_grad]  # the recipe: a filter over the same
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(
        lora_layers, lr=ft.LR, betas=ft.BETAS, weight_decay=ft.WEIGHT_DECAY, eps=ft.EPS
    )
    lr_scheduler = get_scheduler("constant", optimizer=optimizer)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")
    pixel_values, input_ids = inputs["image"].to(device), inputs["input_ids"].to(device)
    batch_size = input_ids.shape[0]

    def step() -> None:
        latents = vae.encode(pixel_values.to(weight_dtype)).latent_dist.sample()
        latents = latents * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        bsz = latents.shape[0]
        timesteps = torch.randint(
            0, noise_scheduler.config.num_train_timesteps, (bsz,), device=latents.device
        )
        timesteps = timesteps.long()
        noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
        encoder_hidden_states = text_encoder(input_ids, return_dict=False)[0]
        target = noise  # prediction_type == "epsilon"
        with autocast:
            model_pred = unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
        model_pred = model_pred.float()  # accelerate's convert_outputs_to_fp32
        loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
        avg_loss = loss.repeat(batch_size).mean()  # accelerator.gather on one process
        avg_loss.item()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lora_layers, ft.MAX_GRAD_NORM)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad()

    serve_steps(step, sync)
    held = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
    trainable = sum(p.numel() for m in (unet, vae, text_encoder) for p in m.parameters() if p.requires_grad)
    return dict(trainable=trainable, optimizer_params=held, layers=wrapped, ema=False)


# ---- parent ---------------------------------------------------------------------------------------------


def check_parity(workdir: Path) -> dict[str, float]:
    """The two LoRA sides' adapted (and base) UNet outputs agree within 1e-4; returns the max differences
    and the RMS of the adapters' effect (adapted - base), which must not be ~0 for the check to mean much."""
    import torch
    from safetensors.torch import load_file

    ours, theirs = (load_file(str(workdir / f"{name}.check")) for name in CHECKED)
    diffs = {}
    for key in ("unet", "unet_base"):
        torch.testing.assert_close(
            ours[key], theirs[key], rtol=TOLERANCE, atol=TOLERANCE, msg=lambda m, k=key: f"{k}: {m}"
        )
        diffs[key] = (ours[key] - theirs[key]).abs().max().item()
    diffs["lora_effect_rms"] = (ours["unet"] - ours["unet_base"]).square().mean().sqrt().item()
    diffs["unet_rms"] = ours["unet"].square().mean().sqrt().item()
    if diffs["lora_effect_rms"] < 0.05 * diffs["unet_rms"]:  # the check would then be of the base alone
        raise AssertionError(f"the adapters barely change the output (RMS {diffs['lora_effect_rms']:.1e})")
    return diffs


def child_argv(args: argparse.Namespace, workdir: Path) -> list[str]:
    """The children's command line: this run's options (not the parent's sys.argv, which may be pytest's)."""
    argv = [
        "--device", args.device, "--size", args.size, "--resolution", str(args.resolution),
        "--batch-size", str(args.batch_size), "--rank", str(args.rank), "--precision", args.precision,
        "--warmup", str(args.warmup), "--steps", str(args.steps), "--workdir", str(workdir),
    ]  # fmt: skip
    if args.threads:
        argv += ["--threads", str(args.threads)]
    if args.gradient_checkpointing:
        argv.append("--gradient-checkpointing")
    return argv


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Prepare, run the children, check parity and counts; returns {"results": {name: ...}, "diffs": ...}.

    Each result: trainable (parameters that require grad), optimizer_params (held by the optimizer; None
    for ours-full, whose optimizer bench_finetune.serve_ours keeps to itself),
    step_s / min_step_s / cpu_s (median, min wall and median CPU seconds per step), peak_mem (bytes), ...
    Raises AssertionError when the LoRA sides disagree (outputs or counts)."""
    names = [n for n in NAMES if n in args.variants]
    saved = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    if args.mmap_threshold:  # children inherit it (glibc reads it at start-up)
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
    try:
        with tempfile.TemporaryDirectory(prefix="bench_lora_") as tmp:
            workdir = Path(tmp)
            ft.prepare(args, workdir)
            table = prepare_lora(args, workdir)
            results = run_children(
                __file__, names, child_argv(args, workdir), args.warmup, args.steps, args.batch_size,
                interleave=not args.device.startswith("cuda"),
            )  # fmt: skip
            both = all(n in names for n in CHECKED)
            diffs = check_parity(workdir) if both else {}
    finally:
        if saved is None:
            os.environ.pop("MALLOC_MMAP_THRESHOLD_", None)
        else:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = saved
    for name in [n for n in names if results[n]["optimizer_params"] is not None]:
        r = results[name]
        assert r["trainable"] == r["optimizer_params"], (name, r["trainable"], r["optimizer_params"])
    if "ours-lora" in names:
        r = results["ours-lora"]
        assert r["trainable"] == r["summary_trainable"] and r["layers"] == r["adapter_set"] == len(table), r
    if both:
        o, p = results["ours-lora"], results["diffusers-lora"]
        assert o["trainable"] == p["trainable"], ("LoRA parameter counts differ", o, p)
        assert o["layers"] == p["layers"], ("LoRA layer counts differ", o["layers"], p["layers"])
    if "ours-full" in names:
        assert results["ours-full"]["ema_updates"] == args.warmup + args.steps
    return dict(results=results, diffs=diffs, layers=len(table))


def report(args: argparse.Namespace, run_: dict[str, Any]) -> None:
    import diffusers
    import peft
    import torch

    results, diffs = run_["results"], run_["diffs"]
    cuda = args.device.startswith("cuda")
    s = ft.SIZES[args.size]
    threads = next(iter(results.values()))["threads"]
    print(
        f"\nLoRA vs full fine-tune step: size={args.size} (SD v1 UNet layout at width {s['model_channels']}, "
        f"kl-f8 VAE ch={s['vae_ch']}, CLIP 768 wide / {s['text_layers']} layers), LoRA rank {args.rank} "
        f"(alpha {args.rank}) on {run_['layers']} attention projections, batch {args.batch_size}, "
        f"{args.resolution}px, {args.precision}, gradient checkpointing {args.gradient_checkpointing}, "
        f"device={args.device}, torch {torch.__version__}, diffusers {diffusers.__version__}, peft "
        f"{peft.__version__}, threads={threads}, median of {args.steps} steps after {args.warmup} warmup"
        f"{', interleaved' if not cuda else ''}; EMA: ours-full 0.9999, LoRA sides none (the recipe has none)"
    )
    mem = "CUDA max alloc MiB" if cuda else "peak RSS growth MiB"
    head = f"{'variant':<15} {'trainable':>12} {'in optimizer':>13} {'ms/step':>9} {'min ms':>8} {'CPU s':>7}"
    print(f"{head} {mem:>20}")
    for name, r in results.items():
        held = "-" if r["optimizer_params"] is None else f"{r['optimizer_params']:,}"
        print(
            f"{name:<15} {r['trainable']:>12,} {held:>13} {r['step_s'] * 1e3:>9.1f} "
            f"{r['min_step_s'] * 1e3:>8.1f} {r['cpu_s']:>7.2f} {r['peak_mem'] / 2**20:>20.1f}"
        )
    pairs = [("ours-lora", "diffusers-lora"), ("ours-lora", "ours-full"), ("diffusers-lora", "ours-full")]
    for a, b in pairs:
        if a in results and b in results:
            ra, rb = results[a], results[b]
            time_, mem_ = ra["step_s"] / rb["step_s"], ra["peak_mem"] / rb["peak_mem"]
            print(f"{a} / {b}: time {time_:.3f} (speed {1 / time_:.3f}x), peak memory {mem_:.3f}")
    if diffs:
        print(
            f"parity: LoRA UNet outputs agree within {TOLERANCE:g}: max |ours - diffusers| adapted "
            f"{diffs['unet']:.1e}, base {diffs['unet_base']:.1e} (output RMS {diffs['unet_rms']:.3f}, "
            f"adapter effect RMS {diffs['lora_effect_rms']:.3f}); trainable parameters equal: "
            f"{results['ours-lora']['trainable']:,}"
        )
    print(
        "\nOn a GPU (SD 1.x at 512 px; the goal: a LoRA step under 8 GB):\n"
        "  python bench/bench_lora.py --device cuda --size sd --resolution 512 --batch-size 1 "
        "--precision bf16 --gradient-checkpointing --variants ours-lora,diffusers-lora --steps 20"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--size", default="small", choices=list(ft.SIZES))
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--resolution", type=int, default=256, help="image side in pixels; latent = /8")
    parser.add_argument(
        "--rank", type=int, default=4, help="LoRA rank r (alpha = r, scale 1); the recipe's --rank"
    )
    parser.add_argument("--steps", type=int, default=20, help="timed steps (the median is reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--precision", default="fp32", choices=list(PRECISION))
    parser.add_argument("--gradient-checkpointing", action="store_true", help="on every side")
    parser.add_argument(
        "--variants", default=",".join(NAMES), help=f"comma-separated, of: {', '.join(NAMES)}"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads per child (default: all)")
    parser.add_argument(
        "--mmap-threshold", type=int, default=65536, help="glibc MALLOC_MMAP_THRESHOLD_ (0: off)"
    )
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--only", choices=NAMES, help=argparse.SUPPRESS)  # child process: which side
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.resolution % 8:
        parser.error(f"--resolution {args.resolution} must be a multiple of 8")
    if args.rank < 1:
        parser.error(f"--rank {args.rank} must be >= 1")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in NAMES]
    if unknown or not variants:
        parser.error(f"--variants {args.variants}: choose from {list(NAMES)}")
    args.variants = variants
    return args


def main() -> None:
    args = parse_args()
    if args.only:
        serve(args)
        return
    result = run(args)
    report(args, result)
    if args.json:
        Path(args.json).write_text(json.dumps({**result, "args": vars(args)}, indent=1, default=str))


if __name__ == "__main__":
    main()
