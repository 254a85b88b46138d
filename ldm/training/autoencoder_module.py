"""LightningModule for stage 1: train AutoencoderKL or VQModel with `AutoencoderLoss` (generator + PatchGAN).

Step counting: Lightning's `trainer.global_step` in manual optimization is the number of completed
`LightningOptimizer.step()` calls, so stepping two wrapped optimizers per batch would count every batch twice
(and `max_steps=300` would stop after 150 batches). We step the generator through its `LightningOptimizer`
(counted: exactly one step per batch) and the discriminator through `trainer.strategy.optimizer_step` on the
unwrapped optimizer: the same precision/strategy path (AMP grad scaling, unscale, skipping on inf) without
the progress hook that defines `global_step`. So `global_step` counts training iterations and `max_steps=N`
means N batches. The discriminator and its scheduler only step once the GAN is active
(`global_step >= disc_start`), so its warm-up starts at `disc_start`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR

from ldm.errors import TrainingDiverged, UserError
from ldm.models.autoencoder import VQModel
from ldm.training.optim import adamw
from ldm.training.resume_check import check_resume_state
from ldm.training.speed import prepare_for_speed


class LinearWarmup:
    """LR factor min(1, (n + 1) / warmup_steps); a class (not a lambda) so LambdaLR saves its state."""

    def __init__(self, warmup_steps: int) -> None:
        self.warmup_steps = warmup_steps

    def __call__(self, step: int) -> float:
        return 1.0 if self.warmup_steps <= 0 else min(1.0, (step + 1) / self.warmup_steps)


def psnr(images: Tensor, reconstructions: Tensor) -> Tensor:
    """Mean per-image PSNR in dB of [-1, 1] tensors, measured on [0, 1] with peak 1: 10 log10(1 / MSE)."""
    x = (images.clamp(-1, 1) + 1) / 2
    y = (reconstructions.clamp(-1, 1) + 1) / 2
    mse = (x - y).pow(2).flatten(1).mean(dim=1).clamp_min(1e-10)
    return (10.0 * torch.log10(1.0 / mse)).mean()


class AutoencoderModule(pl.LightningModule):
    """Trains a first-stage autoencoder; reads batch["image"] (B, 3, H, W) in [-1, 1]."""

    def __init__(
        self,
        autoencoder: nn.Module,  # AutoencoderKL or VQModel
        loss: nn.Module,  # AutoencoderLoss (holds the discriminator and LPIPS)
        learning_rate: float = 4.5e-6,  # CompVis base rate, used as is (no hidden batch-size scaling)
        betas: Sequence[float] = (0.5, 0.9),  # GAN-style Adam betas (taming/CompVis)
        weight_decay: float = 0.0,  # AdamW decoupled decay; 0 = Adam as in CompVis
        lr_warmup_steps: int = 0,  # linear warm-up for each optimizer from its first step
        disc_learning_rate: float | None = None,  # None: same as learning_rate
        compile: bool = False,  # torch.compile its forward (ldm.training.speed; names unchanged)
        compile_mode: str = "default",  # ldm.training.speed.COMPILE_MODES (inductor's modes)
        channels_last: bool = False,  # autoencoder weights and images in NHWC memory order
        compile_backend: str = "inductor",  # inductor; aot_eager / eager to debug a compile problem
    ) -> None:
        super().__init__()
        # Plain floats, not an OmegaConf ListConfig from Hydra: checkpoints must load with weights_only=True
        betas = tuple(float(b) for b in betas)
        self.save_hyperparameters(ignore=["autoencoder", "loss"])
        self.autoencoder = prepare_for_speed(
            autoencoder,
            compile=compile,
            compile_mode=compile_mode,
            channels_last=channels_last,
            compile_backend=compile_backend,
        )
        self.loss = loss
        self.automatic_optimization = False  # two optimizers per batch (generator, discriminator)
        self.last_batch: dict[str, Any] | None = None  # the ImageLogger renders it at the end of training

    # -- helpers ---------------------------------------------------------------------------------------
    @property
    def is_vq(self) -> bool:
        return isinstance(self.autoencoder, VQModel)

    @staticmethod
    def _images(batch: dict[str, Any]) -> Tensor:
        if "image" not in batch:
            raise UserError(
                f"AutoencoderModule needs batch['image'] (B, 3, H, W) in [-1, 1]; the batch has keys "
                f"{sorted(batch)}. Stage 1 trains on images, not on cached latents."
            )
        return batch["image"]

    def _reconstruct(
        self, x: Tensor, sample_posterior: bool
    ) -> tuple[Tensor, dict[str, Any], dict[str, Tensor]]:
        """(reconstruction, regulariser kwargs for the loss, extra metrics)."""
        if self.is_vq:
            dec, qloss, info = self.autoencoder(x)
            return dec, {"codebook_loss": qloss}, {k: info[k] for k in ("perplexity", "codebook_usage")}
        dec, posterior = self.autoencoder(x, sample_posterior=sample_posterior)
        return dec, {"posterior": posterior}, {}

    def _check_finite(self, loss: Tensor, which: str, step: int) -> None:
        if not torch.isfinite(loss).item():
            raise TrainingDiverged(
                f"non-finite {which} loss ({loss.item()}) at global step {step}: lower the learning rate, "
                "check the data for NaN/inf pixels, or restart from the last checkpoint."
            )

    # -- training --------------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        x = self._images(batch)
        self.last_batch = batch
        opt_g, opt_d = self.optimizers()
        sch_g, sch_d = self.lr_schedulers()
        step = self.global_step  # iterations done so far; the same value for both losses of this batch

        dec, regulariser, metrics = self._reconstruct(x, sample_posterior=True)
        with opt_g.toggle_model():  # the discriminator gets no gradient from the generator loss
            g_loss, g_log = self.loss(
                x, dec, 0, step, last_layer=self.autoencoder.get_last_layer(), **regulariser
            )
            self._check_finite(g_loss, "generator", step)
            opt_g.zero_grad(set_to_none=True)
            self.manual_backward(g_loss)
            opt_g.step()  # the one counted step of this batch: global_step += 1
        sch_g.step()

        d_log: dict[str, Tensor] = {"disc_loss": torch.zeros((), device=x.device)}
        if self.loss.gan_active(step):
            d_loss, d_log = self.loss(x, dec.detach(), 1, step)
            self._check_finite(d_loss, "discriminator", step)
            opt_d.zero_grad(set_to_none=True)
            self.manual_backward(d_loss)
            # Not opt_d.step(): that would increment global_step a second time (see the module docstring)
            self.trainer.strategy.optimizer_step(opt_d.optimizer, closure=lambda: None)
            sch_d.step()

        main = {"rec_loss": g_log["rec_loss"], "g_loss": g_log["g_loss"], "disc_loss": d_log["disc_loss"]}
        reg_key = "codebook_loss" if self.is_vq else "kl_loss"
        main[reg_key] = g_log[reg_key]
        if self.is_vq:
            main["perplexity"] = metrics["perplexity"]
        self.log_dict({f"train/{k}": v for k, v in main.items()}, prog_bar=True)
        rest = {k: g_log[k] for k in ("loss", "nll_loss", "disc_weight", "logvar", "p_loss") if k in g_log}
        rest.update({k: v for k, v in d_log.items() if k != "disc_loss"})
        if self.is_vq:
            rest["codebook_usage"] = metrics["codebook_usage"]
        rest["lr"] = torch.tensor(opt_g.param_groups[0]["lr"])
        self.log_dict({f"train/{k}": v for k, v in rest.items()})
        return g_loss.detach()

    # -- validation ------------------------------------------------------------------------------------
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        x = self._images(batch)
        # Deterministic (posterior mode) so the monitored val/loss does not fluctuate with sampling noise
        dec, regulariser, metrics = self._reconstruct(x, sample_posterior=False)
        # No gradients here, so the loss leaves out the GAN term: val/loss = NLL + regulariser
        loss, log = self.loss(x, dec, 0, self.global_step, **regulariser)
        values = {"loss": loss, "rec_loss": log["rec_loss"], "psnr": psnr(x, dec)}
        values.update({k: log[k] for k in ("nll_loss", "kl_loss", "codebook_loss", "p_loss") if k in log})
        values.update(metrics)
        self.log_dict(
            {f"val/{k}": v for k, v in values.items() if k not in ("loss", "rec_loss", "psnr")},
            sync_dist=True,
        )
        self.log_dict(
            {f"val/{k}": values[k] for k in ("loss", "rec_loss", "psnr")}, prog_bar=True, sync_dist=True
        )

    # -- optimizers ------------------------------------------------------------------------------------
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_resume_state(self, checkpoint)  # one line when ckpt_path is another model's checkpoint

    def configure_optimizers(self) -> tuple[list[torch.optim.Optimizer], list[LambdaLR]]:
        hp = self.hparams
        discriminator = getattr(self.loss, "discriminator", None)
        if discriminator is None or not hasattr(self.loss, "logvar"):
            raise UserError(
                "AutoencoderModule: `loss` must have `discriminator` and `logvar` (use AutoencoderLoss)."
            )
        groups = [
            {"params": [p for p in self.autoencoder.parameters() if p.requires_grad]},
            {"params": [self.loss.logvar], "weight_decay": 0.0},  # a scalar scale, not a weight to shrink
        ]
        # ldm.training.optim.adamw: the fused kernel wherever torch has one (CUDA; CPU from torch 2.4)
        opt_g = adamw(groups, lr=hp.learning_rate, betas=hp.betas, weight_decay=hp.weight_decay)
        disc_lr = hp.learning_rate if hp.disc_learning_rate is None else hp.disc_learning_rate
        opt_d = adamw(
            [{"params": [p for p in discriminator.parameters() if p.requires_grad]}],
            lr=disc_lr,
            betas=hp.betas,
            weight_decay=hp.weight_decay,
        )
        warmup = LinearWarmup(hp.lr_warmup_steps)
        return [opt_g, opt_d], [LambdaLR(opt_g, warmup), LambdaLR(opt_d, warmup)]

    # -- used by the callbacks -------------------------------------------------------------------------
    @torch.no_grad()
    def log_images(self, batch: dict[str, Any], max_images: int = 8) -> dict[str, Tensor]:
        """Inputs and (posterior-mode) reconstructions in [-1, 1], at most `max_images` of each."""
        x = self._images(batch)[:max_images].to(self.device)
        was_training = self.autoencoder.training
        self.autoencoder.eval()  # also keeps a VQ codebook from updating
        try:
            dec = self._reconstruct(x, sample_posterior=False)[0]
        finally:
            self.autoencoder.train(was_training)
        return {"inputs": x, "reconstructions": dec.clamp(-1.0, 1.0)}

    def export_state_dict(self) -> dict[str, Tensor]:
        """The autoencoder's own weights (CompVis first-stage names; no discriminator, no LPIPS)."""
        return {k: v.detach().cpu().contiguous() for k, v in self.autoencoder.state_dict().items()}
