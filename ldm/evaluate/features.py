"""Feature extractors for FID / KID: the standard Inception (torch-fidelity's TF-ported InceptionV3, as
torchmetrics uses it) from a local weights file, a random-weight Inception, or a tiny seeded conv net.

Every extractor is an `nn.Module` taking uint8 images (N, 3, H, W) in 0..255 (any H, W: each resizes
itself) and returning float features (N, D); it carries `num_features` (D) and `identity` (a string that
names it for the reference-statistics cache). Nothing here downloads: the standard weights are a file you
give (`feature_extractor_weights_path`, `--inception-weights`), read as safetensors or with
`torch.load(weights_only=True)`; torch-fidelity's own loader (which unpickles with weights_only=False or
downloads) is never called with a path or a URL.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm.errors import UserError

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_FILE
INCEPTION_DIMS = 2048  # pool3 features, the FID/KID standard (Heusel et al. 2017; Binkowski et al. 2018)
FEATURES = ("inception", "inception-random", "tiny")  # the --features choices


def _missing_weights(given: str | None) -> UserError:
    where = f"{given} does not exist" if given else "no Inception weights were given"
    return UserError(
        f"FID/KID with the standard Inception: {where}. Download {INCEPTION_FILE} (the "
        f"pt_inception-2015-12-05 weights torch-fidelity uses) from {INCEPTION_URL} and pass its path as "
        "--inception-weights "
        "(feature_extractor_weights_path= in Python / the training callback). Nothing is downloaded at run "
        "time. For a smoke test without it, --features inception-random or tiny (numbers then are NOT "
        "comparable with published FIDs)."
    )


def _fidelity_inception_class() -> type:
    """torchmetrics' NoTrainInceptionV3 (torch-fidelity's InceptionV3); UserError when not importable."""
    try:
        from torchmetrics.image.fid import NoTrainInceptionV3
        from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

        if not _TORCH_FIDELITY_AVAILABLE:
            raise ModuleNotFoundError("torch_fidelity")
        import torch_fidelity.feature_extractor_inceptionv3  # noqa: F401
    except ImportError as e:
        raise UserError(
            f"the Inception feature extractor needs torch-fidelity ({e}). Install it with a torchvision "
            "built for your torch: `pip install torchvision torch-fidelity --index-url <your torch's wheel "
            "index>` (e.g. https://download.pytorch.org/whl/cpu for CPU torch); a torchvision that does "
            "not match torch breaks `import torchmetrics`. Or use --features tiny."
        ) from None
    return NoTrainInceptionV3


@contextlib.contextmanager
def _weights_from(state: dict[str, Tensor] | None) -> Iterator[None]:
    """Make torch-fidelity's constructor take `state` (None: keep its random init) instead of downloading:
    its `load_state_dict_from_url` name is swapped for the duration of the call."""
    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

    original = tf_inception.load_state_dict_from_url
    tf_inception.load_state_dict_from_url = lambda *a, **k: state
    try:
        yield
    finally:
        tf_inception.load_state_dict_from_url = original


def _file_sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def _weights_sha(module: nn.Module) -> str:
    """16 hex digits of the module's weights: a cache made by other weights (another seed, another
    initialisation in another version of this code) is never taken for this network's."""
    from ldm.models.first_stage import state_identity

    return state_identity(module.state_dict())


def inception(weights_path: str | os.PathLike | None = None, random_weights: bool = False, seed: int = 0):
    """The FID Inception (2048-d pool3, inputs uint8, resized to 299 inside, as torch-fidelity/TF).

    `weights_path`: torch-fidelity's `weights-inception-2015-12-05-6726825d.pth` (or the same tensors as
    .safetensors), read without running code. `random_weights=True`: the same network with seeded random
    weights, He-normal convolutions (PyTorch's default init shrinks pool3 features to ~1e-8 through 90
    layers; He-normal keeps them near 0.2, the scale of trained Inception features); for CI and smoke
    tests, its FIDs are not comparable with published ones. Raises UserError when the file is missing or
    torch-fidelity cannot be imported.
    """
    state = None
    if not random_weights:
        path = Path(weights_path).expanduser() if weights_path else None
        if path is None or not path.is_file():
            raise _missing_weights(str(path) if path else None)
        from ldm.interop.checkpoint import load_state_dict

        state, _ = load_state_dict(path, what="Inception weights (feature_extractor_weights_path)")
    base = _fidelity_inception_class()

    class _Inception(base):
        def load_state_dict(self, state_dict, strict=True, assign=False):  # noqa: D102
            if state_dict is None:  # random weights: keep the seeded initialisation
                return None
            return super().load_state_dict(state_dict, strict=strict, assign=assign)

    with torch.random.fork_rng(devices=[]), _weights_from(state):
        torch.manual_seed(seed)
        try:
            net = _Inception(name="inception-v3-compat", features_list=[str(INCEPTION_DIMS)])
            if random_weights:
                for module in net.modules():
                    if isinstance(module, nn.Conv2d):
                        nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        except RuntimeError as e:
            raise UserError(
                f"{weights_path} is not the Inception weights torch-fidelity uses ({e})"
            ) from None
    net.num_features = INCEPTION_DIMS
    net.identity = (
        f"inception-random-seed{seed}:{_weights_sha(net)}"
        if random_weights
        else f"inception:{_file_sha(Path(weights_path))}"
    )
    return net.eval().requires_grad_(False)


class TinyFeatures(nn.Module):
    """A seeded random conv net: uint8 (N, 3, H, W) -> (N, num_features), for tests and smoke runs.

    Images are resized (bilinear) to `size` px, scaled to [-1, 1], then conv(3->16, s2) -> ReLU ->
    conv(16->32, s2) -> ReLU -> 4x4 average pool -> linear; He-normal weights and zero biases drawn from
    `seed` (features of std ~0.5 and x.y / D ~0.25, the scale of Inception's pool3 features, which KID's
    cubic kernel assumes). NOT an image-quality metric (no training), only a fixed non-linear feature map.
    """

    def __init__(self, num_features: int = 64, seed: int = 0, size: int = 32) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.conv1 = nn.Conv2d(3, 16, 3, stride=2, padding=1)
            self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
            self.fc = nn.Linear(32 * 16, num_features)
            for layer in (self.conv1, self.conv2, self.fc):
                nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
                nn.init.zeros_(layer.bias)
        self.size = int(size)
        self.num_features = int(num_features)
        self.identity = f"tiny-{num_features}-seed{seed}-size{size}:{_weights_sha(self)}"
        self.requires_grad_(False).eval()

    def forward(self, images: Tensor) -> Tensor:
        x = images.float() / 127.5 - 1.0
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 4).flatten(1))


def feature_extractor(
    kind: str = "inception", weights_path: str | os.PathLike | None = None, seed: int = 0
) -> nn.Module:
    """One of FEATURES by name: `inception` (needs `weights_path`), `inception-random`, `tiny`."""
    if kind == "inception":
        return inception(weights_path)
    if kind == "inception-random":
        return inception(random_weights=True, seed=seed)
    if kind == "tiny":
        return TinyFeatures(seed=seed)
    raise UserError(f"features={kind!r}: use one of {', '.join(FEATURES)}.")


def identity_of(extractor: nn.Module) -> str:
    """The cache name of an extractor: its `identity`, else its class and a hash of its weights."""
    given = getattr(extractor, "identity", None)
    return str(given) if given else f"{type(extractor).__name__}:{_weights_sha(extractor)}"


@torch.no_grad()
def extract(
    extractor: nn.Module, images: Tensor | Iterable[Tensor], batch_size: int = 64, device: str = "cpu"
) -> Tensor:
    """Features (N, D) float64 of uint8 images (N, 3, H, W) (or an iterable of such batches)."""
    extractor = extractor.to(device)
    batches = images.split(batch_size) if isinstance(images, Tensor) else images
    out = []
    for batch in batches:
        if batch.dtype != torch.uint8:
            raise ValueError(f"feature extractors take uint8 images, got {batch.dtype}")
        feats = extractor(batch.to(device))
        out.append(feats.reshape(len(batch), -1).double().cpu())
    if not out:
        raise UserError("no images to compute features of (the image set is empty).")
    return torch.cat(out)
