"""A web page for sampling: `python -m ldm.app ckpt=<model.safetensors>` (or `make app CKPT=...`).

The page (gradio) offers the loaded model's tasks (txt2img, img2img, inpaint with a painted mask, outpaint,
superres, semantic, class, uncond), the samplers of conf/sampler, steps, CFG, seed, size, LoRA files, and a
gallery of results with their parameters and a zip download; progress shows while sampling.

- `ldm.app.session`: the glue (no gradio): `Session` holds one `ldm.pipeline.Pipeline`, `Request` is a click.
- `ldm.app.page`: the gradio page over a Session (`build_page`, `launch`).
- `ldm.app.__main__`: the command line.
"""

from ldm.app.session import Generation, Request, Session

__all__ = ["Generation", "Request", "Session"]
