"""Stage 2: train a conditional UNet to denoise frozen-autoencoder latents (Rombach et al. 2022)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from ldm.conditioning.conditioner import Conditioner
from ldm.diffusion.loss import DiffusionLoss
from ldm.errors import UserError
from ldm.interop.checkpoint import load_state_dict, strip_prefix
from ldm.models.first_stage import LatentCodec, weights_identity
from ldm.modules.ema import EMA
from ldm.samplers.generate import generate_latents
from ldm.samplers.sigmas import StepSchedule
from ldm.training.optim import build_adamw

log = logging.getLogger(__name__)
LATENT_KEYS = ("latent_mean", "latent_logvar")


class LatentDiffusionModule(pl.LightningModule):
    """UNet + conditioner + frozen first stage; EMA of the trainable weights; preview sampling.

    The pieces are plain modules built by Hydra (`conf/model/ldm_*.yaml`): this class only wires them.
    """

    def __init__(
        self,
        unet: nn.Module,
        conditioner: Conditioner,
        first_stage: LatentCodec,
        loss: DiffusionLoss,
        optim: Mapping[str, Any],  # build_adamw kwargs: lr, betas, weight_decay, warmup_steps, schedule, ...
        ema_decay: float = 0.9999,  # 0 disables EMA (previews and export then use the raw weights)
        ema_warmup: bool = True,  # LDM's min(decay, (1+n)/(10+n)): EMA useful from the first steps
        sampler: Callable[..., Tensor] | None = None,  # preview sampler (a conf/sampler partial)
        preview_steps: int = 25,
        preview_cfg_scale: float = 3.0,
        init_from: str | None = None,  # fine-tune: start from these weights (export, .ckpt or SD v1 file)
        sample_posterior: bool = True,  # KL first stage: a posterior draw per step (CompVis), or its mean
    ) -> None:
        super().__init__()
        self.unet = unet
        self.conditioner = conditioner
        self.first_stage = first_stage
        self.loss = loss
        self.optim = dict(optim)
        self.sampler = sampler
        # Lin et al. 2024: a zero-terminal-SNR model's previews start from its pure-noise step (trailing).
        spacing = "trailing" if getattr(loss.schedule, "zero_terminal_snr", False) else "leading"
        self.preview_steps = StepSchedule(steps=preview_steps, spacing=spacing)
        self.preview_cfg_scale = preview_cfg_scale
        self.sample_posterior = bool(sample_posterior)
        unet_cfg = getattr(unet, "config", None) or {}
        conditioner.check_unet(
            context_dim=getattr(unet, "context_dim", unet_cfg.get("context_dim")),
            in_channels=getattr(unet, "in_channels", unet_cfg.get("in_channels")),
            latent_channels=first_stage.latent_channels,
            num_classes=getattr(unet, "num_classes", unet_cfg.get("num_classes")),
        )
        if init_from:
            self._init_weights(init_from)
        self.ema = EMA(self, decay=ema_decay, warmup=ema_warmup) if ema_decay > 0 else None
        self._fixed_batch: dict[str, Any] | None = None
        self._backup: list[Tensor] | None = None
        self._base_seed = 0

    def _init_weights(self, path: str) -> None:
        """Load UNet (+ trainable conditioner) weights for fine-tuning; EMA then starts from them."""
        state, _ = load_state_dict(path, what="model.init_from")
        unet = strip_prefix(state, "model.diffusion_model.") or strip_prefix(state, "unet.")
        if not unet:
            raise UserError(
                f"model.init_from={path} holds no UNet weights (model.diffusion_model.* or unet.*)."
            )
        try:
            self.unet.load_state_dict(unet)
        except RuntimeError as e:
            first = str(e).strip().splitlines()[1] if len(str(e).splitlines()) > 1 else str(e)
            raise UserError(f"model.init_from={path} does not fit model.unet ({first.strip()}).") from None
        conditioner = strip_prefix(state, "conditioner.")
        if conditioner:
            self.conditioner.load_state_dict(conditioner, strict=False)
        log.info("initialised %d UNet tensors from %s", len(unet), path)

    # ---- the denoising network as the loss and samplers call it -------------------------------------

    def net(self, x: Tensor, t: Tensor, context: Tensor | None = None, concat: Tensor | None = None, y=None):
        """UNet(x_t ++ concat, t, context, y): concat conditions join the latent along channels."""
        if concat is not None:
            x = torch.cat([x, concat.to(x.dtype)], dim=1)  # (B, C_latent + C_concat, h, w)
        return self.unet(x, t, context=context, y=y)

    def encode_fn(self, pixels: Tensor) -> Tensor:
        return self.first_stage.encode_pixels(pixels, sample=False)

    def latents(self, batch: Mapping[str, Any], generator: torch.Generator | None = None) -> Tensor:
        """Scaled latents of a batch: from cached posterior moments, or by encoding `image`."""
        if all(k in batch for k in LATENT_KEYS):
            unscaled = batch["latent_mean"].float()
            if self.sample_posterior:
                noise = torch.randn(unscaled.shape, generator=generator, device=unscaled.device)
                unscaled = unscaled + (0.5 * batch["latent_logvar"].float()).exp() * noise
        elif "latent" in batch:
            unscaled = batch["latent"].float()
        elif "image" in batch:
            unscaled = self.first_stage.encode_unscaled(
                batch["image"], sample=self.sample_posterior, generator=generator
            )
        else:
            raise UserError(f"batch has neither 'image' nor latent keys {LATENT_KEYS}; got {sorted(batch)}")
        if not self.first_stage.scale_known:
            value = self.first_stage.fit_scale(unscaled)
            value = (
                float(self.trainer.strategy.broadcast(torch.tensor(value), src=0)) if self._trainer else value
            )
            self.first_stage.scale_factor.fill_(value)
            log.info("latent scale_factor = %.5f (1/std of the first batch's latents)", value)
        return self.first_stage.scale(unscaled)

    # ---- training ---------------------------------------------------------------------------------

    def _step(self, batch: Mapping[str, Any], train: bool, generator: torch.Generator) -> tuple[Tensor, dict]:
        z = self.latents(batch, generator)
        cond = self.conditioner(
            batch, train=train, generator=generator, encode_fn=self.encode_fn, latent_size=tuple(z.shape[-2:])
        )
        return self.loss(self.net, z, cond, generator=generator)

    def _generator(self, *parts: int) -> torch.Generator:
        """All step randomness (t, noise, posterior sample, condition dropout) from (seed, step, rank):
        a resumed run draws exactly what the uninterrupted one would, and DDP ranks draw differently."""
        seed = (self._base_seed * 1_000_003 + sum(p * 7919**i for i, p in enumerate(parts, 1))) % 2**63
        return torch.Generator(self.device).manual_seed(seed)

    def on_fit_start(self) -> None:
        self._base_seed = torch.initial_seed()  # set by seed_everything(cfg.seed) in train.py
        datamodule = getattr(self.trainer, "datamodule", None)
        options = getattr(datamodule, "options", None)
        if getattr(options, "latents", False):  # caches must match this autoencoder (and text encoder)
            manifests = datamodule.check_autoencoder(weights_identity(self.first_stage.autoencoder))
            for c in self.conditioner.conditioners.values():
                for manifest in manifests if hasattr(c, "check_cache") else ():
                    c.check_cache(manifest, options.keys)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        gen = self._generator(
            self.global_step, self.trainer.accumulate_grad_batches, batch_idx, self.global_rank + 1
        )
        loss, logs = self._step(batch, train=True, generator=gen)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"non-finite training loss ({loss.item()}) at step {self.global_step}: lower optim.lr, "
                "check the data, or resume from the last good checkpoint with ckpt_path=last."
            )
        bs = _batch_len(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        self.log("train/loss_unweighted", logs["loss_unweighted"], batch_size=bs)
        if self._fixed_batch is None:
            self._fixed_batch = _detach_head(batch, 8)
        return loss

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        # One EMA update per optimizer step (with gradient accumulation, not every batch). Here rather than
        # in on_train_batch_end: checkpoint callbacks run before the module's batch-end hook, so a step-N
        # checkpoint would hold the EMA of step N-1 and every resume would drop one EMA update.
        if self.ema is not None:
            self.ema.update(self)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        # Fixed t and noise per batch index: the validation loss is comparable from one check to the next.
        gen = torch.Generator(self.device).manual_seed(1234 + batch_idx + 7919 * self.global_rank)
        loss, _ = self._step(batch, train=False, generator=gen)
        bs = _batch_len(batch)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=bs)
        if self._fixed_batch is None:
            self._fixed_batch = _detach_head(batch, 8)
        return loss

    def on_validation_epoch_start(self) -> None:
        if self.ema is not None:  # validate the EMA weights (what we export and sample from)
            self._backup = [p.detach().clone() for p, _ in self.ema._pairs(self)]
            self.ema.copy_to(self)

    def on_validation_epoch_end(self) -> None:
        if self.ema is not None and self._backup is not None:
            with torch.no_grad():
                for (p, _), saved in zip(self.ema._pairs(self), self._backup):
                    p.copy_(saved)
            self._backup = None

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Saved mid-validation (e.g. SIGTERM): store the training weights, not the EMA weights swapped in.
        if self.ema is not None and self._backup is not None:
            for name, saved in zip(self.ema._names, self._backup):
                checkpoint["state_dict"][name] = saved.clone()

    def configure_optimizers(self) -> dict:
        params = list(self.unet.parameters()) + self.conditioner.trainable_parameters()
        total = self.trainer.max_steps if self.trainer and self.trainer.max_steps > 0 else None
        return build_adamw(params, total_steps=total, **self.optim)

    # ---- previews and export ----------------------------------------------------------------------

    @torch.no_grad()
    def sample(
        self,
        inputs: Mapping[str, Any],
        seeds: list[int],
        cfg_scale: float,
        sampler=None,
        steps: StepSchedule | None = None,
        latent_size: tuple[int, int] | None = None,
    ) -> Tensor:
        """Images in [-1,1] for raw conditioning inputs (prompts, labels, masked images...)."""
        latent_hw = latent_size or self._latent_size(inputs)
        cond, uncond = self.conditioner.encode_with_null(
            inputs, batch_size=len(seeds), device=self.device, encode_fn=self.encode_fn, latent_size=latent_hw
        )
        z = generate_latents(
            self.net,
            self.loss.schedule.alphas_cumprod,
            sampler=sampler or self.sampler,
            steps=steps or self.preview_steps,
            shape=(self.first_stage.latent_channels, *latent_hw),
            seeds=seeds,
            cond=cond,
            uncond=uncond if cfg_scale != 1.0 else None,
            cfg_scale=cfg_scale,
            parameterization=self.loss.parameterization,
            device=self.device,
        )
        return self.first_stage.decode(z).clamp(-1, 1)

    def _latent_size(self, batch: Mapping[str, Any]) -> tuple[int, int]:
        f = self.first_stage.downsample_factor
        for key in ("image", "masked_image", "segmap"):
            if key in batch and hasattr(batch[key], "shape"):
                return batch[key].shape[-2] // f, batch[key].shape[-1] // f
        if "latent_mean" in batch:
            return tuple(batch["latent_mean"].shape[-2:])
        if "lowres" in batch:  # SuperResConditioner.upscale = latent side / low-res side
            up = self._sr_upscale()
            return round(batch["lowres"].shape[-2] * up), round(batch["lowres"].shape[-1] * up)
        raise UserError(f"cannot tell the latent size from a batch with keys {sorted(batch)}")

    def _sr_upscale(self) -> float:
        for c in self.conditioner.conditioners.values():
            if hasattr(c, "upscale"):
                return float(c.upscale)
        return 1.0

    @property
    def last_batch(self) -> dict[str, Any] | None:
        """What the ImageLogger renders at the end of training: the fixed preview conditions."""
        return self._fixed_batch

    @torch.no_grad()
    def log_images(self, batch: Mapping[str, Any], max_images: int = 8) -> dict[str, Tensor]:
        """EMA samples for fixed conditions (the first batch seen), with their inputs."""
        fixed = self._fixed_batch or _detach_head(batch, max_images)
        inputs = {k: _head(v, max_images) for k, v in fixed.items() if k in self.conditioner.input_keys}
        n = min(max_images, _batch_len(fixed))
        inputs = {k: (v.to(self.device) if isinstance(v, Tensor) else v) for k, v in inputs.items()}
        seeds = list(range(n))
        size = self._latent_size(fixed)
        if self.ema is not None:
            with self.ema.swapped_in(self):
                samples = self.sample(inputs, seeds, self.preview_cfg_scale, latent_size=size)
        else:
            samples = self.sample(inputs, seeds, self.preview_cfg_scale, latent_size=size)
        out = {"samples": samples}
        if "image" in fixed:
            out["inputs"] = _head(fixed["image"], n).to(samples)
        for key in ("masked_image", "lowres"):
            if key in fixed:
                out[key] = _head(fixed[key], n).to(samples)
        if "segmap" in fixed:
            seg = _head(fixed["segmap"], n).float()
            out["segmap"] = (seg / max(1.0, float(seg.max())) * 2 - 1).unsqueeze(1).expand(-1, 3, -1, -1)
        return out

    def export_config(self, config: dict) -> dict:
        """Run config + the autoencoder's own config, so an export rebuilds without the stage-1 file."""
        return {**config, "first_stage_autoencoder": self.first_stage.autoencoder_config}

    def export_state_dict(self) -> dict[str, Tensor]:
        """CompVis layout with EMA weights in place: model.diffusion_model.*, first_stage_model.*, ..."""
        state = self.ema.averaged_state(self) if self.ema is not None else dict(self.state_dict())
        out: dict[str, Tensor] = {}
        for key, value in state.items():
            if key.startswith("ema."):
                continue
            if key.startswith("unet."):
                out["model.diffusion_model." + key[5:]] = value
            elif key.startswith("first_stage.autoencoder."):
                out["first_stage_model." + key[len("first_stage.autoencoder.") :]] = value
            elif key == "first_stage.scale_factor":
                out["scale_factor"] = value
            elif key.startswith("loss.") or key.startswith("conditioner."):
                out[key] = value
        return out


def _head(value: Any, n: int) -> Any:
    return value[:n]


def _batch_len(batch: Mapping[str, Any]) -> int:
    for v in batch.values():
        if isinstance(v, (Tensor, list, tuple)):
            return len(v)
    return 1


def _detach_head(batch: Mapping[str, Any], n: int) -> dict[str, Any]:
    return {
        k: (v[:n].detach().clone() if isinstance(v, Tensor) else list(v[:n]))
        for k, v in batch.items()
        if isinstance(v, (Tensor, list, tuple))
    }
