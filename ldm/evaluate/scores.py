"""The numbers: FID, KID, CLIP score, PSNR, SSIM, LPIPS — torchmetrics' implementations throughout.

FID and KID are computed from features (see `features.py`), so the reference side can be cached: the
features are put straight into torchmetrics' metric states (`FrechetInceptionDistance` sums and
covariance sums, `KernelInceptionDistance` feature lists) and its own `compute()` gives the number.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ldm.errors import UserError


class _Precomputed(nn.Module):
    """A placeholder feature network: the metrics below receive features, never images."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = int(num_features)

    def forward(self, x: Tensor) -> Tensor:  # pragma: no cover - never called
        return x


def _check_features(real: Tensor, fake: Tensor, minimum: int, what: str) -> None:
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"{what}: features must be (N, D) with the same D, got {real.shape}, {fake.shape}")
    if len(real) < minimum or len(fake) < minimum:
        raise UserError(
            f"{what} needs at least {minimum} images on each side, got {len(real)} reference and "
            f"{len(fake)} generated; evaluate more images (--n / --limit)."
        )


def fid(real: Tensor, fake: Tensor) -> float:
    """Fréchet Inception Distance (Heusel et al. 2017) between two feature sets (N, D) and (M, D):
    ||mu_r - mu_f||^2 + tr(S_r + S_f - 2 (S_r S_f)^(1/2)), covariances unbiased (N - 1), in float64,
    by torchmetrics' `FrechetInceptionDistance.compute`. Needs N, M >= 2; lower is better."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    _check_features(real, fake, 2, "FID")
    metric = FrechetInceptionDistance(feature=_Precomputed(real.shape[1]), reset_real_features=False)
    for side, feats in (("real", real), ("fake", fake)):
        feats = feats.double()
        setattr(metric, f"{side}_features_sum", feats.sum(dim=0))
        setattr(metric, f"{side}_features_cov_sum", feats.t().mm(feats))
        setattr(metric, f"{side}_features_num_samples", torch.tensor(len(feats)))
    metric.orig_dtype = torch.float64
    metric._update_count = 1  # the states were set directly (torchmetrics warns otherwise)
    return float(metric.compute())


def kid(
    real: Tensor, fake: Tensor, subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """Kernel Inception Distance (Binkowski et al. 2018): the unbiased MMD^2 with the cubic polynomial
    kernel k(x, y) = (x.y / D + 1)^3, averaged over `subsets` random subsets of min(subset_size, N, M)
    images per side (torchmetrics' `KernelInceptionDistance`); returns (mean, std). Seeded: the same
    features give the same numbers. Lower is better."""
    from torchmetrics.image.kid import KernelInceptionDistance

    _check_features(real, fake, 2, "KID")
    size = min(int(subset_size), len(real), len(fake))
    with warnings.catch_warnings():  # "will save all extracted features": we hand it the features
        warnings.simplefilter("ignore", UserWarning)
        metric = KernelInceptionDistance(
            feature=_Precomputed(real.shape[1]), subsets=subsets, subset_size=size
        )
    metric._update_count = 1
    metric.real_features = [real.double()]
    metric.fake_features = [fake.double()]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


# --- CLIP score ------------------------------------------------------------------------------------------
class _ClipFeatures(nn.Module):
    """transformers >= 5 returns model outputs from `get_*_features`; torchmetrics 1.9 expects tensors."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config = model.config

    @staticmethod
    def _tensor(out: Any) -> Tensor:
        return out if isinstance(out, Tensor) else out.pooler_output

    def get_image_features(self, pixel_values: Tensor) -> Tensor:
        return self._tensor(self.model.get_image_features(pixel_values=pixel_values))

    def get_text_features(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return self._tensor(self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask))


def load_clip(path: str | os.PathLike) -> tuple[nn.Module, Any]:
    """(CLIPModel, CLIPProcessor) from a local folder (save_pretrained layout); never downloads."""
    from transformers import CLIPModel, CLIPProcessor

    folder = os.path.expanduser(str(path))
    if not os.path.isdir(folder) or not os.path.isfile(os.path.join(folder, "config.json")):
        raise UserError(
            f"--clip-model {path}: not a local CLIP folder (config.json, weights, tokenizer and "
            "preprocessor files, as `CLIPModel/CLIPProcessor.save_pretrained` or a download of "
            "openai/clip-vit-large-patch14 leaves)."
        )
    try:
        model = CLIPModel.from_pretrained(folder, local_files_only=True).eval()
        processor = CLIPProcessor.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(
            f"--clip-model {path}: cannot load a CLIPModel and CLIPProcessor from it ({e})."
        ) from None
    return model, processor


@torch.no_grad()
def clip_score(
    images: Tensor, prompts: Sequence[str], model: str | os.PathLike | tuple, batch_size: int = 32
) -> dict[str, Any]:
    """CLIP score (Hessel et al. 2021, as torchmetrics' `CLIPScore`): per image 100 * cos(E_image, E_text)
    of its prompt; `clip_score` = max(mean over images, 0) (torchmetrics clamps the mean, not each image).

    `images`: uint8 (N, 3, H, W); `prompts`: N strings; `model`: a local CLIP folder or (model, processor).
    Returns {"clip_score": float, "per_image": [float] * N}. Higher is better (0..100)."""
    from torchmetrics.functional.multimodal.clip_score import _clip_score_update
    from torchmetrics.multimodal.clip_score import CLIPScore

    if len(prompts) != len(images) or any(not isinstance(p, str) for p in prompts):
        raise UserError(
            f"CLIP score needs one prompt per image: {len(images)} images, {len(prompts)} prompts "
            "(a sample.py folder's run.json gives them; or pass --prompts)."
        )
    clip, processor = model if isinstance(model, tuple) else load_clip(model)
    wrapped = _ClipFeatures(clip)
    metric = CLIPScore(model_name_or_path=lambda: (wrapped, processor))
    per_image = []
    for i in range(0, len(images), batch_size):
        chunk, texts = images[i : i + batch_size], list(prompts[i : i + batch_size])
        scores, n = _clip_score_update(list(chunk), texts, wrapped, processor)  # what CLIPScore.update runs
        per_image += scores.double().tolist()
        metric.score += scores.sum(0).to(metric.score)  # and the states it adds them to
        metric.n_samples += n
    metric._update_count = len(per_image)
    return {"clip_score": float(metric.compute()), "per_image": per_image}


# --- reconstructions -------------------------------------------------------------------------------------
def lpips_network(vgg_weights: str | os.PathLike, lin_weights: str | os.PathLike | None = None) -> nn.Module:
    """LPIPS-VGG (`ldm.models.lpips.LPIPS`) from local files: torchvision's VGG16 weights (required: a
    random VGG gives no perceptual metric) and the LPIPS v0.1 linear layers, by default the copy that
    ships inside torchmetrics (`functional/image/lpips_models/vgg.pth`)."""
    from ldm.models.lpips import LPIPS

    if not vgg_weights:
        raise UserError(
            "LPIPS needs VGG16 weights: pass --lpips-vgg (lpips_vgg_weights) with torchvision's "
            "vgg16-397923af.pth (download.pytorch.org/models/vgg16-397923af.pth); nothing is downloaded."
        )
    return LPIPS(str(vgg_weights), str(lin_weights or bundled_lpips_lin()))


def bundled_lpips_lin() -> str:
    """The LPIPS v0.1 VGG linear-layer weights torchmetrics ships (lin0..lin4.model.1.weight)."""
    import torchmetrics

    return os.path.join(
        os.path.dirname(torchmetrics.__file__), "functional", "image", "lpips_models", "vgg.pth"
    )


@torch.no_grad()
def reconstruction_scores(
    originals: Tensor, reconstructions: Tensor, lpips: nn.Module | None = None, batch_size: int = 32
) -> dict[str, float]:
    """PSNR (dB, peak 1 on [0, 1], mean of per-image values), SSIM (Wang et al. 2004, 11x11 Gaussian
    window, torchmetrics) and LPIPS (Zhang et al. 2018, `ldm.models.lpips.LPIPS`, when given) of uint8
    (N, 3, H, W) pairs; higher PSNR/SSIM and lower LPIPS are better."""
    from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

    if originals.shape != reconstructions.shape:
        raise ValueError(f"shapes differ: {tuple(originals.shape)} vs {tuple(reconstructions.shape)}")
    psnr = PeakSignalNoiseRatio(data_range=1.0, reduction="elementwise_mean", dim=(1, 2, 3))
    ssim = StructuralSimilarityIndexMeasure(data_range=1.0)
    lp_sum = 0.0
    for i in range(0, len(originals), batch_size):
        x = originals[i : i + batch_size].double() / 255.0
        y = reconstructions[i : i + batch_size].double() / 255.0
        psnr.update(y, x)
        ssim.update(y, x)
        if lpips is not None:
            device = next(lpips.parameters()).device
            a, b = (x * 2 - 1).float().to(device), (y * 2 - 1).float().to(device)
            lp_sum += float(lpips(a, b).sum())
    out = {"psnr": float(psnr.compute()), "ssim": float(ssim.compute())}
    if lpips is not None:
        out["lpips"] = lp_sum / len(originals)
    return out
