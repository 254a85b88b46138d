"""Stage-1 loss: reconstruction + LPIPS + KL or codebook term + PatchGAN (Esser et al. 2021, eqs. 4-7).

One class for both regularisers, after CompVis `LPIPSWithDiscriminator` (KL) and `VQLPIPSWithDiscriminator`
(VQ). The reductions follow those recipes so their published weights keep their meaning: with a posterior
(KL) the NLL and KL are summed over pixels/latents and averaged over the batch (SD's kl_weight=1e-6); with a
codebook loss (VQ) the NLL is averaged over all elements (taming's codebook_weight=1.0).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm.errors import UserError
from ldm.models.discriminator import NLayerDiscriminator
from ldm.models.lpips import LPIPS
from ldm.modules.distributions import DiagonalGaussianDistribution


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Hinge discriminator loss (Lim & Ye 2017): 0.5 * (E[relu(1 - D(x))] + E[relu(1 + D(x_rec))])."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Non-saturating GAN loss (Goodfellow et al. 2014): 0.5 (E[softplus(-D(x))] + E[softplus(D(x_rec))])."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


DISC_LOSSES = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}


def adaptive_disc_weight(nll_loss: Tensor, g_loss: Tensor, last_layer: Tensor, delta: float = 1e-4) -> Tensor:
    """lambda = ||grad_GL L_rec|| / (||grad_GL L_GAN|| + delta), clamped to [0, 1e4] (VQGAN eq. 7)."""
    nll_grads = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grads = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = torch.norm(nll_grads) / (torch.norm(g_grads) + delta)
    return torch.clamp(weight, 0.0, 1e4).detach()


class AutoencoderLoss(nn.Module):
    """Generator loss (optimizer_idx 0) and discriminator loss (optimizer_idx 1); each returns (loss, log)."""

    def __init__(
        self,
        disc_start: int = 50001,  # step at which the GAN starts (SD kl-f8 recipe: 50001)
        pixel_loss: str = "l1",  # "l1" (CompVis) or "l2"
        perceptual_weight: float = 1.0,  # 0 skips LPIPS entirely
        perceptual_loss: nn.Module | None = None,  # default: LPIPS(); configure its weight files there
        logvar_init: float = 0.0,  # learned output log-variance: nll = rec / exp(logvar) + logvar
        kl_weight: float = 1e-6,  # SD kl-f8 recipe (on the summed KL)
        codebook_weight: float = 1.0,  # taming recipe (on the mean codebook loss)
        disc_weight: float = 0.5,  # times the adaptive weight; SD kl-f8 uses 0.5, taming VQGAN 0.8
        disc_factor: float = 1.0,  # overall GAN factor once active
        disc_loss: str = "hinge",  # "hinge" or "vanilla"
        discriminator: nn.Module | None = None,  # default: NLayerDiscriminator(3, 64, 3)
    ) -> None:
        super().__init__()
        if pixel_loss not in ("l1", "l2"):
            raise UserError(f"AutoencoderLoss: pixel_loss={pixel_loss!r}; use 'l1' or 'l2'.")
        if disc_loss not in DISC_LOSSES:
            raise UserError(f"AutoencoderLoss: disc_loss={disc_loss!r}; use one of {sorted(DISC_LOSSES)}.")
        self.disc_start = disc_start
        self.pixel_loss = pixel_loss
        self.perceptual_weight = perceptual_weight
        if perceptual_weight > 0 and perceptual_loss is None:
            perceptual_loss = LPIPS()
        self.perceptual_loss = perceptual_loss if perceptual_weight > 0 else None
        self.logvar = nn.Parameter(torch.full((), float(logvar_init)))
        self.kl_weight = kl_weight
        self.codebook_weight = codebook_weight
        self.disc_weight = disc_weight
        self.disc_factor = disc_factor
        self.disc_loss_name = disc_loss
        self.disc_loss_fn = DISC_LOSSES[disc_loss]
        self.discriminator = discriminator if discriminator is not None else NLayerDiscriminator()

    def gan_active(self, global_step: int) -> bool:
        """Whether the adversarial terms are on at this step (CompVis `adopt_weight`)."""
        return global_step >= self.disc_start and self.disc_factor > 0

    def forward(
        self,
        inputs: Tensor,
        reconstructions: Tensor,
        optimizer_idx: int,
        global_step: int,
        *,
        posterior: DiagonalGaussianDistribution | None = None,
        codebook_loss: Tensor | None = None,
        last_layer: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        if optimizer_idx == 0:
            return self.generator_loss(
                inputs, reconstructions, global_step, posterior, codebook_loss, last_layer
            )
        if optimizer_idx == 1:
            return self.discriminator_loss(inputs, reconstructions, global_step)
        raise ValueError(f"optimizer_idx must be 0 (generator) or 1 (discriminator), got {optimizer_idx}")

    def generator_loss(
        self,
        inputs: Tensor,
        reconstructions: Tensor,
        global_step: int,
        posterior: DiagonalGaussianDistribution | None = None,
        codebook_loss: Tensor | None = None,
        last_layer: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """NLL (+ LPIPS) + regulariser + adaptively weighted GAN term (VQGAN eq. 6, KL or codebook term)."""
        if (posterior is None) == (codebook_loss is None):
            raise ValueError("pass exactly one of posterior (AutoencoderKL) or codebook_loss (VQModel)")
        batch = inputs.shape[0]
        diff = reconstructions - inputs.contiguous()
        rec = diff.abs() if self.pixel_loss == "l1" else diff.pow(2)  # (B, C, H, W)
        log: dict[str, Tensor] = {"rec_loss": rec.detach().mean()}
        if self.perceptual_loss is not None:
            p_loss = self.perceptual_loss(inputs.contiguous(), reconstructions.contiguous())  # (B, 1, 1, 1)
            rec = rec + self.perceptual_weight * p_loss
            log["p_loss"] = p_loss.detach().mean()
        nll = rec / torch.exp(self.logvar) + self.logvar  # Gaussian/Laplace NLL with a learned scale
        if posterior is not None:
            nll_loss = nll.sum() / batch
            kl_loss = posterior.kl().sum() / batch
            loss = nll_loss + self.kl_weight * kl_loss
            log["kl_loss"] = kl_loss.detach()
        else:
            nll_loss = nll.mean()
            codebook_loss = codebook_loss.mean()
            loss = nll_loss + self.codebook_weight * codebook_loss
            log["codebook_loss"] = codebook_loss.detach()

        # The GAN term needs gradients for its adaptive weight; validation (no grad) reports the rest
        g_loss = torch.zeros((), device=inputs.device)
        disc_weight = torch.zeros((), device=inputs.device)
        if self.gan_active(global_step) and torch.is_grad_enabled() and reconstructions.requires_grad:
            if last_layer is None:
                raise ValueError("the GAN term needs last_layer=autoencoder.get_last_layer()")
            g_loss = -self.discriminator(reconstructions.contiguous()).mean()
            disc_weight = adaptive_disc_weight(nll_loss, g_loss, last_layer) * self.disc_weight
            loss = loss + disc_weight * self.disc_factor * g_loss
        log.update(
            loss=loss.detach(),
            nll_loss=nll_loss.detach(),
            logvar=self.logvar.detach(),
            g_loss=g_loss.detach(),
            disc_weight=disc_weight,
            disc_factor=torch.tensor(
                self.disc_factor if self.gan_active(global_step) else 0.0, device=inputs.device
            ),
        )
        return loss, log

    def discriminator_loss(
        self, inputs: Tensor, reconstructions: Tensor, global_step: int
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Hinge or vanilla loss of D on real images vs. (detached) reconstructions; 0 before disc_start."""
        logits_real = self.discriminator(inputs.contiguous().detach())
        logits_fake = self.discriminator(reconstructions.contiguous().detach())
        factor = self.disc_factor if self.gan_active(global_step) else 0.0
        d_loss = factor * self.disc_loss_fn(logits_real, logits_fake)
        log = {
            "disc_loss": d_loss.detach(),
            "logits_real": logits_real.detach().mean(),
            "logits_fake": logits_fake.detach().mean(),
        }
        return d_loss, log
