"""ldm.models: autoencoders (stage 1), their losses, and the latent diffusion model (stage 2)."""

from ldm.models.latent_diffusion import LatentDiffusion

__all__ = ["LatentDiffusion"]
