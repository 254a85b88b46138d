"""Which original model family a CompVis / Stability checkpoint is, from its key names and shapes alone.

`load_model(path)` without `config=` uses this to pick one of the built-in inference yamls in
`ldm/interop/configs/` (full-size configs of the released weights), as if the user had passed it. Only key
names and tensor shapes are read, so a state dict of meta tensors is recognised as well as a real one.

What tells the families apart (`Signature`):

    model.diffusion_model.input_blocks.0.0.weight   (C, in, 3, 3)   UNet input channels, model_channels
    model.diffusion_model.out.2.weight              (out, C, 3, 3)  UNet output channels
    model.diffusion_model.*attn2.to_k.weight        (C', D)         cross-attention context width D
    model.diffusion_model.*proj_in.weight           2-d / 4-d       linear (SD 2.x) or 1x1-conv proj_in
    model.diffusion_model.label_emb.weight          (N, 4C)         class / noise-level embedding (x4)
    cond_stage_model.transformer.text_model.*                       CLIP ViT-L/14 (SD 1.x)
    cond_stage_model.model.*                                        OpenCLIP ViT-H/14 (SD 2.x)
    cond_stage_model.transformer.token_emb.weight   (V, D)          LDM BERT-style transformer
    cond_stage_model.embedding.weight               (classes, D)    ClassEmbedder (ImageNet)
    cond_stage_model.channel_mapper.weight          (3, 182, 1, 1)  SpatialRescaler (segmentation maps)
    first_stage_model.quant_conv.weight             (2e, 2z, 1, 1)  KL autoencoder, embed_dim e
    first_stage_model.quantize.embedding.weight     (codes, e)      VQ autoencoder, embed_dim e
    first_stage_model.encoder.down.N.*              N + 1 levels    downsampling factor 2**N

Where two released models share every key and shape (SD 2.x 512 / 768-v: only the parameterisation
differs), nothing here can choose: the error names both yamls.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from torch import Tensor

from ldm.errors import UserError
from ldm.interop.compvis import FIRST_STAGE, UNET, describe_unknown, state_summary

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).parent / "configs"
COND = "cond_stage_model."


@dataclass(frozen=True)
class Signature:
    """The facts about a state dict that tell the families apart (None: that part is absent)."""

    unet: tuple[int, int, int] | None  # (input channels, output channels, model_channels)
    context: int | None  # cross-attention context width; None: no cross-attention
    linear_proj: bool | None  # proj_in is a Linear (SD 2.x) rather than a 1x1 conv; None: no attention
    label_emb: tuple[int, ...] | None  # shape of the UNet's class / noise-level embedding
    cond: str | None  # clip | openclip | bert | class | rescaler | first_stage | other; None: no keys
    cond_shape: tuple[int, ...] | None  # shape of the cond key that identifies it (bert/class/rescaler)
    first_stage: tuple[str, int, int] | None  # (kl | vq, downsampling factor, embed_dim)


@dataclass(frozen=True)
class Family:
    """A released model family and the yaml that builds it."""

    name: str
    config: str  # file name in ldm/interop/configs/, or (builtin=False) the original yaml to pass
    expects: Signature  # a field holding a frozenset accepts any of its values
    builtin: bool = True

    @property
    def yaml(self) -> Path | None:
        """The built-in yaml's path (None for families only the original yaml describes)."""
        return CONFIG_DIR / self.config if self.builtin else None

    def matches(self, sig: Signature) -> bool:
        for f in fields(Signature):
            want, got = getattr(self.expects, f.name), getattr(sig, f.name)
            if not (got in want if isinstance(want, frozenset) else got == want):
                return False
        return True


def _family(
    name: str,
    config: str,
    unet: tuple[int, int, int],
    first_stage: tuple[str, int, int],
    *,
    context: int | None = None,
    linear_proj: bool | None = None,
    label_emb: tuple[int, ...] | None = None,
    cond: str | frozenset | None = None,
    cond_shape: tuple[int, ...] | None = None,
    builtin: bool = True,
) -> Family:
    if context is not None and linear_proj is None:
        linear_proj = False  # spatial transformers of SD 1.x / LDM: 1x1-conv proj_in
    expects = Signature(unet, context, linear_proj, label_emb, cond, cond_shape, first_stage)
    return Family(name, config, expects, builtin)


KL8, KL4 = ("kl", 8, 4), ("kl", 4, 4)
VQ4, VQ8 = ("vq", 4, 3), ("vq", 8, 4)
SD2 = {"context": 1024, "linear_proj": True, "cond": "openclip"}
FAMILIES: tuple[Family, ...] = (
    _family("SD 1.x", "sd1.yaml", (4, 4, 320), KL8, context=768, cond="clip"),
    _family("SD 1.x inpainting", "sd1_inpainting.yaml", (9, 4, 320), KL8, context=768, cond="clip"),
    # 2.0/2.1-base (512, epsilon) and 2.0/2.1 (768-v, v-prediction) share every key and shape
    _family(
        "SD 2.x 512 (epsilon: 2.0/2.1-base)", "v2-inference.yaml", (4, 4, 320), KL8, **SD2, builtin=False
    ),
    _family(
        "SD 2.x 768-v (v-prediction: 2.0/2.1 768)",
        "v2-inference-v.yaml",
        (4, 4, 320),
        KL8,
        **SD2,
        builtin=False,
    ),
    _family("SD 2.x inpainting", "sd2_inpainting.yaml", (9, 4, 320), KL8, **SD2),
    _family("SD x4 upscaler", "sd_x4_upscaler.yaml", (7, 4, 256), KL4, **SD2, label_emb=(1000, 1024)),
    _family(
        "LDM txt2img 1.45B (LAION)",
        "ldm_txt2img_1p4b.yaml",
        (4, 4, 320),
        KL8,
        context=1280,
        cond="bert",
        cond_shape=(30522, 1280),
    ),
    _family(
        "LDM text2img256 (Conceptual Captions)",
        "ldm_text2img256.yaml",
        (3, 3, 192),
        VQ4,
        context=640,
        cond="bert",
        cond_shape=(30522, 640),
    ),
    _family(
        "LDM cin256 (ImageNet, VQ-f8)",
        "ldm_cin256.yaml",
        (4, 4, 256),
        VQ8,
        context=512,
        cond="class",
        cond_shape=(1000, 512),
    ),
    _family(
        "LDM cin256-v2 (ImageNet, VQ-f4)",
        "ldm_cin256_v2.yaml",
        (3, 3, 192),
        VQ4,
        context=512,
        cond="class",
        cond_shape=(1001, 512),
    ),
    # celeba256, ffhq256 and lsun_beds256 share every config value that matters for sampling
    _family(
        "LDM unconditional 256 (CelebA-HQ / FFHQ / LSUN-Bedrooms)", "ldm_uncond256_vq4.yaml", (3, 3, 224), VQ4
    ),
    _family("LDM LSUN-Churches 256 (KL-f8)", "ldm_lsun_churches256.yaml", (4, 4, 192), KL8),
    _family("LDM BSR super-resolution", "ldm_bsr_sr.yaml", (6, 3, 160), VQ4),
    _family(
        "LDM semantic synthesis (landscapes 256 / 512)",
        "ldm_semantic_synthesis.yaml",
        (6, 3, 128),
        VQ4,
        cond="rescaler",
        cond_shape=(3, 182, 1, 1),
    ),
    # __is_first_stage__: the original registers the first stage a second time as cond_stage_model
    _family(
        "LDM inpainting (big)",
        "ldm_inpainting_big.yaml",
        (7, 3, 256),
        VQ4,
        cond=frozenset({None, "first_stage"}),
    ),
)


def signature(state: Mapping[str, Tensor]) -> Signature:
    """Read the distinguishing facts off a state dict's names and shapes (no tensor data is touched)."""
    first = state.get(UNET + "input_blocks.0.0.weight")
    last = state.get(UNET + "out.2.weight")
    unet = (
        (int(first.shape[1]), int(last.shape[0]), int(first.shape[0]))
        if first is not None and last is not None
        else None
    )
    context = linear = None
    for key, value in state.items():
        if not key.startswith(UNET):
            continue
        if context is None and key.endswith("attn2.to_k.weight"):
            context = int(value.shape[1])
        if linear is None and key.endswith("proj_in.weight"):
            linear = value.ndim == 2
    label = state.get(UNET + "label_emb.weight")
    cond, cond_shape = _cond_stage(state)
    return Signature(
        unet=unet,
        context=context,
        linear_proj=linear if context is not None else None,
        label_emb=tuple(label.shape) if label is not None else None,
        cond=cond,
        cond_shape=cond_shape,
        first_stage=_first_stage(state),
    )


def _cond_stage(state: Mapping[str, Tensor]) -> tuple[str | None, tuple[int, ...] | None]:
    """(kind, identifying shape) of the cond_stage_model.* keys."""
    keys = [k for k in state if k.startswith(COND)]
    if not keys:
        return None, None
    identifying = {  # kind -> the key whose shape identifies it
        "bert": ("transformer.token_emb.weight", "transformer.token_emb.emb.weight"),
        "class": ("embedding.weight",),
        "rescaler": ("channel_mapper.weight",),
    }
    for kind, names in identifying.items():
        for name in names:
            if COND + name in state:
                return kind, tuple(state[COND + name].shape)
    if any(k.startswith(COND + "transformer.text_model.") for k in keys):
        return "clip", None
    if any(k.startswith(COND + "model.") for k in keys):
        return "openclip", None
    if any(k.startswith((COND + "encoder.", COND + "decoder.", COND + "quantize.")) for k in keys):
        return "first_stage", None
    return "other", None


def _first_stage(state: Mapping[str, Tensor]) -> tuple[str, int, int] | None:
    """(kl | vq, downsampling factor, embed_dim) of the first_stage_model.* keys."""
    levels = {
        int(k[len(FIRST_STAGE + "encoder.down.") :].split(".")[0])
        for k in state
        if k.startswith(FIRST_STAGE + "encoder.down.")
    }
    if not levels:
        return None
    factor = 2 ** max(levels)  # len(ch_mult) levels, one downsampling between each
    codebook = state.get(FIRST_STAGE + "quantize.embedding.weight")
    if codebook is not None:
        return "vq", factor, int(codebook.shape[1])
    quant = state.get(FIRST_STAGE + "quant_conv.weight")
    if quant is not None:
        return "kl", factor, int(quant.shape[0]) // 2  # the moments: mean and log-variance
    return None


def families_of(state: Mapping[str, Tensor]) -> list[Family]:
    """Every family whose signature the state dict has (more than one: the keys cannot tell them apart)."""
    sig = signature(state)
    return [f for f in FAMILIES if f.matches(sig)]


def recognise(state: Mapping[str, Tensor], where: str | os.PathLike = "the checkpoint") -> Path | None:
    """The built-in inference yaml for the family of `state`; None when no family matches.

    Raises `UserError` when several families share its keys and shapes (SD 2.x 512 / 768-v), naming the
    yamls to choose from.
    """
    found = families_of(state)
    if not found:
        return None
    if len(found) > 1 or not found[0].builtin:
        raise UserError(_ambiguous(state, where, found))
    return found[0].yaml


def recognised_family(state: Mapping[str, Tensor], where: str | os.PathLike) -> Family:
    """The family of an original checkpoint without its yaml, or a `UserError` saying why it is unknown."""
    if recognise(state, where) is None:
        raise UserError(f"{describe_unknown(state, where)} {supported()}")
    family = families_of(state)[0]
    log.info("%s: recognised as %s from its keys and shapes; config %s", where, family.name, family.yaml)
    return family


def supported() -> str:
    """One sentence listing the families recognised without a yaml."""
    names = [f.name for f in FAMILIES if f.builtin]
    return f"Recognised without a yaml: {', '.join(names)}."


def _ambiguous(state: Mapping[str, Tensor], where: Any, found: list[Family]) -> str:
    options = " or ".join(f"config={f.config} ({f.name})" for f in found)
    if len(found) == 1:
        return f"{where} ({state_summary(state)}) is {found[0].name}: pass {options}."
    names = ", ".join(f.name for f in found)
    return (
        f"{where} ({state_summary(state)}) fits {names}, which share every key and shape, so its family "
        f"cannot be told from the weights: pass {options} (the original Stability-AI/stablediffusion "
        "configs/stable-diffusion/ yamls)."
    )


def is_original(state: Mapping[str, Tensor]) -> bool:
    """An original LatentDiffusion file (CompVis names + its schedule buffers), not one of our exports."""
    ours = any(k.startswith(("conditioner.", "loss.")) for k in state)
    return any(k.startswith(UNET) for k in state) and "alphas_cumprod" in state and not ours


__all__ = ["FAMILIES", "Family", "Signature", "families_of", "is_original", "recognise", "recognised_family"]
