"""`python -m ldm.evaluate`: score generated images, an autoencoder, an SR model, or compare runs.

Generated images (a sample.py folder, or drawn from --checkpoint) against --reference (folder or shards):
    python -m ldm.evaluate --generated outputs/samples/txt2img --reference 'data/shards/shapes/val-*.tar' \\
        --inception-weights weights-inception-2015-12-05-6726825d.pth [--clip-model clip-vit-base-patch32/]
    python -m ldm.evaluate --checkpoint outputs/txt2img/latest/model.safetensors --prompt-file prompts.txt \\
        --n 4 --reference 'data/shards/shapes/val-*.tar' --features tiny
An autoencoder on validation shards (PSNR, SSIM, LPIPS, rFID); an SR model against bicubic upscaling:
    python -m ldm.evaluate --autoencoder outputs/autoencoder_kl/latest/model.safetensors \\
        --reference 'data/shards/shapes/val-*.tar' --features tiny
    python -m ldm.evaluate --superres outputs/superres/latest/model.safetensors --reference ... --factor 4
Training runs side by side (their metrics.csv):
    python -m ldm.evaluate --runs 'outputs/txt2img/*'
Prints a table and one JSON record (also written to --out).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ldm.errors import UserError
from ldm.evaluate.features import FEATURES


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ldm.evaluate",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.split("\n")[2:]),
    )
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--generated", help="folder of generated images (sample.py out_dir: prompts from run.json)"
    )
    what.add_argument("--checkpoint", help="draw the images from this model for --prompts/--labels")
    what.add_argument("--autoencoder", help="stage-1 model.safetensors / .ckpt: reconstruct --reference")
    what.add_argument("--superres", help="super-resolution model: upscale downsampled --reference images")
    what.add_argument("--runs", nargs="+", help="run folders (globs) to compare from their metrics.csv")
    p.add_argument("--reference", help="real images: a folder or WebDataset shards (path, glob, brace range)")
    p.add_argument("--limit", type=int, default=None, help="at most this many reference images")
    p.add_argument("--size", type=int, default=None, help="resize every image to SIZE px")
    p.add_argument("--features", choices=FEATURES, default="inception", help="FID/KID feature network")
    p.add_argument(
        "--inception-weights",
        dest="weights",
        default=None,
        help="torch-fidelity's weights-inception-2015-12-05-6726825d.pth (feature_extractor_weights_path)",
    )
    p.add_argument("--no-fid", action="store_true", help="skip FID/KID (e.g. CLIP score alone)")
    p.add_argument("--clip-model", default=None, help="local CLIP folder (save_pretrained layout)")
    p.add_argument("--lpips-vgg", default=None, help="LPIPS: torchvision VGG16 weights (without: no LPIPS)")
    p.add_argument("--lpips-lin", default=None, help="LPIPS v0.1 linear layers (default: torchmetrics' copy)")
    p.add_argument("--kid-subsets", type=int, default=100)
    p.add_argument("--kid-subset-size", type=int, default=1000)
    p.add_argument("--cache-dir", default=None, help="reference feature cache folder")
    p.add_argument("--no-cache", action="store_true", help="always recompute the reference features")
    sample = p.add_argument_group("drawing samples (--checkpoint, --superres)")
    sample.add_argument("--prompts", nargs="*", default=None, help="prompts (text models)")
    sample.add_argument("--prompt-file", default=None, help="prompts, one a line")
    sample.add_argument("--labels", nargs="*", type=int, default=None, help="class ids (class models)")
    sample.add_argument("--n", type=int, default=1, help="images per prompt / label (unconditional: total)")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--steps", type=int, default=50)
    sample.add_argument("--sampler", default="ddim")
    sample.add_argument("--cfg-scale", type=float, default=5.0)
    sample.add_argument("--batch-size", type=int, default=8)
    sample.add_argument("--config", default=None, help="original inference yaml of --checkpoint")
    sample.add_argument("--text-encoder", default=None, help="tokenizer/text-model folder of --checkpoint")
    sample.add_argument("--factor", type=int, default=4, help="--superres: the model's upscaling factor")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON record here")
    return p


def _prompts(a: argparse.Namespace) -> list[str] | None:
    prompts = list(a.prompts or [])
    if a.prompt_file:
        path = Path(a.prompt_file).expanduser()
        if not path.is_file():
            raise UserError(f"--prompt-file {a.prompt_file}: no such file; one prompt a line.")
        prompts += [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    return prompts or None


def evaluate(a: argparse.Namespace) -> dict:
    """Run what the arguments ask for and return the JSON record."""
    from ldm.evaluate import run
    from ldm.evaluate.features import feature_extractor
    from ldm.evaluate.sources import draw_samples, read_images

    if a.runs:
        from ldm.evaluate.report import compare_runs

        summaries, text = compare_runs(a.runs)
        return {"kind": "runs", "runs": summaries, "_table": text}
    if a.reference is None and not (a.generated or a.checkpoint):
        raise UserError("--autoencoder / --superres need --reference <validation shards or image folder>.")
    extractor = None if a.no_fid else feature_extractor(a.features, a.weights)
    cache = None if a.no_cache else (a.cache_dir or run.DEFAULT_CACHE)
    lpips = None
    if (a.autoencoder or a.superres) and a.lpips_vgg:
        from ldm.evaluate.scores import lpips_network

        lpips = lpips_network(a.lpips_vgg, a.lpips_lin)
    if a.autoencoder or a.superres:
        reference = read_images(a.reference, a.size, a.limit)
        if a.autoencoder:
            record = run.evaluate_autoencoder(a.autoencoder, reference, lpips, extractor, device=a.device)
        else:
            opts = {"steps": a.steps, "sampler": a.sampler, "cfg_scale": a.cfg_scale}
            record = run.evaluate_superres(
                a.superres, reference, a.factor, lpips, extractor, a.seed, a.device, **opts
            )
        if lpips is None:
            record["lpips"] = "not computed: pass --lpips-vgg <torchvision vgg16 weights>"
        else:
            record["lpips_weights"] = {"vgg": a.lpips_vgg, "lin": a.lpips_lin or "torchmetrics' vgg.pth"}
    else:
        if a.generated:
            generated = read_images(a.generated, a.size)
        else:
            generated = draw_samples(
                a.checkpoint, _prompts(a), a.labels, n=a.n, seed=a.seed, size=a.size, config=a.config,
                text_encoder=a.text_encoder, steps=a.steps, sampler=a.sampler, cfg_scale=a.cfg_scale,
                batch_size=a.batch_size,
            )  # fmt: skip
        if a.reference is None and a.clip_model is None:
            raise UserError(
                "nothing to compute: give --reference (FID, KID) and/or --clip-model (CLIP score)."
            )
        record = run.evaluate_generated(
            generated,
            a.reference if extractor is not None else None,
            extractor,
            a.clip_model,
            reference_limit=a.limit,
            kid_subsets=a.kid_subsets,
            kid_subset_size=a.kid_subset_size,
            cache_dir=cache,
            device=a.device,
        )
    record["environment"] = run.environment()
    return record


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    try:
        record = evaluate(a)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from ldm.evaluate.report import record_table

    text = record.pop("_table", None) or record_table(record)
    print(text)
    line = json.dumps(record, default=str)
    print(line)
    if a.out is not None:
        from ldm.interop.checkpoint import atomic_path

        a.out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(a.out) as tmp:
            Path(tmp).write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")
    return 0
