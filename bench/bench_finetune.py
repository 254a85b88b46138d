"""Fine-tune step: our LatentDiffusionModule under Lightning vs diffusers' train_text_to_image.py recipe.

Both sides do one SD-v1-style text-to-image fine-tune step on the same weights and the same batch:

- ours: `LatentDiffusionModule` (UNetModel + FrozenTextEncoder conditioner + frozen KL `LatentCodec`, eps
  objective on SD's scaled_linear schedule, no min-SNR, no zero-terminal SNR) run by a real
  `pytorch_lightning.Trainer`: fetch the batch, VAE posterior sample (or cached posterior moments),
  tokenize + CLIP text forward, UNet forward/backward, grad-norm clip 1.0, AdamW, LR scheduler, EMA update
  (LDM warm-up), logging. One step is timed from the end of the previous `on_train_batch_end` to the end
  of this one, so everything Lightning does between batches counts.
- diffusers: the loop body of `examples/text_to_image/train_text_to_image.py` (accelerate emulated, one
  process): `vae.encode(pixel_values).latent_dist.sample() * scaling_factor`, `DDPMScheduler.add_noise`,
  `text_encoder(input_ids)[0]`, `unet(noisy, t, encoder_hidden_states).sample`, `F.mse_loss`, the logged
  `loss.item()`, backward, `clip_grad_norm_(unet.parameters(), 1.0)`, `optimizer.step()`,
  `lr_scheduler.step()`, `optimizer.zero_grad()`, `EMAModel.step(unet.parameters())` (recipe defaults:
  decay 0.9999, `foreach=False` unless `--foreach-ema`). Captions are tokenized in its data pipeline, as
  the recipe does, so its step gets token ids; ours tokenizes inside the step (its conditioner reads text).
  bf16 as `--mixed_precision=bf16` does it: VAE and text encoder cast to bf16, the UNet forward autocast.

Same weights: the UNet and VAE are built by ldm, saved, and converted to diffusers' layout by diffusers' own
`convert_ldm_unet_checkpoint` / `convert_ldm_vae_checkpoint`; the text encoder is one `CLIPTextModel` folder
both load. Before timing, each child computes on fixed inputs (float32, before any update) the UNet output,
the scaled VAE posterior mean, the text context and the schedule's alphas_cumprod; the parent asserts that
the two sides agree, then times the steps interleaved (ABBA..., `bench/common.py`). Peak memory: CPU peak-RSS
growth over the RSS after imports (or CUDA max allocated), as in the other benchmarks. Both children run
with glibc's MALLOC_MMAP_THRESHOLD_=65536 (`--mmap-threshold`): tensors of 64 KiB and more then come from
mmap and go back to the OS when freed, so the peak RSS follows the live tensors; with glibc's dynamic
default the heap kept growing by ~60-90 MiB a step for the first steps on either side (fragmentation), and
the peak of a 6-step run said more about the allocator than about the step.

    python bench/bench_finetune.py                       # the default matrix, CPU, ~6-10 min on 2 cores
    python bench/bench_finetune.py --variants online-ckpt --steps 10 --profile
    python bench/bench_finetune.py --device cuda --size sd --resolution 512 --batch-size 4 \\
        --variants online-bf16
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Child, current_rss_bytes, peak_memory_bytes, reply  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is built locally; nothing is downloaded
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The SD v1 UNet layout (channel_mult, attention at 4/2/1, 8 heads, 2 res blocks) at CPU-feasible widths.
SIZES = {
    "tiny": dict(model_channels=32, text_layers=1, vae_ch=32),
    "small": dict(model_channels=64, text_layers=2, vae_ch=32),
    "sd": dict(model_channels=320, text_layers=12, vae_ch=128),  # SD v1 itself (859.5M UNet, CLIP ViT-L/14)
}
UNET = dict(
    in_channels=4, out_channels=4, num_res_blocks=2, attention_resolutions=(4, 2, 1),
    channel_mult=(1, 2, 4, 4), num_heads=8, context_dim=768, transformer_depth=1, legacy=False,
)  # fmt: skip
VAE_MULT = (1, 2, 4, 4)  # f = 8, SD's kl-f8 layout (2 res blocks per level, mid-block attention)
CLIP = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, max_position_embeddings=77)
SCALE = 0.18215  # SD v1's latent scale (vae.config.scaling_factor)
MAX_LEN = 77
LR, BETAS, WEIGHT_DECAY, EPS, MAX_GRAD_NORM, EMA_DECAY = 1e-4, (0.9, 0.999), 1e-2, 1e-8, 1.0, 0.9999
PROMPTS = ["a red circle", "a blue square on a red circle", "the circle", "red red red", "a square"]
NAMES = ("ours", "diffusers")
# name -> (latents, gradient checkpointing, dtype)
VARIANTS = {
    "online": ("online", False, "float32"),
    "cached": ("cached", False, "float32"),
    "online-ckpt": ("online", True, "float32"),
    "cached-ckpt": ("cached", True, "float32"),
    "online-bf16": ("online", False, "bf16"),
    "cached-bf16": ("cached", False, "bf16"),
}
DEFAULT_VARIANTS = "online,cached,online-ckpt,online-bf16"


# ---- the models -----------------------------------------------------------------------------------------


def ddconfig(size: str, resolution: int) -> dict:
    return dict(
        double_z=True, z_channels=4, resolution=resolution, in_channels=3, out_ch=3, ch=SIZES[size]["vae_ch"],
        ch_mult=list(VAE_MULT), num_res_blocks=2, attn_resolutions=[], dropout=0.0,
    )  # fmt: skip


def build_our_unet(size: str, use_checkpoint: bool = False):
    from ldm.modules.unet import UNetModel

    return UNetModel(**UNET, model_channels=SIZES[size]["model_channels"], use_checkpoint=use_checkpoint)


def build_diffusers_unet(size: str, latent: int):
    from diffusers import UNet2DConditionModel

    mult, width = UNET["channel_mult"], SIZES[size]["model_channels"]
    attn = [2**level in UNET["attention_resolutions"] for level in range(len(mult))]
    return UNet2DConditionModel(
        sample_size=latent,
        in_channels=UNET["in_channels"],
        out_channels=UNET["out_channels"],
        block_out_channels=[width * m for m in mult],
        layers_per_block=UNET["num_res_blocks"],
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        attention_head_dim=UNET["num_heads"],  # diffusers' historical name for the number of heads
        cross_attention_dim=UNET["context_dim"],
        norm_num_groups=32,
        flip_sin_to_cos=True,
        freq_shift=0,
    )


def build_diffusers_vae(size: str, resolution: int):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * len(VAE_MULT),
        up_block_types=["UpDecoderBlock2D"] * len(VAE_MULT),
        block_out_channels=[SIZES[size]["vae_ch"] * m for m in VAE_MULT],
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=resolution,
        scaling_factor=SCALE,
        mid_block_add_attention=True,
    )


def byte_alphabet() -> list[str]:
    """GPT-2/CLIP byte -> printable-unicode table: every byte has a base token, so any text tokenizes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    extra = [b for b in range(256) if b not in printable]
    return [chr(c) for c in printable] + [chr(256 + i) for i in range(len(extra))]


def write_text_encoder(size: str, folder: Path):
    """A random CLIPTextModel (ViT-L/14's width, fewer layers on CPU) + a byte-level CLIP tokenizer folder."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    folder.mkdir(parents=True, exist_ok=True)
    chars = byte_alphabet()
    vocab = {t: i for i, t in enumerate(chars + [c + "</w>" for c in chars])}
    merges = ["r e", "re d</w>", "c i", "ci r", "cir c", "l e</w>", "circ le</w>"]
    for m in merges:
        vocab["".join(m.split())] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"))
    tokenizer.save_pretrained(folder)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), num_hidden_layers=SIZES[size]["text_layers"], hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **CLIP,
    )  # fmt: skip
    torch.manual_seed(2)
    CLIPTextModel(config).save_pretrained(folder)
    return tokenizer


def randomised(module, seed: int) -> dict:
    """The module's default init with every all-zero tensor (zero-initialised output layers, biases) drawn
    small and random, so the parity check compares non-trivial outputs."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    state = {}
    for k, v in module.state_dict().items():
        v = v.detach().clone().contiguous()
        if v.is_floating_point() and not v.any():
            v = torch.randn(v.shape, generator=gen) * 0.02
        state[k] = v
    return state


def prepare(args: argparse.Namespace, workdir: Path) -> None:
    """Write the shared weights (ldm names), text encoder folder and inputs that both children load."""
    import torch
    from safetensors.torch import save_file

    from ldm.models.autoencoder import AutoencoderKL

    torch.manual_seed(0)
    save_file(randomised(build_our_unet(args.size), 1), str(workdir / "unet.safetensors"))
    vae = AutoencoderKL(ddconfig(args.size, args.resolution), 4)
    vae_state = randomised(vae, 3)
    vae.load_state_dict(vae_state)
    save_file(vae_state, str(workdir / "vae.safetensors"))
    tokenizer = write_text_encoder(args.size, workdir / "clip")

    gen = torch.Generator().manual_seed(1)
    b, res, latent = args.batch_size, args.resolution, args.resolution // 8
    images = torch.rand(b, 3, res, res, generator=gen) * 2 - 1
    with torch.no_grad():
        posterior = vae.eval().encode(images)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(b)]
    ids = tokenizer(prompts, padding="max_length", max_length=MAX_LEN, truncation=True, return_tensors="pt")
    inputs = {
        "image": images,
        # a latent cache's posterior moments, stored in float16 as `python -m ldm.data.cache_latents` does
        "latent_mean": posterior.mean.half().contiguous(),
        "latent_logvar": posterior.logvar.half().contiguous(),
        "input_ids": ids.input_ids,
        "check_x": torch.randn(b, 4, latent, latent, generator=gen),
        "check_t": torch.tensor([(999 * i) // max(1, b - 1) for i in range(b)]),
        "check_context": torch.randn(b, MAX_LEN, UNET["context_dim"], generator=gen),
    }
    save_file(inputs, str(workdir / "inputs.safetensors"))
    (workdir / "prompts.json").write_text(json.dumps(prompts))


# ---- children -------------------------------------------------------------------------------------------


class StepDriver:
    """Answers the parent's `step` lines from inside a running Lightning loop (see bench/common.py)."""

    def __init__(self, sync, profiler=None, profile_after: int = 0) -> None:
        self.sync, self.start, self.cpu_start = sync, 0.0, 0.0
        self.profiler, self.profile_after, self.steps = profiler, profile_after, 0

    def wait(self, trainer) -> None:
        """Block until the next command: `step` starts the clock; anything else stops training."""
        command = sys.stdin.readline().strip()
        if command != "step":
            trainer.should_stop = True
            return
        if self.profiler is not None and self.steps == self.profile_after:
            self.profiler.start()
        self.sync()
        self.start, self.cpu_start = time.perf_counter(), time.process_time()

    def end(self, trainer) -> None:
        self.sync()
        reply(f"{time.perf_counter() - self.start} {time.process_time() - self.cpu_start}")
        self.steps += 1
        self.wait(trainer)


def serve(args: argparse.Namespace) -> None:
    """Child process: build one side, write its parity outputs, then time steps on request."""
    # Both children pay the same imports before the memory baseline.
    import diffusers.models.autoencoders.autoencoder_kl  # noqa: F401
    import diffusers.models.unets.unet_2d_condition  # noqa: F401
    import pytorch_lightning  # noqa: F401
    import torch
    import transformers  # noqa: F401
    from diffusers.training_utils import EMAModel  # noqa: F401
    from safetensors.torch import load_file

    import ldm.training.diffusion_module  # noqa: F401

    if args.threads:
        torch.set_num_threads(args.threads)
    workdir = Path(args.workdir)
    latents, ckpt, dtype = VARIANTS[args.variant]
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
    rss_before = current_rss_bytes()
    inputs = load_file(str(workdir / "inputs.safetensors"))
    prompts = json.loads((workdir / "prompts.json").read_text())

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    profiler = None
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        profiler = profile(activities=acts)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    build = serve_ours if args.only == "ours" else serve_diffusers
    info = build(args, workdir, device, inputs, prompts, latents, ckpt, dtype, sync, profiler)
    peak_mem = peak_memory_bytes(device, rss_before)
    if profiler is not None:
        profiler.stop()
        sort_by = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        table = profiler.key_averages().table(sort_by=sort_by, row_limit=25, max_name_column_width=50)
        (workdir / f"{args.only}.profile").write_text(table)
    reply(json.dumps(dict(peak_mem=peak_mem, threads=torch.get_num_threads(), **info)))


def serve_ours(args, workdir, device, inputs, prompts, latents, ckpt, dtype, sync, profiler) -> dict:
    import torch
    from safetensors.torch import load_file, save_file

    from ldm.conditioning.conditioner import Conditioner
    from ldm.conditioning.text import FrozenTextEncoder
    from ldm.diffusion.loss import DiffusionLoss
    from ldm.diffusion.schedules import NoiseSchedule
    from ldm.models.autoencoder import AutoencoderKL
    from ldm.models.first_stage import LatentCodec
    from ldm.training.diffusion_module import LatentDiffusionModule

    unet_state, vae_state = (load_file(str(workdir / f"{n}.safetensors")) for n in ("unet", "vae"))
    unet = build_our_unet(args.size, use_checkpoint=ckpt)
    unet.load_state_dict(unet_state, strict=True)
    autoencoder = AutoencoderKL(ddconfig(args.size, args.resolution), 4)
    autoencoder.load_state_dict(vae_state, strict=True)
    del unet_state, vae_state
    text = FrozenTextEncoder(model=str(workdir / "clip"), max_length=MAX_LEN, layer="last", cached_key=None)
    schedule = NoiseSchedule("scaled_linear", 1000, 0.00085, 0.012, zero_terminal_snr=False)
    module = LatentDiffusionModule(
        unet=unet,
        conditioner=Conditioner({"txt": text}),
        first_stage=LatentCodec(autoencoder, scale_factor=SCALE),
        loss=DiffusionLoss(schedule, parameterization="eps", loss_type="l2", min_snr_gamma=None),
        optim=dict(lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY, warmup_steps=0, schedule="constant"),
        ema_decay=EMA_DECAY,
        ema_warmup=True,  # LDM's min(decay, (1+n)/(10+n)): the same decay as diffusers' EMAModel default
        sampler=None,
        sample_posterior=True,
    ).to(device)

    with torch.no_grad():  # parity outputs, float32, before any update
        module.train()
        check_x, check_ctx = inputs["check_x"].to(device), inputs["check_context"].to(device)
        check = {
            "unet": module.unet(check_x, inputs["check_t"].to(device), context=check_ctx),
            "latent": module.first_stage.encode_pixels(inputs["image"].to(device), sample=False),
            "context": module.conditioner({"caption": prompts}, train=False)["context"],
            "alphas_cumprod": module.loss.schedule.alphas_cumprod,
        }
    save_file({k: v.float().cpu().contiguous() for k, v in check.items()}, str(workdir / "ours.check"))

    if latents == "online":
        batch = {"image": inputs["image"], "caption": prompts}
    else:
        batch = {k: inputs[k] for k in ("latent_mean", "latent_logvar")} | {"caption": prompts}

    fit_driven(module, batch, StepDriver(sync, profiler, args.warmup), device, dtype)
    params = sum(p.numel() for p in module.unet.parameters())
    return dict(params=params, ema_updates=int(module.ema.num_updates))


def fit_driven(module, batch: dict, driver, device, dtype: str):
    """Train `module` under a Lightning Trainer on `batch` every step, paced by `driver` (a StepDriver);
    returns the Trainer. Shared by this benchmark's and bench_lora's "ours" sides."""
    import pytorch_lightning as pl
    import torch

    class Forever(torch.utils.data.IterableDataset):  # the same batch every step, as the peer gets it
        def __iter__(self):
            while True:
                yield batch

    class Drive(pl.Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            reply("ready")
            driver.wait(trainer)

        def on_train_batch_end(self, trainer, *_) -> None:
            driver.end(trainer)

    trainer = pl.Trainer(
        accelerator=device.type, devices=1, precision="bf16-mixed" if dtype == "bf16" else "32-true",
        max_steps=10**6, max_epochs=-1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        gradient_clip_val=MAX_GRAD_NORM, log_every_n_steps=10, callbacks=[Drive()],
    )  # fmt: skip
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(Forever(), batch_size=None))
    return trainer


def serve_diffusers(args, workdir, device, inputs, prompts, latents, ckpt, dtype, sync, profiler) -> dict:
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel
    from safetensors.torch import load_file, save_file
    from transformers import CLIPTextModel

    unet_state, vae_state = (load_file(str(workdir / f"{n}.safetensors")) for n in ("unet", "vae"))
    latent = args.resolution // 8
    unet = build_diffusers_unet(args.size, latent)
    state = {f"model.diffusion_model.{k}": v for k, v in unet_state.items()}
    unet.load_state_dict(convert_ldm_unet_checkpoint(state, dict(unet.config)), strict=True)
    vae = build_diffusers_vae(args.size, args.resolution)
    state = {f"first_stage_model.{k}": v for k, v in vae_state.items()}
    vae.load_state_dict(convert_ldm_vae_checkpoint(state, dict(vae.config)), strict=True)
    del state, unet_state, vae_state
    text_encoder = CLIPTextModel.from_pretrained(str(workdir / "clip"))
    # SD v1's scheduler_config.json
    noise_scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="epsilon", clip_sample=False,
    )  # fmt: skip

    # ---- the recipe's set-up
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    unet.train()
    ema_unet = EMAModel(
        unet.parameters(),
        decay=EMA_DECAY,
        foreach=args.foreach_ema,
        model_cls=type(unet),
        model_config=unet.config,
    )  # fmt: skip  (the recipe loads a second copy of the same weights: the same shadow tensors)
    if ckpt:
        unet.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY, eps=EPS)
    lr_scheduler = get_scheduler("constant", optimizer=optimizer)
    unet.to(device)
    ema_unet.to(device)
    weight_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32

    with torch.no_grad():  # parity outputs, float32, before any update
        check_x, check_ctx = inputs["check_x"].to(device), inputs["check_context"].to(device)
        check = {
            "unet": unet(check_x, inputs["check_t"].to(device), encoder_hidden_states=check_ctx).sample,
            "latent": vae.encode(inputs["image"].to(device)).latent_dist.mode() * vae.config.scaling_factor,
            "context": text_encoder(inputs["input_ids"].to(device))[0],
            "alphas_cumprod": noise_scheduler.alphas_cumprod,
        }
    save_file({k: v.float().cpu().contiguous() for k, v in check.items()}, str(workdir / "diffusers.check"))

    # mixed_precision=bf16: frozen models cast to bf16, the prepared UNet's forward autocast (accelerate)
    text_encoder.to(device, dtype=weight_dtype)
    vae.to(device, dtype=weight_dtype)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")
    batch = {
        "pixel_values": inputs["image"].to(device),
        "input_ids": inputs["input_ids"].to(device),
        "moments": torch.cat([inputs["latent_mean"], inputs["latent_logvar"]], 1).to(device),
    }
    batch_size = batch["input_ids"].shape[0]

    def step() -> None:
        if latents == "online":
            latents_ = vae.encode(batch["pixel_values"].to(weight_dtype)).latent_dist.sample()
        else:  # the recipe has no latent cache: the same posterior draw from cached moments
            latents_ = DiagonalGaussianDistribution(batch["moments"].float()).sample()
        latents_ = latents_ * vae.config.scaling_factor
        noise = torch.randn_like(latents_)
        bsz = latents_.shape[0]
        num_t = noise_scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, num_t, (bsz,), device=latents_.device)
        timesteps = timesteps.long()
        noisy_latents = noise_scheduler.add_noise(latents_, noise, timesteps)
        encoder_hidden_states = text_encoder(batch["input_ids"], return_dict=False)[0]
        target = noise  # prediction_type == "epsilon"
        with autocast:
            model_pred = unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
        model_pred = model_pred.float()  # accelerate's convert_outputs_to_fp32
        loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
        avg_loss = loss.repeat(batch_size).mean()  # accelerator.gather on one process
        avg_loss.item()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), MAX_GRAD_NORM)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad()
        ema_unet.step(unet.parameters())

    reply("ready")
    steps = 0
    for command in sys.stdin:
        if command.strip() != "step":
            break
        if profiler is not None and steps == args.warmup:
            profiler.start()
        sync()
        start, cpu_start = time.perf_counter(), time.process_time()
        step()
        sync()
        reply(f"{time.perf_counter() - start} {time.process_time() - cpu_start}")
        steps += 1
    params = sum(p.numel() for p in unet.parameters())
    return dict(params=params, ema_updates=int(ema_unet.optimization_step))


# ---- parent ---------------------------------------------------------------------------------------------


def check_parity(workdir: Path) -> dict[str, float]:
    """Both sides' UNet output, scaled latent, text context and schedule agree; returns max differences."""
    import torch
    from safetensors.torch import load_file

    ours, theirs = (load_file(str(workdir / f"{name}.check")) for name in NAMES)
    diffs = {}
    for key in ours:
        torch.testing.assert_close(
            ours[key], theirs[key], rtol=1e-4, atol=1e-4, msg=lambda m, k=key: f"{k}: {m}"
        )
        diffs[key] = (ours[key] - theirs[key]).abs().max().item()
    diffs["unet_rms"] = ours["unet"].square().mean().sqrt().item()  # the compared output is not trivial
    return diffs


def run_variant(args: argparse.Namespace, variant: str, workdir: Path) -> dict:
    """Both children of one variant: parity first, then warmup + steps interleaved (ABBA...)."""
    argv = [*sys.argv[1:], "--workdir", str(workdir), "--variant", variant]
    started = {name: Child(__file__, name, argv) for name in NAMES}  # their start-ups overlap
    children = {name: child.wait_ready() for name, child in started.items()}
    diffs = check_parity(workdir)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in NAMES}
    for i in range(args.warmup + args.steps):
        for name in NAMES if i % 2 == 0 else NAMES[::-1]:
            times[name].append(children[name].step())
    results = {name: child.finish() for name, child in children.items()}
    for name, result in results.items():
        timed = times[name][args.warmup :]
        result["step_s"] = statistics.median(wall for wall, _ in timed)
        result["min_step_s"] = min(wall for wall, _ in timed)
        result["cpu_s"] = statistics.median(cpu for _, cpu in timed)
        path = workdir / f"{name}.profile"
        result["profile"] = path.read_text() if path.is_file() else None
        if path.is_file():
            path.unlink()
    assert results["ours"]["params"] == results["diffusers"]["params"], "UNet parameter counts differ"
    for name in NAMES:  # one EMA update per optimizer step on both sides
        assert results[name]["ema_updates"] == args.warmup + args.steps, (name, results[name]["ema_updates"])
    return dict(results=results, diffs=diffs)


def report(args: argparse.Namespace, runs: dict[str, dict]) -> None:
    import diffusers
    import torch

    first = next(iter(runs.values()))["results"]["ours"]
    cuda = args.device.startswith("cuda")
    s = SIZES[args.size]
    print(
        f"\nFine-tune step, ours (LatentDiffusionModule + Lightning) vs diffusers train_text_to_image.py: "
        f"size={args.size} (UNet {first['params']:,} params, SD v1 layout at width {s['model_channels']}; "
        f"kl-f8 VAE ch={s['vae_ch']}; CLIP text 768 wide, {s['text_layers']} layers), "
        f"batch {args.batch_size}, "
        f"{args.resolution}px, device={args.device}, torch {torch.__version__}, diffusers "
        f"{diffusers.__version__}, threads={first['threads']}, median of {args.steps} steps after "
        f"{args.warmup} warmup, interleaved; EMA foreach on the diffusers side: {args.foreach_ema}; "
        f"MALLOC_MMAP_THRESHOLD_={args.mmap_threshold or 'glibc default'}"
    )
    mem = "CUDA max alloc MiB" if cuda else "peak RSS growth MiB"
    print(
        f"{'variant':<12} {'ours ms':>9} {'peer ms':>9} {'time o/p':>9} {'speed p/o':>9} {'min o/p':>8} "
        f"{'CPU o/p':>8} {'ours ' + mem:>26} {'peer MiB':>9} {'mem o/p':>8}  max |diff| unet/latent/context"
    )
    for variant, run in runs.items():
        o, p = run["results"]["ours"], run["results"]["diffusers"]
        d = run["diffs"]
        print(
            f"{variant:<12} {o['step_s'] * 1e3:>9.1f} {p['step_s'] * 1e3:>9.1f} "
            f"{o['step_s'] / p['step_s']:>9.3f} "
            f"{p['step_s'] / o['step_s']:>9.3f} {o['min_step_s'] / p['min_step_s']:>8.3f} "
            f"{o['cpu_s'] / p['cpu_s']:>8.3f} {o['peak_mem'] / 2**20:>26.1f} {p['peak_mem'] / 2**20:>9.1f} "
            f"{o['peak_mem'] / p['peak_mem']:>8.3f}  {d['unet']:.1e}/{d['latent']:.1e}/{d['context']:.1e} "
            f"(UNet output RMS {d['unet_rms']:.2f})"
        )
    print("time o/p < 1 and speed p/o > 1: ours faster; mem o/p < 1: ours smaller")
    for variant, run in runs.items():
        for name in NAMES:
            table = run["results"][name]["profile"]
            if table:
                print(f"\n--- profile: {variant}, {name}, {args.steps} steps ---\n{table}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--size", default="small", choices=list(SIZES))
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--resolution", type=int, default=256, help="image side in pixels; latent = /8")
    parser.add_argument("--steps", type=int, default=6, help="timed steps (the median is reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--variants", default=DEFAULT_VARIANTS, help=f"comma-separated, of: {', '.join(VARIANTS)}"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads per child (default: all)")
    parser.add_argument(
        "--mmap-threshold",
        type=int,
        default=65536,
        help="glibc MALLOC_MMAP_THRESHOLD_ of both children (0: glibc's dynamic default); see the doc",
    )
    parser.add_argument("--foreach-ema", action="store_true", help="the recipe's --foreach_ema")
    parser.add_argument("--profile", action="store_true", help="torch.profiler over the timed steps")
    parser.add_argument("--only", choices=NAMES, help=argparse.SUPPRESS)  # child process: which side
    parser.add_argument("--variant", choices=list(VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.resolution % 8:
        parser.error(f"--resolution {args.resolution} must be a multiple of 8")
    if args.only:
        serve(args)
        return
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")

    if args.mmap_threshold:  # children inherit it (glibc reads it at start-up)
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
    runs = {}
    with tempfile.TemporaryDirectory(prefix="bench_finetune_") as tmp:
        workdir = Path(tmp)
        prepare(args, workdir)
        for variant in variants:
            runs[variant] = run_variant(args, variant, workdir)
            o, p = (runs[variant]["results"][n] for n in NAMES)
            print(
                f"{variant}: ours {o['step_s'] * 1e3:.1f} ms, diffusers {p['step_s'] * 1e3:.1f} ms, "
                f"time ratio {o['step_s'] / p['step_s']:.3f}, "
                f"memory ratio {o['peak_mem'] / p['peak_mem']:.3f}",
                flush=True,
            )
    report(args, runs)


if __name__ == "__main__":
    main()
