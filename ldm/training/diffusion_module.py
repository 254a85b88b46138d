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
from ldm.errors import TrainingDiverged, UserError
from ldm.interop.checkpoint import load_state_dict, strip_prefix
from ldm.models.first_stage import LatentCodec, weights_identity
from ldm.models.latent_diffusion import LatentDiffusion
from ldm.modules.ema import EMA
from ldm.samplers.sigmas import StepSchedule
from ldm.training.optim import build_optimizer
from ldm.training.resume_check import check_resume_state
from ldm.training.speed import prepare_for_speed

log = logging.getLogger(__name__)


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
        optim: Mapping[
            str, Any
        ],  # lr, warmup_steps, schedule, min_lr_ratio, optimizer (partial), its options
        ema_decay: float = 0.9999,  # 0 disables EMA (previews and export then use the raw weights)
        ema_warmup: bool = True,  # LDM's min(decay, (1+n)/(10+n)): EMA useful from the first steps
        sampler: Callable[..., Tensor] | None = None,  # preview sampler (a conf/sampler partial)
        preview_steps: int = 25,
        preview_cfg_scale: float = 3.0,
        init_from: str | None = None,  # fine-tune: start from these weights (export, .ckpt or SD v1 file)
        refit_scale_factor: bool = False,  # with init_from: fit the latent scale anew instead of the file's
        sample_posterior: bool = True,  # KL first stage: a posterior draw per step (CompVis), or its mean
        conditioner_lr: Mapping[str, float] | None = None,  # own LR (param group) per trainable conditioner
        compile: bool = False,  # torch.compile the UNet's forward (ldm.training.speed; names unchanged)
        compile_mode: str = "default",  # ldm.training.speed.COMPILE_MODES (inductor's modes)
        channels_last: bool = False,  # UNet weights and inputs in NHWC memory order
        compile_backend: str = "inductor",  # inductor; aot_eager / eager to debug a compile problem
        residual_over: str | None = None,  # "lowres": diffuse the residual over the bicubic upscale (SR)
    ) -> None:
        super().__init__()
        self.model = LatentDiffusion(
            unet,
            conditioner,
            first_stage,
            loss,
            sample_posterior=sample_posterior,
            residual_over=residual_over,
        )
        self.optim = dict(optim)
        self.conditioner_lr = dict(conditioner_lr or {})
        self.sampler = sampler
        self.preview_steps = StepSchedule(steps=preview_steps, spacing=self.model.default_spacing)
        self.preview_cfg_scale = preview_cfg_scale
        if init_from:
            self._init_weights(init_from, refit_scale_factor)
        # In place and name-preserving: EMA, checkpoints, exports and resume see the plain UNet names.
        prepare_for_speed(
            self.unet,
            compile=compile,
            compile_mode=compile_mode,
            channels_last=channels_last,
            compile_backend=compile_backend,
        )
        self.ema = EMA(self.model, decay=ema_decay, warmup=ema_warmup) if ema_decay > 0 else None
        self._fixed_batch: dict[str, Any] | None = None
        self._backup: list[Tensor] | None = None
        self._base_seed = 0

    @classmethod
    def from_model(
        cls, model: LatentDiffusion, *, optim: Mapping[str, Any], **options: Any
    ) -> LatentDiffusionModule:
        """Training around an existing plain model (e.g. released weights from `ldm.interop.load.load_model`).

        Its pieces are taken as they are (weights, `requires_grad`, latent scale, schedule); EMA starts from
        the parameters that require grad. `options`: the constructor's other keywords (ema_decay, sampler,
        conditioner_lr, ...; not init_from)."""
        options.setdefault("sample_posterior", model.sample_posterior)
        return cls(model.unet, model.conditioner, model.first_stage, model.loss, optim, **options)

    # The pieces, for reading (the plain model owns them; its names are the export's, without `model.`).
    unet = property(lambda self: self.model.unet)
    conditioner = property(lambda self: self.model.conditioner)
    first_stage = property(lambda self: self.model.first_stage)
    loss = property(lambda self: self.model.loss)
    encode_fn = property(lambda self: self.model.encode_fn)

    def _init_weights(self, path: str, refit_scale: bool = False) -> None:
        """Load UNet (+ trainable conditioner) weights for fine-tuning; EMA then starts from them.

        The file's latent scale_factor comes along: the UNet was trained on latents scaled by it, so a
        re-fitted value (0.18215 became 3.43 on other data) would feed it differently scaled inputs."""
        state, _ = load_state_dict(path, what="model.init_from")
        self._carry_scale(path, state, refit_scale)
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

    def _carry_scale(self, path: str, state: Mapping[str, Tensor], refit: bool) -> None:
        stored = state.get("scale_factor", state.get("first_stage.scale_factor"))
        if stored is None or not torch.isfinite(stored.float()).all():
            return
        value, codec = float(stored), self.model.first_stage
        if refit:
            log.warning(
                "model.refit_scale_factor=true: the latent scale is fitted anew although %s was trained with "
                "scale_factor=%.5f; its UNet then sees differently scaled latents",
                path,
                value,
            )
            codec.scale_factor.fill_(float("nan"))
        elif codec.scale_known and abs(float(codec.scale_factor) - value) > 1e-6 * abs(value):
            log.warning(
                "model.first_stage.scale_factor=%.5f overrides the %.5f that %s was trained with",
                float(codec.scale_factor),
                value,
                path,
            )
        else:
            codec.scale_factor.fill_(value)
            log.info("latent scale_factor = %.5f, from %s", value, path)

    def net(self, x: Tensor, t: Tensor, context: Tensor | None = None, concat: Tensor | None = None, y=None):
        return self.model.net(x, t, context=context, concat=concat, y=y)

    def latents(self, batch: Mapping[str, Any], generator: torch.Generator | None = None) -> Tensor:
        """Scaled latents of a batch (see LatentDiffusion.latents); an unset scale is fitted on rank 0."""
        return self.model.latents(batch, generator, fit_scale=self._broadcast_scale)

    def _broadcast_scale(self, value: float) -> float:
        if self._trainer:
            value = float(self.trainer.strategy.broadcast(torch.tensor(value), src=0))
        log.info("latent scale_factor = %.5f (1/std of the first batch's latents)", value)
        return value

    # ---- training ---------------------------------------------------------------------------------

    def _step(self, batch: Mapping[str, Any], train: bool, generator: torch.Generator) -> tuple[Tensor, dict]:
        return self.model.training_loss(batch, train, generator, fit_scale=self._broadcast_scale)

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
            raise TrainingDiverged(
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
        # Free the gradients now: Lightning zeroes them only after the next forward pass, which kept one
        # UNet-sized copy alive through it (bench_finetune: peak memory 1.14x diffusers' recipe; 1.006x now).
        optimizer = args[2] if len(args) > 2 else kwargs["optimizer"]
        optimizer.zero_grad(set_to_none=True)
        # One EMA update per optimizer step (with gradient accumulation, not every batch). Here rather than
        # in on_train_batch_end: checkpoint callbacks run before the module's batch-end hook, so a step-N
        # checkpoint would hold the EMA of step N-1 and every resume would drop one EMA update.
        if self.ema is not None:
            self.ema.update(self.model)

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
            self._backup = [p.detach().clone() for p, _ in self.ema._pairs(self.model)]
            self.ema.copy_to(self.model)

    def on_validation_epoch_end(self) -> None:
        if self.ema is not None and self._backup is not None:
            with torch.no_grad():
                for (p, _), saved in zip(self.ema._pairs(self.model), self._backup):
                    p.copy_(saved)
            self._backup = None

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Saved mid-validation (e.g. SIGTERM): store the training weights, not the EMA weights swapped in.
        if self.ema is not None and self._backup is not None:
            for name, saved in zip(self.ema._names, self._backup):
                checkpoint["state_dict"]["model." + name] = saved.clone()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Checkpoints of earlier versions held the pieces at the top level (unet.*, not model.unet.*).
        state = checkpoint.get("state_dict") or {}
        for key in [k for k in state if k.startswith(("unet.", "conditioner.", "first_stage.", "loss."))]:
            state["model." + key] = state.pop(key)
        check_resume_state(self, checkpoint, self.checkpoint_keys())

    def checkpoint_keys(self) -> dict[str, Tensor] | None:
        """The state entries a checkpoint of this module holds (None: all of them; adapters: their own)."""
        return None

    def param_groups(self) -> list[dict[str, Any]]:
        """The UNet's trainable parameters + trainable conditioners in one group; conditioners named in
        `conditioner_lr` in their own (`lr` = that value; the LR schedule multiplies every group's)."""
        main, own = [p for p in self.unet.parameters() if p.requires_grad], []
        for name, c in self.conditioner.conditioners.items():
            params = [p for p in c.parameters() if p.requires_grad] if c.trainable else []
            if name in self.conditioner_lr:
                own.append({"params": params, "lr": float(self.conditioner_lr[name]), "name": name})
            else:
                main += params
        return [{"params": main, "name": "unet"}, *own]

    def configure_optimizers(self) -> dict:
        total = self.trainer.max_steps if self.trainer and self.trainer.max_steps > 0 else None
        return build_optimizer(self.param_groups(), total_steps=total, **self.optim)

    # ---- previews and export ----------------------------------------------------------------------

    def sample(
        self,
        inputs: Mapping[str, Any],
        seeds: list[int],
        cfg_scale: float,
        sampler=None,
        steps: StepSchedule | None = None,
        latent_size: tuple[int, int] | None = None,
    ) -> Tensor:
        """Images in [-1,1] for raw conditioning inputs (the preview sampler and steps by default)."""
        return self.model.sample(
            inputs,
            seeds,
            cfg_scale,
            sampler=sampler or self.sampler,
            steps=steps or self.preview_steps,
            latent_size=latent_size,
            device=self.device,
        )

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
        size = self.model.latent_size(fixed)
        if self.ema is not None:
            with self.ema.swapped_in(self.model):
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
        """Run config + the autoencoder's own config (an export rebuilds without the stage-1 file) + the pixel
        size training saw (`sample_size`, [H, W]: cached latents may be smaller than data.resolution)."""
        out = {**config, "first_stage_autoencoder": self.first_stage.autoencoder_config}
        data = config.get("data") or {}
        if (data.get("buckets") or {}).get("enabled") and not data.get("latents") and data.get("resolution"):
            # aspect-ratio buckets: the first batch is one bucket of many; default to the square
            out["sample_size"] = [int(data["resolution"])] * 2
        elif self._fixed_batch is not None:
            h, w = self.model.latent_size(self._fixed_batch)
            f = self.first_stage.downsample_factor
            out["sample_size"] = [int(h) * f, int(w) * f]
        return out

    def export_state_dict(self) -> dict[str, Tensor]:
        """CompVis layout with EMA weights in place: model.diffusion_model.*, first_stage_model.*, ..."""
        state = self.ema.averaged_state(self.model) if self.ema is not None else None
        return self.model.export_state_dict(state)


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
