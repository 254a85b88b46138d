"""Encode a shard set once with a frozen autoencoder and write latent shards for stage 2.

    python -m ldm.data.cache_latents --ckpt outputs/autoencoder_kl/latest/model.safetensors \
        --shards 'data/shards/shapes/train-*.tar' --out data/shards/shapes_latents --prefix train \
        [--mode dist|sample] [--dtype float16|bfloat16|float32] [--text-encoder default|<folder>]
    python -m ldm.data.cache_latents --base-model <SD/LDM file> [--base-config <yaml>] \
        [--base-tokenizer <CLIP tokenizer folder>] [--text-encoder base] --shards ... --out ...

With --base-model (fine-tuning, experiment=finetune) the base file's own autoencoder encodes the images and
`--text-encoder base` its own text encoder the captions; the manifest records that autoencoder's identity,
which the fine-tune run checks as stage 2 does.

Each output sample keeps the input's key and its caption/label/metadata members, and holds the
*unscaled* latents: `latent_mean` + `latent_logvar` (mode dist, KL autoencoders: stage 2 draws a fresh
posterior sample every step) or `latent` (mode sample, or a VQ model's pre-quantisation latent), as
`.npy` (float16/float32) or `.pth` tensors (bfloat16, read back with weights_only=True). A segmap is
stored centre-cropped like the image. With --buckets (aspect-ratio buckets, ldm.data.buckets) each image is
centre-cropped to its own bucket instead of a square, so latents differ in shape from sample to sample; train
on them with `data.buckets.enabled=true` (batches then group by latent shape). `manifest.json` records the
autoencoder's identity (`ldm.models.first_stage.weights_identity`), its config, and the latents' std
(`latent_shapes` counts each shape); stage 2 calls
`check_latent_manifest` and refuses a cache made by another autoencoder.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from tqdm import tqdm

from ldm.data.pipeline import IMAGE_MEMBERS, PipelineOptions, decode_sample
from ldm.data.shards import expand_shards, split_by_worker, tarfile_to_samples
from ldm.data.text import decode_text
from ldm.errors import UserError

log = logging.getLogger(__name__)
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


# --- the check stage 2 runs ---------------------------------------------------------------------------
def find_latent_manifest(where: str | os.PathLike | Sequence[str]) -> Path:
    """manifest.json given itself, its folder, or a shard spec of the cache (first shard's folder)."""
    if isinstance(where, (str, os.PathLike)) and Path(where).is_file() and str(where).endswith(".json"):
        return Path(where)
    if isinstance(where, (str, os.PathLike)) and Path(where).is_dir():
        return Path(where) / "manifest.json"
    urls = (
        list(where)
        if not isinstance(where, (str, os.PathLike))
        else expand_shards(str(where), "train_shards")
    )
    return Path(urls[0]).parent / "manifest.json"


def check_latent_manifest(where: str | os.PathLike | Sequence[str], autoencoder_identity: str) -> dict:
    """The cache's manifest, or a UserError when it was written by another autoencoder.

    `where`: the manifest, its folder, or the latent shard spec/list; `autoencoder_identity`:
    `weights_identity(autoencoder)` of the first stage the training run loaded.
    """
    path = find_latent_manifest(where)
    if not path.is_file():
        raise UserError(
            f"latent shards without {path}: re-create them with `python -m ldm.data.cache_latents`"
        )
    manifest = json.loads(path.read_text())
    made_by = (manifest.get("autoencoder") or {}).get("identity")
    if made_by is None:
        raise UserError(
            f"{path} is not a latent-cache manifest (no autoencoder identity); re-run cache_latents"
        )
    if made_by != autoencoder_identity:
        raise UserError(
            f"the latent cache {path.parent} was encoded by autoencoder {made_by} "
            f"({manifest['autoencoder'].get('path')}), but this run's first stage is {autoencoder_identity}. "
            "Set first_stage_ckpt to the autoencoder that made the cache, or re-encode: "
            f"python -m ldm.data.cache_latents --ckpt <first_stage_ckpt> --out {path.parent} ..."
        )
    return manifest


# --- reading the images ---------------------------------------------------------------------------------
class _Source(torch.utils.data.IterableDataset):
    """Decoded, centre-cropped images plus the members to carry along, split over loader workers."""

    def __init__(self, urls: list[str], opts: PipelineOptions, carry: Sequence[str]) -> None:
        super().__init__()
        self.urls, self.opts, self.carry = urls, opts, tuple(carry)
        self.errors = 0

    def _on_error(self, exn: BaseException) -> bool:
        log.warning("cache_latents: skipping unreadable data: %s", exn)
        return True

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        urls = self.urls if info is None else list(split_by_worker(self.urls, info.id, info.num_workers))
        if not urls:
            return
        for raw in wds.DataPipeline(wds.SimpleShardList(urls), tarfile_to_samples(handler=self._on_error)):
            try:
                sample = decode_sample(raw, self.opts, train=False, rng=None)
            except Exception as e:  # noqa: BLE001 - a bad sample is reported and skipped
                log.warning(
                    "cache_latents: skipping sample %s of %s: %s", raw.get("__key__"), raw.get("__url__"), e
                )
                yield {"__skipped__": f"{raw.get('__url__')}:{raw.get('__key__')}"}
                continue
            out = {"__key__": raw["__key__"], "__url__": raw.get("__url__"), "image": sample["image"]}
            out["members"] = {k: raw[k] for k in self.carry if k in raw and k not in IMAGE_MEMBERS}
            if "segmap" in sample:
                out["members"][self.opts.segmap_key] = _png(sample["segmap"])
            yield out


def _png(seg: torch.Tensor) -> bytes:
    arr = seg.numpy()
    img = (
        Image.fromarray(arr.astype(np.uint8))
        if arr.max(initial=0) < 256
        else Image.fromarray(arr.astype(np.int32))
    )
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _tensor_bytes(x: torch.Tensor, dtype: str) -> tuple[str, bytes]:
    """(extension, bytes): .npy for numpy dtypes, a plain-tensor .pth for bfloat16 (numpy has none)."""
    if dtype == "bfloat16":
        buf = io.BytesIO()
        torch.save(x.to(torch.bfloat16).contiguous().clone(), buf)
        return "pth", buf.getvalue()
    buf = io.BytesIO()
    np.lib.format.write_array(buf, x.to(DTYPES[dtype]).numpy(), allow_pickle=False)
    return "npy", buf.getvalue()


# --- encoding -------------------------------------------------------------------------------------------
class _Stats:
    """Running mean/variance of the latents the cache stands for (for a scale_factor estimate)."""

    def __init__(self) -> None:
        self.n, self.total, self.total_sq = 0, 0.0, 0.0

    def add(self, mean: torch.Tensor, var: torch.Tensor | None = None) -> None:
        m = mean.double()
        self.n += m.numel()
        self.total += float(m.sum())
        self.total_sq += float((m * m).sum() + (var.double().sum() if var is not None else 0.0))

    def std(self) -> float | None:
        if not self.n:
            return None
        mu = self.total / self.n
        return float(np.sqrt(max(self.total_sq / self.n - mu * mu, 0.0)))


def _load_text_encoder(spec: str | None, max_length: int, base: Any = None):
    """None, the base model's text encoder (`base`: a LatentDiffusion), the default MiniLM, or a folder's."""
    if not spec:
        return None
    if spec == "base":
        from ldm.conditioning.text import FrozenTextEncoder

        conditioners = base.conditioner.conditioners.values() if base is not None else ()
        found = [c for c in conditioners if isinstance(c, FrozenTextEncoder)]
        if not found:
            raise UserError(
                "cache_latents: --text-encoder base needs --base-model with a text encoder (SD 1.x/2.x)"
            )
        return found[0]
    from ldm.conditioning.text import FrozenTextEncoder

    return FrozenTextEncoder(model=None if spec == "default" else spec, max_length=max_length)


@torch.no_grad()
def cache_latents(
    ckpt: str | None,
    shards: str | Sequence[str],
    out: Path,
    mode: str = "dist",
    dtype: str = "float16",
    resolution: int | None = None,
    batch_size: int = 32,
    prefix: str = "train",
    shard_size: int = 1000,
    num_workers: int = 2,
    text_encoder: str | None = None,
    text_max_length: int = 77,  # tokens per caption (CLIP's context, as SD)
    device: str = "cpu",
    base_model: str | None = None,  # fine-tuning: this file's autoencoder (and text encoder) instead of ckpt
    base_config: str | None = None,  # its original inference yaml (default: recognised from its keys)
    base_tokenizer: str | None = None,  # CLIP tokenizer folder of an SD 1.x base_model
    buckets: dict | None = None,  # data.buckets options (enabled: true, step, max_area, ...): one bucket each
) -> dict:
    """Encode `shards` into `out/{prefix}-%06d.tar`; returns the manifest (also out/manifest.json).

    `ckpt`: a stage-1 autoencoder file, or None with `base_model` (a stage-2 / original file whose first
    stage encodes; `text_encoder="base"` then uses its own text encoder)."""
    from ldm.models.autoencoder import AutoencoderKL
    from ldm.models.first_stage import load_autoencoder, weights_identity

    if mode not in ("dist", "sample") or dtype not in DTYPES:
        raise UserError(f"cache_latents: mode={mode!r} (dist|sample), dtype={dtype!r} ({'|'.join(DTYPES)})")
    base, native = None, None
    if base_model:
        from ldm.interop.load import load_model

        loaded = load_model(base_model, config=base_config, text_encoder=base_tokenizer)
        base, native = loaded.model, loaded.image_size
        autoencoder, ae_config = base.first_stage.autoencoder, dict(base.first_stage.autoencoder_config)
        ckpt = str(base_model)
    elif ckpt:
        autoencoder, ae_config = load_autoencoder(ckpt)
    else:
        raise UserError("cache_latents: pass --ckpt <autoencoder> or --base-model <model to fine-tune>")
    autoencoder.to(device)
    identity = weights_identity(autoencoder)
    is_kl = isinstance(autoencoder, AutoencoderKL)  # VQ models have no posterior: their latent is stored
    if resolution is None and native is not None:  # the base's native size (SD 1.x: 512)
        resolution = native if isinstance(native, int) else min(native)
    resolution = int(resolution or (ae_config.get("ddconfig") or {}).get("resolution") or 0)
    if resolution <= 0:
        raise UserError("cache_latents: pass --resolution (the autoencoder config does not name one)")
    urls = expand_shards(shards, "shards")
    out.mkdir(parents=True, exist_ok=True)
    manifest = _start_manifest(out, identity, prefix)
    probe = next(iter(wds.DataPipeline(wds.SimpleShardList(urls[:1]), tarfile_to_samples())), {})
    keys = ("image", "segmap") if PipelineOptions.segmap_key in probe else ("image",)
    opts = PipelineOptions(resolution=resolution, crop="center", flip=False, keys=keys, buckets=buckets)
    carry = ("txt", "cls", "json", opts.segmap_key)
    loader = torch.utils.data.DataLoader(
        _Source(urls, opts, carry),
        batch_size=None,
        num_workers=num_workers,
        timeout=600 if num_workers else 0,
    )
    text = _load_text_encoder(text_encoder, text_max_length, base)
    if text is not None:
        text.to(device)
    writer = wds.ShardWriter(str(out / f"{prefix}-%06d.tar"), maxcount=shard_size, verbose=0, mtime=0)
    counts: dict[str, int] = {}
    stats, skipped, keys = _Stats(), [], set()
    pending: list[dict] = []
    shapes: dict[str, int] = {}  # "CxHxW" -> latents of that shape

    def flush() -> None:
        x = torch.stack([s["image"] for s in pending]).to(device)
        if is_kl and mode == "dist":
            posterior = autoencoder.encode(x)
            tensors = {"latent_mean": posterior.mean, "latent_logvar": posterior.logvar}
            stats.add(posterior.mean, posterior.var)
        else:
            z = autoencoder.encode_latent(x, sample=mode == "sample")
            tensors = {"latent": z}
            stats.add(z)
        emb = None
        if text is not None:
            captions = [
                decode_text(
                    s["members"].get("txt") or b"",
                    f"caption of sample {s['__key__']!r} of shard {s['__url__']}",
                    warn_once=str(s["__url__"]),
                )
                for s in pending
            ]
            emb = text.encode_prompts(captions)
        shape = "x".join(str(n) for n in next(iter(tensors.values())).shape[1:])
        shapes[shape] = shapes.get(shape, 0) + len(pending)
        for i, s in enumerate(pending):
            sample = {"__key__": s["__key__"], **s["members"]}
            for name, t in tensors.items():
                ext, data = _tensor_bytes(t[i].float().cpu(), dtype)
                sample[f"{name}.{ext}"] = data
            if emb is not None:
                ext, data = _tensor_bytes(emb[i].float().cpu(), dtype)
                sample[f"caption_emb.{ext}"] = data
            writer.write(sample)
            counts[writer.fname] = writer.count
            keys.update(k for k in sample if not k.startswith("__"))
        pending.clear()

    waiting: dict[tuple, list[dict]] = {}  # one batch per image shape (buckets); one shape without
    for item in tqdm(loader, desc="cache_latents", unit="img"):
        if "__skipped__" in item:
            skipped.append(item["__skipped__"])
            continue
        group = waiting.setdefault(tuple(item["image"].shape), [])
        group.append(item)
        if len(group) == batch_size:
            pending[:] = group
            group.clear()
            flush()
    for key in sorted(waiting):
        if waiting[key]:
            pending[:] = waiting[key]
            flush()
    writer.close()
    if not counts:
        raise UserError(f"cache_latents: no image could be read from {len(urls)} shard(s) ({urls[0]}, ...)")
    new = [{"name": os.path.basename(f), "split": prefix, "count": c} for f, c in counts.items()]
    std = stats.std()
    manifest["shards"] = [s for s in manifest.get("shards", []) if s.get("split") != prefix] + new
    manifest["splits"] = {}
    for s in manifest["shards"]:
        manifest["splits"][s["split"]] = manifest["splits"].get(s["split"], 0) + s["count"]
    manifest.update(
        kind="latents",
        total=sum(manifest["splits"].values()),
        keys=sorted(set(manifest.get("keys", [])) | keys),
        mode=mode if is_kl else "sample",
        dtype=dtype,
        resolution=resolution,
        latent_shape=[int(n) for n in max(shapes, key=shapes.get).split("x")] if shapes else [],
        latent_shapes=shapes,  # several with buckets
        buckets=None if opts.buckets is None else dict(vars(opts.buckets)),
        autoencoder=dict(
            identity=identity,
            path=str(ckpt),
            base_model=base is not None,
            target=ae_config.get("_target_"),
            config=ae_config,
            downsample_factor=autoencoder.downsample_factor,
            latent_channels=autoencoder.latent_channels,
            scale_factor=None,  # stage 2 sets it; the estimate is 1/std of these latents (LDM Sec. 4.3.2)
            latent_std=std,
            scale_factor_estimate=(1.0 / std) if std else None,
        ),
        text_encoder=None if text is None else dict(model=text.model_name, max_length=text.max_length),
    )
    manifest.setdefault("sources", {})[prefix] = list(urls)
    manifest.setdefault("skipped", {})[prefix] = dict(count=len(skipped), examples=skipped[:10])
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def _start_manifest(out: Path, identity: str, prefix: str) -> dict:
    """The existing manifest (same autoencoder) to add a split to; that split's old shards removed."""
    path = out / "manifest.json"
    manifest = json.loads(path.read_text()) if path.is_file() else {}
    other = (manifest.get("autoencoder") or {}).get("identity")
    if other is not None and other != identity:
        raise UserError(
            f"{out} holds latents of another autoencoder ({other}); write this one to a new --out folder"
        )
    for old in out.glob(f"{prefix}-*.tar"):
        old.unlink()
    return manifest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ldm.data.cache_latents", description=__doc__.split("\n")[0])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--ckpt", help="autoencoder: model.safetensors (with config) or a stage-1 .ckpt")
    source.add_argument(
        "--base-model",
        help="fine-tuning: the base model file (original SD/LDM or ours); its autoencoder encodes",
    )
    p.add_argument("--base-config", default=None, help="the base model's original inference yaml")
    p.add_argument("--base-tokenizer", default=None, help="CLIP tokenizer folder of an SD 1.x base model")
    p.add_argument("--shards", required=True, nargs="+", help="image shards: path, glob, brace range or list")
    p.add_argument("--out", required=True, type=Path, help="folder for the latent shards and manifest.json")
    p.add_argument("--prefix", default="train", help="shard name prefix / split name (train, val)")
    p.add_argument(
        "--mode", choices=["dist", "sample"], default="dist", help="posterior mean+logvar, or one sample"
    )
    p.add_argument("--dtype", choices=list(DTYPES), default="float16")
    p.add_argument(
        "--resolution", type=int, default=None, help="centre-crop side; default: the autoencoder's"
    )
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--workers", type=int, default=2, help="image decoding processes")
    p.add_argument(
        "--text-encoder",
        default=None,
        help="also store caption_emb: 'base' (the --base-model's own), 'default' (MiniLM) or a folder",
    )
    p.add_argument("--text-max-length", type=int, default=77, help="tokens per caption for --text-encoder")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--buckets", action="store_true", help="aspect-ratio buckets: crop each image to its own bucket"
    )
    p.add_argument("--bucket-step", type=int, default=64, help="px; bucket sides are multiples of this")
    p.add_argument("--bucket-max-area", type=int, default=None, help="px^2; default: resolution^2")
    p.add_argument("--bucket-max-ratio", type=float, default=2.0, help="longest / shortest bucket side")
    a = p.parse_args(argv)
    buckets = None
    if a.buckets:
        buckets = dict(
            enabled=True, step=a.bucket_step, max_area=a.bucket_max_area, max_ratio=a.bucket_max_ratio
        )
    shards = a.shards[0] if len(a.shards) == 1 else a.shards
    try:
        m = cache_latents(
            a.ckpt,
            shards,
            a.out,
            mode=a.mode,
            dtype=a.dtype,
            resolution=a.resolution,
            batch_size=a.batch_size,
            prefix=a.prefix,
            shard_size=a.shard_size,
            num_workers=a.workers,
            text_encoder=a.text_encoder,
            text_max_length=a.text_max_length,
            device=a.device,
            base_model=a.base_model,
            base_config=a.base_config,
            base_tokenizer=a.base_tokenizer,
            buckets=buckets,
        )
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ae = m["autoencoder"]
    print(
        f"wrote {m['splits'][a.prefix]} latents {m['latent_shape']} to {a.out} "
        f"(autoencoder {ae['identity']}, latent std {ae['latent_std']:.4f})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
