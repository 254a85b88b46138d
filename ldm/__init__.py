"""ldm: train, fine-tune and sample Latent Diffusion Models."""

__version__ = "0.1.0"
