"""Export a model back to the original CompVis / Stability layout (one `.safetensors`), or to diffusers.

    python -m ldm.interop.export <run folder | .ckpt | model.safetensors> OUT.safetensors
        [--dtype fp32|fp16|bf16] [--ema-only | --no-ema] [--config <yaml>] [--text-encoder <folder>]
    python -m ldm.interop.export <source> OUT_DIR --format diffusers

The original layout is what the released files hold, so AUTOMATIC1111, ComfyUI, diffusers' single-file loader
and `load_model` read an export as they read the released file:

    model.diffusion_model.*        UNet (raw weights; with --ema-only the EMA weights, as *-emaonly files)
    model_ema.<name without dots>  LitEma shadows of the UNet + model_ema.decay / num_updates (not --ema-only)
    first_stage_model.*            autoencoder;  scale_factor: the latent scale (float32)
    betas, alphas_cumprod, ...     the schedule buffers the original `register_schedule` makes (float32)
    cond_stage_model.*             conditioner by its family's exporter (`@cond_export` beside each builder):
                                   CLIP transformer.text_model.* (SD 1.x), OpenCLIP model.* (SD 2.x),
                                   BERT transformer.*, ClassEmbedder embedding.weight,
                                   SpatialRescaler channel_mapper.*

A model no original family describes (e.g. our MiniLM `FrozenTextEncoder`) has no original layout: the CLI
says so and writes our own export layout (`LatentDiffusion.export_state_dict` + the run config) instead.
Beside OUT.safetensors the original inference yaml is written as OUT.yaml (the name AUTOMATIC1111 looks for).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ldm.errors import UserError
from ldm.interop import compvis, registry
from ldm.interop.checkpoint import atomic_path, load_state_dict, save_safetensors
from ldm.models.latent_diffusion import LatentDiffusion

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SCHEDULE_KEYS = (  # LatentDiffusion.register_schedule, in its order
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
)
KEEP_FP32 = ("scale_factor", "model_ema.decay", "model_ema.num_updates")  # + every schedule buffer


class NoOriginalLayout(UserError):
    """The model has a part (e.g. a MiniLM text encoder) that no original checkpoint family describes."""


def schedule_buffers(
    alphas_cumprod: Tensor, betas: Tensor | None = None, posterior: bool = True, v_posterior: float = 0.0
) -> dict:
    """The original `register_schedule` buffers (float32, each (T,)) from alphas_cumprod (T,).

    Computed in float64 as the original does with numpy, from the float64 `betas` (T,) when given (a source
    file's own, or rebuilt from the run's schedule config) and they give the same float32 alphas_cumprod;
    else betas are recovered as 1 - a_t / a_{t-1} (about 1e-3 relative error for the smallest betas).
    `posterior=False` gives the 8 buffers of the x4 upscaler's `low_scale_model` (no posterior terms).
    """
    ac = alphas_cumprod.detach().double().cpu()
    prev = torch.cat([ac.new_ones(1), ac[:-1]])
    from_ac = 1.0 - ac / prev
    betas = betas if betas is not None else named_betas(from_ac)
    if betas is not None and betas.shape == ac.shape:
        exact = torch.cumprod(1.0 - betas.detach().double().cpu(), 0)
        if torch.allclose(exact.float(), alphas_cumprod.detach().float().cpu(), rtol=1e-6, atol=1e-7):
            ac, from_ac = exact, betas.detach().double().cpu()
            prev = torch.cat([ac.new_ones(1), ac[:-1]])
    betas = from_ac
    alphas = 1.0 - betas
    out = {
        "betas": betas,
        "alphas_cumprod": ac,
        "alphas_cumprod_prev": prev,
        "sqrt_alphas_cumprod": ac.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1.0 - ac).sqrt(),
        "log_one_minus_alphas_cumprod": (1.0 - ac).log(),
        "sqrt_recip_alphas_cumprod": (1.0 / ac).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1.0 / ac - 1).sqrt(),
    }
    if posterior:
        var = (1 - v_posterior) * betas * (1.0 - prev) / (1.0 - ac) + v_posterior * betas
        out["posterior_variance"] = var
        out["posterior_log_variance_clipped"] = var.clamp(min=1e-20).log()
        out["posterior_mean_coef1"] = betas * prev.sqrt() / (1.0 - ac)
        out["posterior_mean_coef2"] = (1.0 - prev) * alphas.sqrt() / (1.0 - ac)
    return {k: v.float() for k, v in out.items()}


def named_betas(approx: Tensor) -> Tensor | None:
    """The float64 betas of a linear / scaled_linear schedule whose ends, rounded to 3 significant digits,
    are those of `approx` (T,) (betas recovered from float32 alphas_cumprod); None when neither fits."""
    from ldm.diffusion import schedules

    def rounded(x: float) -> float:
        return float(f"{x:.3g}")

    start, end = rounded(float(approx[0])), rounded(float(approx[-1]))
    if not (0 < start < end < 1):
        return None
    for make in (schedules.scaled_linear_betas, schedules.linear_betas):
        betas = make(len(approx), start, end)
        if torch.allclose(betas, approx, rtol=1e-2, atol=0):
            return betas  # schedule_buffers still checks it against alphas_cumprod
    return None


def conditioner_state(model: LatentDiffusion) -> dict[str, Tensor]:
    """Every conditioner's tensors under the original names (`cond_stage_model.*`, `low_scale_model.*`).

    Raises NoOriginalLayout naming the conditioner no registered exporter writes."""
    registry.load_families()
    out: dict[str, Tensor] = {}
    for name, conditioner in model.conditioner.conditioners.items():
        kind = type(conditioner).__name__
        exported = None
        for exporter in registry.COND_EXPORT.get(kind, []):
            exported = exporter(conditioner, model)
            if exported is not None:
                break
        if exported is None:
            what = getattr(conditioner, "model_name", kind)
            raise NoOriginalLayout(
                f"conditioner '{name}' ({kind}: {what}) has no original CompVis/Stability counterpart (only "
                "CLIP (SD 1.x), OpenCLIP (SD 2.x), LDM BERT, ClassEmbedder, SpatialRescaler and the spatial "
                "conditioners have one), so the model cannot be written in the original layout."
            )
        out.update(exported)
    return out


def original_state(
    model: LatentDiffusion,
    ema: Mapping[str, Tensor] | None = None,  # EMA weights by our parameter names (unet.*, conditioner.*)
    *,
    ema_only: bool = False,  # EMA weights in place of the raw ones, no model_ema.* (the *-emaonly files)
    ema_updates: int = 0,  # model_ema.num_updates to record
    ema_decay: float = 0.9999,  # model_ema.decay to record
    betas: Tensor | None = None,  # the schedule's float64 betas (T,), for exact schedule buffers
) -> dict[str, Tensor]:
    """The whole model as the original LatentDiffusion's `state_dict()` (float32 unless the model is not).

    Raises NoOriginalLayout for a part the original code does not have (see `conditioner_state`; a UNet with
    our `pooled_context` option)."""
    if getattr(model.unet, "pooled_context", False):
        raise NoOriginalLayout(
            "the UNet uses pooled_context (a pooled text embedding added to the time embedding), which the "
            "original UNetModel does not have, so the model cannot be written in the original layout."
        )
    if model.residual_over is not None or model.first_stage.exact:
        raise NoOriginalLayout(
            "the model diffuses the residual over a bicubic upscale in pixel space (residual_over / a "
            "SpaceToDepth first stage), which the original LatentDiffusion does not have."
        )
    state = dict(model.state_dict())
    if ema_only and ema:
        state.update({k: v.to(state[k].dtype) for k, v in ema.items() if k in state})
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if key.startswith("unet."):
            out[compvis.UNET + key[len("unet.") :]] = value
        elif key.startswith("first_stage.autoencoder."):
            out[compvis.FIRST_STAGE + key[len("first_stage.autoencoder.") :]] = value
    out["scale_factor"] = model.first_stage.scale_factor.detach().float().reshape(())
    out.update(schedule_buffers(model.schedule.alphas_cumprod, betas))
    swapped = with_conditioner_ema(model, ema if ema_only else None)
    try:
        out.update({k: v.detach().clone() for k, v in conditioner_state(model).items()})  # before undo
    finally:
        swapped()
    if ema and not ema_only:
        unet_ema = {k[len("unet.") :]: v for k, v in ema.items() if k.startswith("unet.")}
        missing = [n for n, _ in model.unet.named_parameters() if n not in unet_ema]
        if missing:
            raise UserError(f"the EMA weights miss {len(missing)} UNet parameters (e.g. {missing[0]}).")
        out.update({compvis.ema_key(n): v.float() for n, v in unet_ema.items()})
        out["model_ema.decay"] = torch.tensor(float(ema_decay), dtype=torch.float32)
        out["model_ema.num_updates"] = torch.tensor(int(ema_updates), dtype=torch.int32)
    return {k: (v.detach() if v.is_meta else v.detach().cpu()).contiguous() for k, v in out.items()}


def with_conditioner_ema(model: LatentDiffusion, ema: Mapping[str, Tensor] | None):
    """Put EMA weights of conditioners (a trainable text encoder) in place; returns the undo function."""
    params = dict(model.named_parameters())
    chosen = {k: v for k, v in (ema or {}).items() if k.startswith("conditioner.") and k in params}
    saved = {k: params[k].detach().clone() for k in chosen}
    with torch.no_grad():
        for k, v in chosen.items():
            params[k].copy_(v.to(params[k].dtype))

    def undo() -> None:
        with torch.no_grad():
            for k, v in saved.items():
                params[k].copy_(v)

    return undo


def cast_state(state: Mapping[str, Tensor], dtype: str) -> dict[str, Tensor]:
    """Floating weights to fp32 / fp16 / bf16; schedule buffers, scale_factor and EMA counters stay float32
    (the loaders compare alphas_cumprod with the yaml's schedule)."""
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype}: not one of {', '.join(DTYPES)}.")
    keep = (*KEEP_FP32, *SCHEDULE_KEYS)
    out = {}
    for k, v in state.items():
        fixed = k in keep or k.startswith("low_scale_model.") or not v.is_floating_point()
        out[k] = v if fixed else v.to(DTYPES[dtype])
    return out


# -- sources ---------------------------------------------------------------------------------------------


@dataclass
class Source:
    """A model to export: raw weights in `model`, EMA weights (our parameter names) when the file has them."""

    model: LatentDiffusion
    ema: dict[str, Tensor] | None
    path: Path
    format: str  # lightning | export | compvis
    run_config: dict | None  # train.py runs
    yaml: Path | None  # the original inference yaml (compvis sources)
    ema_updates: int = 0
    ema_decay: float = 0.9999
    betas: Tensor | None = None  # float64 (T,): the file's own or rebuilt from the run's schedule config
    original_config: dict | None = None  # the original yaml as a dict (diffusers folders: read off it)


def resolve_source(path: str | os.PathLike) -> Path:
    """A run folder -> its checkpoints/last.ckpt (raw + EMA weights), else its model.safetensors."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file or folder; pass a run folder, a .ckpt or a .safetensors file.")
    if path.is_dir() and (path / "model_index.json").is_file():
        return path  # a diffusers folder: load_model reads it
    if path.is_dir():
        for candidate in (path / "checkpoints" / "last.ckpt", path / "model.safetensors"):
            if candidate.is_file():
                return candidate
        raise UserError(
            f"{path} is a folder without checkpoints/last.ckpt or model.safetensors (a run folder?)."
        )
    return path


def load_source(
    path: str | os.PathLike, config: str | os.PathLike | None = None, text_encoder: str | None = None
) -> Source:
    """Load raw weights and, separately, the EMA weights the file holds (LitEma / our EMA buffers)."""
    from ldm.interop.load import load_model

    path = resolve_source(path)
    loaded = load_model(path, config=config, use_ema=False, text_encoder=text_encoder)
    model = loaded.model
    state, _ = load_state_dict(path) if loaded.format != "diffusers" else ({}, None)
    ema: dict[str, Tensor] | None = None
    updates, decay = 0, 0.9999
    if loaded.format == "compvis":
        names = [n for n, _ in model.unet.named_parameters()]
        found = compvis.find_ema(state, names)
        ema = {"unet." + n: v for n, v in found.items()} if len(found) == len(names) else None
        updates = int(state["model_ema.num_updates"]) if "model_ema.num_updates" in state else 0
        decay = float(state["model_ema.decay"]) if "model_ema.decay" in state else decay
    elif loaded.format == "lightning":
        buffers = {k[len("ema.") :]: v for k, v in state.items() if k.startswith("ema.")}
        params = [n for n, _ in model.named_parameters()]
        ema = {n: buffers[n.replace(".", "")] for n in params if n.replace(".", "") in buffers} or None
        updates = int(buffers.get("num_updates", torch.tensor(0)))
        decay = float(buffers.get("decay", torch.tensor(decay)))
    yaml = None
    if loaded.format == "compvis":
        yaml = Path(config) if config is not None else Path(str((loaded.config or {}).get("config", "")))
        yaml = yaml if yaml.is_file() else None
    if loaded.format == "diffusers":  # one set of weights; the yaml read off its configs
        original = (loaded.config or {}).get("original_config")
        return Source(model, None, path, loaded.format, None, None, original_config=original)
    run_config = loaded.config if loaded.format != "compvis" else None
    betas = state.get("betas") if loaded.format == "compvis" else run_betas(run_config)
    return Source(model, ema, path, loaded.format, run_config, yaml, updates, decay, betas)


def run_betas(run_config: dict | None) -> Tensor | None:
    """float64 betas of a run's `model.loss.schedule` config (None when not a plain named schedule)."""
    from ldm.diffusion import schedules

    cfg = (((run_config or {}).get("model") or {}).get("loss") or {}).get("schedule") or {}
    if not isinstance(cfg, dict) or cfg.get("zero_terminal_snr"):
        return None
    kind, steps = cfg.get("kind", "scaled_linear"), int(cfg.get("num_timesteps", 1000))
    start, end = float(cfg.get("beta_start", 0.00085)), float(cfg.get("beta_end", 0.012))
    if kind == "linear":
        return schedules.linear_betas(steps, start, end)
    if kind == "scaled_linear":
        return schedules.scaled_linear_betas(steps, start, end)
    return None


def export_original(
    source: Source, out: str | os.PathLike, *, dtype: str = "fp32", ema: str = "both"
) -> tuple[Path, bool]:
    """Write `out` in the original layout (+ `out`.yaml); returns (path, whether that layout was used).

    `ema`: both (raw UNet + model_ema.*), only (EMA weights as the UNet), none (raw only). A source without
    EMA weights (an export holds only EMA weights, in place) writes what it has."""
    out = Path(out)
    if ema not in ("both", "only", "none"):
        raise UserError(f"ema={ema!r}: one of both, only, none.")
    weights = source.ema if ema != "none" else None
    if ema != "none" and not source.ema:
        log.info("%s holds one set of UNet weights (%s): exporting them", source.path, source.format)
    try:
        state = original_state(
            source.model,
            weights,
            ema_only=ema == "only",
            ema_updates=source.ema_updates,
            ema_decay=source.ema_decay,
            betas=source.betas,
        )
    except NoOriginalLayout as e:
        log.warning("%s Writing our own export layout to %s instead (load it with ldm's load_model).", e, out)
        ours = source.model.state_dict()
        if weights and ema != "none":
            ours.update({k: v.to(ours[k].dtype) for k, v in weights.items() if k in ours})
        state = cast_state(source.model.export_state_dict(ours), dtype)
        save_safetensors(state, out, source.run_config)
        return out, False
    save_original(state, out, dtype, original_yaml_text(source))
    return out, True


def save_original(state: Mapping[str, Tensor], out: Path, dtype: str, yaml: str | None) -> Path:
    """Write an original-layout state atomically (no run config in the metadata: it loads like a released
    file), and its inference yaml beside it as OUT.yaml when known."""
    save_safetensors(cast_state(state, dtype), out, None)
    if yaml is not None:
        with atomic_path(out.with_suffix(".yaml")) as tmp:
            tmp.write_text(yaml)
    log.info("exported %d tensors in the original layout to %s", len(state), out)
    return out


def original_yaml_text(source: Source) -> str | None:
    """The original inference yaml for the export: the source's own, or one written for a train.py run."""
    if source.yaml is not None:
        return source.yaml.read_text()
    if source.original_config is not None:
        from omegaconf import OmegaConf

        return OmegaConf.to_yaml(OmegaConf.create(source.original_config))
    return run_yaml_text(source.run_config, source.model)


def run_yaml_text(run_config: dict | None, model: LatentDiffusion) -> str | None:
    """An original inference yaml for a train.py run (SD-shaped: KL first stage + one CLIP text encoder)."""
    if run_config is None:
        return None
    from omegaconf import OmegaConf

    from ldm.interop.diffusers_io import original_config_of_run

    try:
        return OmegaConf.to_yaml(OmegaConf.create(original_config_of_run(run_config, model)))
    except UserError as e:
        log.warning("no original yaml written beside the export: %s", e)
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ldm.interop.export", description=__doc__.split("\n")[0])
    parser.add_argument("source", help="run folder, Lightning .ckpt, model.safetensors or an original file")
    parser.add_argument("out", help="OUT.safetensors (original layout) or OUT_DIR (--format diffusers)")
    parser.add_argument("--format", choices=("original", "diffusers"), default="original")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--ema-only", action="store_true", help="EMA weights as the UNet, no model_ema.*")
    group.add_argument("--no-ema", action="store_true", help="raw weights only")
    parser.add_argument("--config", default=None, help="original inference yaml of the source (if needed)")
    parser.add_argument("--text-encoder", default=None, help="tokenizer folder the source needs (CLIP)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        out = Path(args.out)
        if args.format == "original" and out.suffix != ".safetensors":
            raise UserError(f"OUT={out}: the original layout is one file; name it *.safetensors.")
        if args.format == "diffusers" and out.suffix:
            raise UserError(f"OUT={out}: --format diffusers writes a folder; pass a folder name.")
        source = load_source(args.source, args.config, args.text_encoder)
        ema = "only" if args.ema_only else "none" if args.no_ema else "both"
        if args.format == "original":
            export_original(source, out, dtype=args.dtype, ema=ema)
        else:
            from ldm.interop.diffusers_io import export_diffusers

            export_diffusers(source, out, dtype=args.dtype, ema=ema if ema != "both" else "only")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = [
    "NoOriginalLayout",
    "Source",
    "cast_state",
    "conditioner_state",
    "export_original",
    "load_source",
    "original_state",
    "schedule_buffers",
]
