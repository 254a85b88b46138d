"""LPIPS perceptual distance on VGG16 features (Zhang et al. 2018, eq. 1).

Weights come only from files you name (never downloaded by default):
- `vgg_weights`: torchvision's VGG16 state dict (`features.N.*`, e.g. vgg16-397923af.pth from
  download.pytorch.org/models) or one in our layout (`net.sliceK.N.*`);
- `lin_weights`: the LPIPS v0.1 linear layers (`lin0.model.1.weight` ... `lin4`), e.g.
  lpips/weights/v0.1/vgg.pth of richzhang/PerceptualSimilarity, or taming-transformers' vgg.pth.
A full LPIPS state dict in our layout (as saved by `state_dict()`) can be given as either. http(s) URLs are
fetched with torch.hub's download helper into its cache, only when you pass one.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import Tensor, nn

from ldm.errors import UserError

log = logging.getLogger(__name__)

# VGG16 `features` layer indices that end each slice (after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3)
_SLICE_ENDS = (4, 9, 16, 23, 30)
_VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
CHANNELS = (64, 128, 256, 512, 512)


def _vgg16_features() -> list[nn.Module]:
    """torchvision's `vgg16().features` layers up to relu5_3 (index 29), without torchvision."""
    layers: list[nn.Module] = []
    in_ch = 3
    for v in _VGG16_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(in_ch, v, kernel_size=3, padding=1), nn.ReLU(inplace=False)]
            in_ch = v
    return layers


class VGG16Slices(nn.Module):
    """VGG16 (Simonyan & Zisserman 2015) split into five slices; layer names keep torchvision's indices."""

    def __init__(self) -> None:
        super().__init__()
        layers = _vgg16_features()
        start = 0
        for k, end in enumerate(_SLICE_ENDS, start=1):
            block = nn.Sequential()
            for i in range(start, end):
                block.add_module(str(i), layers[i])
            setattr(self, f"slice{k}", block)
            start = end

    def forward(self, x: Tensor) -> list[Tensor]:
        feats = []
        for k in range(1, len(_SLICE_ENDS) + 1):
            x = getattr(self, f"slice{k}")(x)
            feats.append(x)
        return feats


class NetLinLayer(nn.Module):
    """A learned non-negative 1x1 channel weighting w_l (LPIPS eq. 1); `model.1` as the released names."""

    def __init__(self, chn_in: int) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(chn_in, 1, kernel_size=1, bias=False))


def _read_state_dict(source: str | os.PathLike) -> dict[str, Tensor]:
    """Tensors from a local file, or from an explicit http(s) URL via torch.hub's download cache."""
    source = str(source)
    if source.startswith(("http://", "https://")):
        cache = Path(torch.hub.get_dir()) / "checkpoints"
        cache.mkdir(parents=True, exist_ok=True)
        path = cache / os.path.basename(source.split("?")[0])
        if not path.is_file():
            log.info("downloading %s to %s", source, path)
            torch.hub.download_url_to_file(source, str(path), progress=False)
        source = str(path)
    from ldm.interop.checkpoint import load_state_dict

    state, _ = load_state_dict(source, what="LPIPS weights")
    return state


def _vgg_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Map torchvision `features.N.*` (or our `net.sliceK.N.*`) onto `sliceK.N.*`."""
    out = {}
    for key, value in state.items():
        name = key.removeprefix("net.")
        if name.startswith("slice"):
            out[name] = value
        elif name.startswith("features."):
            index = int(name.split(".")[1])
            k = next((s for s, end in enumerate(_SLICE_ENDS, start=1) if index < end), None)
            if k is not None:  # layers after relu5_3 (the last max-pool) are not used
                out[f"slice{k}.{name.removeprefix('features.')}"] = value
    return out


class LPIPS(nn.Module):
    """d(x, y) = sum_l mean_hw || w_l * (f_l(x) - f_l(y)) ||^2 on unit-normalised VGG16 features (eq. 1).

    Inputs are images in [-1, 1]; returns (B, 1, 1, 1). The network is frozen and always in eval mode.
    Without `lin_weights` the channel weights are 1 (the paper's unweighted "baseline" VGG distance);
    without `vgg_weights` the VGG is random and the distance is NOT a perceptual metric (a warning says so).
    """

    def __init__(self, vgg_weights: str | None = None, lin_weights: str | None = None) -> None:
        super().__init__()
        # ImageNet statistics expressed for inputs in [-1, 1] (LPIPS ScalingLayer)
        self.register_buffer(
            "shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.net = VGG16Slices()
        for k, ch in enumerate(CHANNELS):
            lin = NetLinLayer(ch)
            nn.init.ones_(lin.model[1].weight)
            setattr(self, f"lin{k}", lin)
        self._load(vgg_weights, lin_weights)
        self.requires_grad_(False)
        self.eval()

    def _load(self, vgg_weights: str | None, lin_weights: str | None) -> None:
        vgg_loaded = False
        if vgg_weights is not None:
            missing, _ = self.net.load_state_dict(_vgg_state(_read_state_dict(vgg_weights)), strict=False)
            if missing:
                raise UserError(
                    f"LPIPS vgg_weights={vgg_weights}: no VGG16 feature weights for {missing[:4]}"
                )
            vgg_loaded = True
        if lin_weights is not None:
            state = _read_state_dict(lin_weights)
            names = [f"lin{k}.model.1.weight" for k in range(len(CHANNELS))]
            missing = [n for n in names if n not in state]
            if missing:
                raise UserError(
                    f"LPIPS lin_weights={lin_weights}: missing {missing}; expected LPIPS v0.1 keys."
                )
            self.load_state_dict({n: state[n] for n in names}, strict=False)
            vgg_state = _vgg_state(state)
            if not vgg_loaded and vgg_state:  # a full LPIPS state dict also holds the VGG
                self.net.load_state_dict(vgg_state, strict=True)
                vgg_loaded = True
        if not vgg_loaded:
            log.warning(
                "LPIPS runs with random VGG16 weights, so it is NOT a perceptual metric (only a random "
                "feature-space distance). Pass vgg_weights=<torchvision vgg16 .pth/.safetensors> and "
                "lin_weights=<LPIPS v0.1 vgg.pth> (local paths or explicit URLs) for the real LPIPS."
            )
        elif lin_weights is None:
            log.warning(
                "LPIPS without lin_weights: using the unweighted VGG16 baseline distance (all w_l = 1)."
            )

    def train(self, mode: bool = True) -> LPIPS:
        """Stay in eval mode: the metric is frozen (its dropout must never be active)."""
        return super().train(False)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        fx = self.net((x - self.shift) / self.scale)
        fy = self.net((y - self.shift) / self.scale)
        total = 0.0
        for k, (a, b) in enumerate(zip(fx, fy)):
            diff = (_unit_normalize(a) - _unit_normalize(b)).pow(2)  # (B, C_l, H_l, W_l)
            total = total + getattr(self, f"lin{k}").model(diff).mean(dim=(2, 3), keepdim=True)
        return total  # (B, 1, 1, 1)


def _unit_normalize(x: Tensor, eps: float = 1e-10) -> Tensor:
    """Divide each spatial feature vector by its L2 norm over channels."""
    return x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)
