"""Builders for each original checkpoint family, registered in `ldm.interop.registry` on import.

- `sd1`: Stable Diffusion 1.x (CLIP ViT-L/14 text encoder, KL autoencoder), SD 1.x inpainting.
- `ldm_vq`: the LDM paper's VQ first stage; its superres, semantic and inpainting conditioners.
- `ldm_cond`: the LDM paper's class-conditional ImageNet (ClassEmbedder) and LAION txt2img (BERTEmbedder).
- `sd2`: Stable Diffusion 2.x (OpenCLIP ViT-H/14 text encoder), SD 2 inpainting, the SD x4 upscaler.
"""

from ldm.interop.families import ldm_cond, ldm_vq, sd1, sd2  # noqa: F401
