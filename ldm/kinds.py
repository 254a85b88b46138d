"""What kind of model a run config describes, in words for messages (no torch: config checks use it)."""

from __future__ import annotations

CONDITIONING_KINDS = {  # conditioner class -> what a stage-2 model with it is
    "FrozenTextEncoder": "text-to-image",
    "BERTEmbedder": "text-to-image",
    "ClassEmbedder": "class-conditional",
    "InpaintingConditioner": "inpainting",
    "SuperResConditioner": "super-resolution",
    "SemanticMapConditioner": "semantic-synthesis",
}


def stage2_kind(config: dict) -> str:
    """'a text-to-image model (experiment txt2img)' for a stage-2 run config, for messages."""
    entries = (((config.get("model") or {}).get("conditioner") or {}).get("conditioners")) or {}
    targets = [str((e or {}).get("_target_", "")).rsplit(".", 1)[-1] for e in entries.values()]
    kinds = list(dict.fromkeys(CONDITIONING_KINDS[t] for t in targets if t in CONDITIONING_KINDS))
    name = config.get("name")
    return f"a {'/'.join(kinds) or 'unconditional'} model" + (f" (experiment {name})" if name else "")


def stage2_as_first_stage(config: dict) -> str:
    """What to say of a stage-2 file passed where an autoencoder goes (first_stage_ckpt)."""
    ae_path = (((config.get("model") or {}).get("first_stage")) or {}).get("path")
    return (
        f"is {stage2_kind(config)}, a stage-2 diffusion model, not an autoencoder: pass the "
        f"autoencoder it was trained on{f' ({ae_path})' if ae_path else ''} as first_stage_ckpt, or "
        "sample from it with sample.py."
    )
