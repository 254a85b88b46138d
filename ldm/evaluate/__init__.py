"""Evaluation: FID, KID, CLIP score, PSNR, SSIM, LPIPS and rFID, after training and during it.

    python -m ldm.evaluate --generated outputs/samples/txt2img --reference 'data/shards/shapes/val-*.tar' \\
        --inception-weights weights-inception-2015-12-05-6726825d.pth

Modules: `features` (Inception from a local weights file, random-weight Inception, a tiny seeded net),
`scores` (the numbers, by torchmetrics), `sources` (image folders, shards, samples from a checkpoint,
the reference-feature cache), `run` (whole evaluations -> one JSON record), `report` (tables, run
comparisons), `cli`. The training callback is `ldm.training.metrics.SampleMetrics`. Nothing here imports
Lightning.
"""

from ldm.evaluate.features import TinyFeatures, extract, feature_extractor, inception
from ldm.evaluate.run import evaluate_autoencoder, evaluate_generated, evaluate_superres, reference_features
from ldm.evaluate.scores import clip_score, fid, kid, reconstruction_scores
from ldm.evaluate.sources import ImageSet, draw_samples, read_images

__all__ = [
    "ImageSet",
    "TinyFeatures",
    "clip_score",
    "draw_samples",
    "evaluate_autoencoder",
    "evaluate_generated",
    "evaluate_superres",
    "extract",
    "feature_extractor",
    "fid",
    "inception",
    "kid",
    "read_images",
    "reconstruction_scores",
    "reference_features",
]
