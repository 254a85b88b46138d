"""LoRA files in the AUTOMATIC1111 / kohya / ComfyUI and the diffusers / peft conventions, both ways.

kohya (sd-scripts `networks.lora`; what AUTOMATIC1111, ComfyUI and diffusers' `load_lora_weights` read):

    lora_unet_<diffusers module path, . -> _>.lora_down.weight   (r, in) | conv (r, in, kh, kw)
    lora_unet_<...>.lora_up.weight                               (out, r) | conv (out, r, 1, 1)
    lora_unet_<...>.alpha                                        0-d: delta W = alpha / r * up @ down
    lora_te_text_model_encoder_layers_0_self_attn_q_proj.*       the CLIP (SD 1.x) / OpenCLIP-as-CLIP (SD 2.x)
    metadata ss_network_module=networks.lora, ss_network_dim, ss_network_alpha, ss_base_model_version, ...

diffusers / peft (`StableDiffusionPipeline.save_lora_weights`):

    unet.<diffusers module path>.lora_A.weight / .lora_B.weight  (peft's down / up, same shapes)
    text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight ...
    metadata lora_adapter_metadata = JSON of the peft LoraConfig per part ("unet.r", "unet.lora_alpha",
    "unet.rank_pattern", "unet.alpha_pattern", "unet.target_modules", "text_encoder.*"): what diffusers 0.42's
    `lora_state_dict(..., return_lora_metadata=True)` hands to `LoraConfig(**metadata)`, so alpha != rank
    survives without folding alpha/r into lora_B.

Reading also takes the older forms: kohya files with CompVis UNet names (`lora_unet_input_blocks_1_1_...`,
early AUTOMATIC1111 era), `lora_te1_` text keys, diffusers' attention-processor files
(`...attn1.processor.to_q_lora.down.weight`), `.lora.down/up` and `.lora_linear_layer.down/up`, and peft
keys with an adapter name (`lora_A.default.weight`). Names are resolved through a table built from the
model's own modules (underscored names are ambiguous otherwise); the UNet's diffusers names come from
`ldm.adapters.unet_names`. A missing alpha means alpha = rank (scale 1). Our side is always the layer paths
of `ldm.adapters.lora` (`unet.input_blocks.1.1.transformer_blocks.0.attn1.to_q`, ...) and `LoraWeights`.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ldm.adapters.lora import ADAPTABLE, LoraWeights, base_layer
from ldm.adapters.unet_names import diffusers_path, num_res_blocks
from ldm.errors import UserError

log = logging.getLogger(__name__)

CONVENTIONS = ("kohya", "diffusers")
TEXT = "conditioner.conditioners.text.transformer."  # our path of the (one) SD text encoder
SD_RES_BLOCKS = 2  # SD 1.x / 2.x; used when save_lora gets no model to read the UNet's structure from
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
SUPPORTED = (
    "supported: LoRA / LoCon in the kohya / AUTOMATIC1111 convention (lora_unet_* / lora_te_*: lora_down, "
    "lora_up, alpha) or the diffusers / peft one (unet.* / text_encoder.*: lora_A / lora_B)"
)
UNSUPPORTED = {  # key fragments of adapters that are not plain LoRA -> what they are
    "hada_": "LyCORIS LoHa",
    "lokr_": "LyCORIS LoKr",
    "lora_mid": "LyCORIS LoCon with a Tucker core (lora_mid)",
    "dora_scale": "DoRA",
    "lora_magnitude_vector": "DoRA",
    "oft_": "OFT",
    ".diff": "a full weight difference (.diff)",
}
# key -> (module name, role): the suffixes of each convention (peft's with an optional adapter name)
KEY_FORMS = (
    (re.compile(r"^(.+)\.lora_down\.weight$"), "down"),
    (re.compile(r"^(.+)\.lora_up\.weight$"), "up"),
    (re.compile(r"^(.+)\.lora_A(?:\.[^.]+)?\.weight$"), "down"),
    (re.compile(r"^(.+)\.lora_B(?:\.[^.]+)?\.weight$"), "up"),
    (re.compile(r"^(.+)\.lora(?:_linear_layer)?\.down\.weight$"), "down"),
    (re.compile(r"^(.+)\.lora(?:_linear_layer)?\.up\.weight$"), "up"),
    (re.compile(r"^(.+)\.alpha$"), "alpha"),
)
PROCESSOR = re.compile(r"^(.+)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")


# -- names ------------------------------------------------------------------------------------------------


def _text_rel(rel: str) -> str:
    """A path inside the CLIP text model without transformers' `text_model.` level (flattened in 5.x)."""
    return rel[len("text_model.") :] if rel.startswith("text_model.") else rel


def file_names(path: str, res_blocks: int = SD_RES_BLOCKS) -> tuple[str, str]:
    """(kohya name, diffusers module key) of our layer `path` (relative to the LatentDiffusion).

    UNet layers get diffusers' module path (`res_blocks`: the UNet's num_res_blocks), or their CompVis path
    where diffusers has no counterpart; the SD text encoder is named as transformers' CLIPTextModel
    (`text_model.encoder.layers.N...`); any other layer keeps our path."""
    if path.startswith("unet."):
        rel = path[len("unet.") :]
        theirs = diffusers_path(rel, res_blocks) or rel
        return "lora_unet_" + theirs.replace(".", "_"), "unet." + theirs
    if path.startswith(TEXT):
        rel = "text_model." + _text_rel(path[len(TEXT) :])
        return "lora_te_" + rel.replace(".", "_"), "text_encoder." + rel
    return "lora_" + path.replace(".", "_"), path


def _plain_modules(model: nn.Module) -> dict[str, nn.Module]:
    """{path: layer} of the adaptable layers of `model` (a peft wrapper's base layer under the plain path)."""
    out = {}
    for name, module in model.named_modules():
        if ".lora_" in name or name.endswith(".base_layer"):
            continue
        layer = base_layer(module)
        if isinstance(layer, ADAPTABLE):
            out[name] = layer
    return out


def name_table(model: nn.Module) -> dict[str, str]:
    """{every name a LoRA file may use for a layer: our path} for a LatentDiffusion `model`.

    Per layer: our path; kohya and diffusers names by diffusers' UNet paths (`file_names`) and by the CompVis
    ones (older AUTOMATIC1111 files); text-encoder names with and without `text_model.`, with `lora_te1_`."""
    unet = getattr(model, "unet", None)
    res_blocks = num_res_blocks(unet) if unet is not None else SD_RES_BLOCKS
    table: dict[str, str] = {}
    for path in _plain_modules(model):
        kohya, dotted = file_names(path, res_blocks)
        names = {path, kohya, dotted}
        if path.startswith("unet."):  # CompVis-named kohya keys; diffusers' prefix-less attn-procs files
            names |= {"lora_unet_" + path[len("unet.") :].replace(".", "_"), dotted[len("unet.") :]}
        elif path.startswith(TEXT):
            rel = _text_rel(path[len(TEXT) :])
            names |= {"text_encoder." + rel, "lora_te1_text_model_" + rel.replace(".", "_")}
        for name in names:
            table.setdefault(name, path)
    return table


# -- saving -----------------------------------------------------------------------------------------------


def _model_facts(model: nn.Module | None, adapters: Mapping[str, LoraWeights]) -> tuple[int, str]:
    """(num_res_blocks, kohya ss_base_model_version) of the base: read off `model`, else SD's defaults."""
    if model is None:
        widths = {
            int(w.down[0].numel()) for p, w in adapters.items() if p.endswith(("attn2.to_k", "attn2.to_v"))
        }
        version = "sd_v2" if widths == {1024} else "sd_v1" if widths == {768} else "ldm"
        return SD_RES_BLOCKS, version
    unet = getattr(model, "unet", model)
    conditioners = getattr(getattr(model, "conditioner", None), "conditioners", {})
    text = conditioners["text"] if "text" in conditioners else None
    act = getattr(getattr(getattr(text, "transformer", None), "config", None), "hidden_act", None)
    version = (
        {"quick_gelu": "sd_v1", "gelu": "sd_v2"}.get(str(act), "ldm")
        if getattr(text, "is_clip", 0)
        else "ldm"
    )
    return num_res_blocks(unet), version


def _common(values: list[Any]) -> Any:
    return collections.Counter(values).most_common(1)[0][0] if values else None


def _metadata(metadata: Mapping[str, Any] | None, adapters: Mapping[str, LoraWeights], version: str) -> dict:
    """kohya's ss_* keys and ours (ldm_*) as safetensors' str -> str metadata."""
    metadata = dict(metadata or {})
    ranks = [w.rank for w in adapters.values()]
    alphas = [float(w.alpha) for w in adapters.values()]
    convs = [w for w in adapters.values() if w.down.ndim == 4 and tuple(w.down.shape[2:]) != (1, 1)]
    base = metadata.get("base") if isinstance(metadata.get("base"), Mapping) else {}
    base_name = str(metadata.get("base_model") or Path(str(base.get("path", ""))).name)
    identity = metadata.get("weights_identity") or metadata.get("base_identity") or base.get("unet_identity")
    out = {
        "format": "pt",
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(_common(ranks)),
        "ss_network_alpha": str(float(_common(alphas))),  # as kohya writes its float argument: "8.0"
        "ss_base_model_version": str(metadata.get("base_model_version") or version),
        "ss_v2": str(str(metadata.get("base_model_version") or version) == "sd_v2"),
        "ss_sd_model_name": base_name,
        "ldm_base_model": base_name,
        "ldm_base_identity": str(identity or ""),
        "ldm_metadata": json.dumps(metadata, sort_keys=True, default=str),
    }
    if convs:
        conv_dim, conv_alpha = _common([w.rank for w in convs]), _common([float(w.alpha) for w in convs])
        out["ss_network_args"] = json.dumps({"conv_dim": str(conv_dim), "conv_alpha": f"{conv_alpha:g}"})
    return out


def _peft_config(named: Mapping[str, LoraWeights]) -> dict:
    """The LoraConfig kwargs of one diffusers part ({module name: weights}): most common rank / alpha, the
    others as exact-name patterns (peft matches `(.*\\.)?name$`)."""
    r = _common([w.rank for w in named.values()])
    alpha = _common([float(w.alpha) for w in named.values()])
    return {
        "r": int(r),
        "lora_alpha": float(alpha),
        "rank_pattern": {n: w.rank for n, w in named.items() if w.rank != r},
        "alpha_pattern": {n: float(w.alpha) for n, w in named.items() if float(w.alpha) != alpha},
        "target_modules": sorted(named),
        "use_dora": False,
        "lora_bias": False,
    }


def save_lora(
    path: str | os.PathLike,
    adapters: Mapping[str, LoraWeights],
    *,
    convention: str = "kohya",
    metadata: Mapping[str, Any] | None = None,
    model: nn.Module | None = None,
) -> Path:
    """Write `adapters` ({our layer path: LoraWeights}) as one `.safetensors` LoRA file, atomically.

    convention: "kohya" (AUTOMATIC1111 / ComfyUI / kohya sd-scripts) or "diffusers" (peft lora_A / lora_B,
    `pipe.load_lora_weights`); see the module docstring for the keys. Tensors are written as given (linear
    layers 2-D, convolutions 4-D: 1x1 (r, in, 1, 1) / (out, r, 1, 1), LoCon 3x3 (r, in, 3, 3) /
    (out, r, 1, 1)).
    metadata: the caller's record (base_model: the base file's name, weights_identity or base.unet_identity:
    the base weights' identity, base_model_version to override; the rest is kept as JSON under
    `ldm_metadata`). model: the base LatentDiffusion (or its UNet): its UNet structure gives the diffusers
    block indices and its text encoder the kohya ss_base_model_version; without it SD 1.x/2.x's
    num_res_blocks=2 is assumed. Raises UserError for an unknown convention or no adapters."""
    from ldm.interop.checkpoint import atomic_path

    if convention not in CONVENTIONS:
        raise UserError(f"convention={convention!r}: one of {', '.join(CONVENTIONS)}.")
    if not adapters:
        raise UserError(f"{path}: no LoRA layers to save (the adapter dict is empty).")
    res_blocks, version = _model_facts(model, adapters)
    meta = _metadata(metadata, adapters, version)
    tensors: dict[str, Tensor] = {}
    parts: dict[str, dict[str, LoraWeights]] = {}
    for our_path, weights in adapters.items():
        kohya, dotted = file_names(our_path, res_blocks)
        down, up = weights.down.detach().cpu().contiguous(), weights.up.detach().cpu().contiguous()
        if convention == "kohya":
            tensors[f"{kohya}.lora_down.weight"] = down
            tensors[f"{kohya}.lora_up.weight"] = up
            tensors[f"{kohya}.alpha"] = torch.tensor(float(weights.alpha), dtype=torch.float32)
        else:
            tensors[f"{dotted}.lora_A.weight"] = down
            tensors[f"{dotted}.lora_B.weight"] = up
            prefix, _, module = dotted.partition(".")
            if prefix == "text_encoder":  # transformers 5 flattens CLIPTextModel: match with or without it
                module = _text_rel(module)
            parts.setdefault(prefix, {})[module] = weights
    if convention == "diffusers":
        packed = {f"{p}.{k}": v for p, named in parts.items() for k, v in _peft_config(named).items()}
        meta[DIFFUSERS_METADATA_KEY] = json.dumps(packed, indent=2, sort_keys=True)
    from safetensors.torch import save_file

    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    log.info("wrote %d LoRA layers (%s convention) to %s", len(adapters), convention, path)
    return path


# -- loading ----------------------------------------------------------------------------------------------


def read_lora_tensors(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors, metadata) of a LoRA file: safetensors, else a `.pt`/`.ckpt` pickle `torch.load` reads with
    `weights_only=True` (never unpickles code). Raises UserError for a missing or unreadable file."""
    from safetensors import SafetensorError, safe_open

    from ldm.interop.checkpoint import _file_kind, load_checkpoint_file

    path = Path(path)
    if not path.is_file():
        what = "a folder" if path.is_dir() else "no such file"
        raise UserError(f"LoRA file {path}: {what}; pass a LoRA .safetensors file.")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        if path.suffix == ".safetensors" or _file_kind(path) not in ("zip", "pickle"):
            raise UserError(
                f"{path} is not a safetensors file ({str(e).splitlines()[0][:120]}); is it truncated? A LoRA "
                "is a .safetensors file (or a .pt that torch.load(weights_only=True) can read)."
            ) from None
    data = load_checkpoint_file(path, "LoRA file")  # weights_only=True; UserError for code-holding pickles
    state = data.get("state_dict", data) if isinstance(data, dict) else None
    if not isinstance(state, dict):
        raise UserError(f"{path} holds a {type(data).__name__}, not a dict of LoRA tensors.")
    return {k: v for k, v in state.items() if isinstance(v, Tensor)}, {}


def _unsupported(key: str) -> str | None:
    """What a non-LoRA adapter key belongs to (LoHa, LoKr, DoRA, ...), or None."""
    for segment in key.split("."):
        if segment in ("diff", "diff_b"):
            return UNSUPPORTED[".diff"]
        for fragment, what in UNSUPPORTED.items():
            if segment.startswith(fragment):
                return what
    return None


def _parse_key(key: str) -> tuple[str, str] | None:
    """(module name as the file spells it, down | up | alpha) of a LoRA key, None for any other key."""
    m = PROCESSOR.match(key)
    if m:  # diffusers' attention processors: attn1.processor.to_out_lora.down.weight
        return f"{m[1]}.{'to_out.0' if m[2] == 'to_out' else m[2]}", m[3]
    for pattern, role in KEY_FORMS:
        m = pattern.match(key)
        if m:
            return m[1].removeprefix("base_model.model."), role
    return None


def _group(tensors: Mapping[str, Tensor], path: Path) -> dict[str, dict[str, tuple[str, Tensor]]]:
    """{module name in the file: {role: (key, tensor)}}; UserError for a non-LoRA file or key."""
    groups: dict[str, dict[str, tuple[str, Tensor]]] = {}
    unknown = []
    for key in sorted(tensors):
        what = _unsupported(key)
        if what is not None:
            raise UserError(f"{path}: key {key} is {what}, which is not supported; {SUPPORTED}.")
        parsed = _parse_key(key)
        if parsed is None:
            unknown.append(key)
            continue
        name, role = parsed
        if role in groups.setdefault(name, {}):
            raise UserError(
                f"{path}: {key} and {groups[name][role][0]} are both the {role} weight of {name} (several "
                "adapters in one file?); save one adapter per file."
            )
        groups[name][role] = (key, tensors[key])
    if not any("down" in g or "up" in g for g in groups.values()):
        first = unknown[0] if unknown else "(no tensors)"
        full = any(
            k.startswith(("model.diffusion_model.", "first_stage_model.", "unet.", "cond_stage"))
            for k in unknown
        )
        kind = "a full model checkpoint" if full else "not a LoRA file"
        raise UserError(
            f"{path} is {kind} ({len(tensors)} tensors, first key {first}), not a LoRA; {SUPPORTED}. A full "
            "checkpoint loads as a base model (load_model / base_model=), not as a LoRA."
        )
    if unknown:
        raise UserError(f"{path}: key {unknown[0]} is not a LoRA weight; {SUPPORTED}.")
    return groups


def _metadata_alpha(meta: Mapping[str, Any] | None, name: str, rank: int) -> float | None:
    """alpha of module `name` (as the file spells it) from diffusers' lora_adapter_metadata (peft config)."""
    prefix, _, module = name.partition(".")
    if not meta or f"{prefix}.lora_alpha" not in meta:
        return None
    if prefix == "text_encoder":
        module = _text_rel(module)
    alpha = float(meta[f"{prefix}.lora_alpha"])
    for pattern, value in (meta.get(f"{prefix}.alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            alpha = float(value)
            break
    if meta.get(f"{prefix}.use_rslora"):  # scale alpha / sqrt(r) == (alpha * sqrt(r)) / r
        alpha *= rank**0.5
    return alpha


def _fit(
    path: Path, key: str, ours: str, layer: nn.Module, down: Tensor, up: Tensor, alpha: float
) -> LoraWeights:
    """Reshape down / up to what a peft LoRA on `layer` holds (2-D for Linear, 4-D for Conv2d)."""
    shape = tuple(layer.weight.shape)
    rank = int(down.shape[0]) if down.ndim else 0
    fits = (
        rank > 0
        and down.numel() == rank * int(torch.Size(shape[1:]).numel())
        and up.ndim >= 2
        and up.shape[0] == shape[0]
        and up.numel() == shape[0] * rank
    )
    if not fits:
        raise UserError(
            f"{path}: {key} has down {tuple(down.shape)} / up {tuple(up.shape)}, which do not fit the layer "
            f"{ours} {shape} of this model: is the LoRA for another base model (e.g. SDXL, another width)?"
        )
    tail = (1,) * (len(shape) - 2)
    return LoraWeights(down.reshape(rank, *shape[1:]), up.reshape(shape[0], rank, *tail), float(alpha))


def load_lora(path: str | os.PathLike, model: nn.Module) -> dict[str, LoraWeights]:
    """Read a LoRA file for `model` (a LatentDiffusion): {our layer path: LoraWeights}, ready for
    `ldm.adapters.lora.merge_lora`.

    Reads the kohya / AUTOMATIC1111 and diffusers / peft conventions and their older forms (see the module
    docstring); alpha from the file's `.alpha` keys or diffusers' lora_adapter_metadata, else alpha = rank.
    Tensors keep their dtype; down/up are reshaped to the target layer (2-D linear, 4-D conv). Raises one
    UserError naming the file, the first offending key and what is supported for: a file that is not
    safetensors (nor a weights-only pickle), a full checkpoint, LyCORIS LoHa/LoKr, DoRA and other non-LoRA
    keys, a layer this model does not have (a LoRA for SDXL or another base) or a shape that does not fit."""
    path = Path(path)
    tensors, file_meta = read_lora_tensors(path)
    groups = _group(tensors, path)
    meta = None
    if file_meta.get(DIFFUSERS_METADATA_KEY):
        try:
            meta = json.loads(file_meta[DIFFUSERS_METADATA_KEY])
        except json.JSONDecodeError:
            log.warning("%s: unreadable %s metadata; alpha = rank", path, DIFFUSERS_METADATA_KEY)
    table = name_table(model)
    layers = _plain_modules(model)
    out: dict[str, LoraWeights] = {}
    for name, roles in groups.items():
        first_key = next(iter(roles.values()))[0]
        ours = table.get(name)
        if ours is None:
            raise UserError(
                f"{path}: {first_key} names no layer of this model (is the LoRA for another base model, e.g. "
                f"SDXL with lora_te2_ / input_blocks_4_1_transformer_blocks_1?); {SUPPORTED}."
            )
        if "down" not in roles or "up" not in roles:
            missing = "up" if "down" in roles else "down"
            raise UserError(f"{path}: {first_key} has no matching {missing} weight; the file is incomplete.")
        down, up = roles["down"][1], roles["up"][1]
        rank = int(down.shape[0]) if down.ndim else 0
        if "alpha" in roles:
            alpha = float(roles["alpha"][1].float().reshape(-1)[0])
        else:
            alpha = _metadata_alpha(meta, name, rank)
            alpha = float(rank) if alpha is None else alpha
        if ours in out:
            raise UserError(f"{path}: {first_key} adapts {ours} a second time (two names for one layer).")
        out[ours] = _fit(path, roles["down"][0], ours, layers[ours], down, up, alpha)
    log.info("read %d LoRA layers from %s", len(out), path)
    return out


__all__ = ["file_names", "load_lora", "name_table", "read_lora_tensors", "save_lora"]
