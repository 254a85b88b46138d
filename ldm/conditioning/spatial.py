"""Spatial conditions concatenated to the UNet input at latent resolution: inpainting, super-resolution,
semantic maps (Rombach et al. 2022, Sec. 4.3-4.5; SD-inpainting).

Null values (used for guidance only when the container is told not to keep concat conditions, or
when a concat conditioner has dropout > 0) are "a blank input" run through the same path:
inpainting -> everything masked (mask = 1, masked image = 0 -> encode_fn(zeros)); super-resolution ->
a zero (mid-grey) low-res image; semantic map -> an all-zero one-hot map (no class anywhere).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm.conditioning.base import BaseConditioner, EncodeFn, as_image_batch, get_input
from ldm.errors import UserError


def resize(x: Tensor, size: Sequence[int], mode: str) -> Tensor:
    """(B,C,H,W) -> (B,C,*size); identity when already that size (exact, no resampling)."""
    size = (int(size[0]), int(size[1]))
    if tuple(x.shape[-2:]) == size:
        return x
    antialias = mode in ("bilinear", "bicubic")  # low-pass when shrinking, like PIL
    return F.interpolate(x, size=size, mode=mode, antialias=antialias)


def _encode(encode_fn: EncodeFn | None, pixels: Tensor, channels: int, owner: nn.Module) -> Tensor:
    """Scaled latents of `pixels` from the frozen autoencoder, checked to have `channels` channels."""
    if encode_fn is None:
        raise ValueError(
            f"{type(owner).__name__} needs the frozen autoencoder: pass encode_fn=<pixels -> scaled latents> "
            "to the call, or call Conditioner.set_encode_fn once."
        )
    with torch.no_grad():
        latents = encode_fn(pixels)
    if latents.shape[1] != channels:
        raise UserError(
            f"The autoencoder gives {latents.shape[1]} latent channels but {type(owner).__name__} was built "
            f"with latent_channels={channels}; set latent_channels: {latents.shape[1]}."
        )
    return latents


def as_mask(value: Any, name: str) -> Tensor:
    """A mask (H,W), (B,H,W) or (B,1,H,W) as float (B,1,H,W); 1 = pixels to generate."""
    if not isinstance(value, Tensor) or value.ndim not in (2, 3, 4):
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise UserError(f"'{name}' must be a tensor (H,W), (B,H,W) or (B,1,H,W), got {shape}.")
    mask = value[None, None] if value.ndim == 2 else value[:, None] if value.ndim == 3 else value
    if mask.shape[1] != 1:
        raise UserError(f"'{name}' must have one channel, got shape {tuple(value.shape)}.")
    return mask.float()


class InpaintingConditioner(BaseConditioner):
    """[mask at latent size, encode_fn(masked image)] -> (B, 1 + latent_channels, h, w), as SD-inpainting.

    The UNet sees cat([z_t, mask, z_masked]) (9 input channels for SD's 4 latent channels). The LDM paper's
    inpainting model (`models/ldm/inpainting_big`, its `scripts/inpaint.py`) differs in three ways, each an
    option here: the order is [z_masked, mask] (`order="image_first"`), the mask is in {-1, 1}
    (`mask_range="pm1"`), and masked pixels are black, -1, rather than 0 (`masked_fill=-1`).
    """

    output = "concat"

    def __init__(
        self,
        latent_channels: int = 4,  # the autoencoder's embed_dim (4 for SD's f=8 KL autoencoder)
        mask_mode: str = "nearest",  # SD-inpainting resizes the mask with nearest neighbours
        image_key: str = "masked_image",
        mask_key: str = "mask",
        dropout: float = 0.0,  # SD-inpainting never drops the masked image
        order: str = "mask_first",  # "mask_first": [mask, latents] (SD); "image_first": [latents, mask] (LDM)
        mask_range: str = "01",  # the mask's values as the UNet sees them: "01" (SD) or "pm1" = 2m-1 (LDM)
        masked_fill: float = 0.0,  # value of the masked pixels of the masked image (LDM: -1, black)
    ) -> None:
        super().__init__(dropout)
        if order not in ("mask_first", "image_first"):
            raise UserError(f"InpaintingConditioner: order={order!r}; use 'mask_first' or 'image_first'.")
        if mask_range not in ("01", "pm1"):
            raise UserError(f"InpaintingConditioner: mask_range={mask_range!r}; use '01' or 'pm1'.")
        self.input_keys = (image_key, mask_key)
        self.latent_channels = int(latent_channels)
        self.mask_mode = mask_mode
        self.order = order
        self.mask_range = mask_range
        self.masked_fill = float(masked_fill)

    @property
    def out_dim(self) -> int:
        return 1 + self.latent_channels

    def prepare(self, inputs: Mapping[str, Any]) -> dict[str, Any]:
        """Also accepts "image" instead of "masked_image": masked_image = image * (1 - mask)."""
        image_key, mask_key = self.input_keys
        mask = as_mask(get_input(inputs, mask_key, self), mask_key)
        if image_key not in inputs and "image" in inputs:
            image = as_image_batch(inputs["image"], "image")
            return {image_key: image * (1 - mask.to(image.device)), mask_key: mask}
        return {image_key: as_image_batch(get_input(inputs, image_key, self), image_key), mask_key: mask}

    def forward(
        self,
        batch: Mapping[str, Any],
        *,
        encode_fn: EncodeFn | None = None,
        latent_size: tuple[int, int] | None = None,
    ) -> Tensor:
        masked_image, mask = self._read(batch)
        return self._concat(masked_image, mask, encode_fn)

    def null(
        self,
        batch: Mapping[str, Any],
        *,
        encode_fn: EncodeFn | None = None,
        latent_size: tuple[int, int] | None = None,
    ) -> Tensor:
        masked_image, mask = self._read(batch)
        return self._concat(torch.zeros_like(masked_image), torch.ones_like(mask), encode_fn)

    def _read(self, batch: Mapping[str, Any]) -> tuple[Tensor, Tensor]:
        """(masked image (B,3,H,W), mask (B,1,H,W)) from the batch, checked."""
        image_key, mask_key = self.input_keys
        masked_image = as_image_batch(get_input(batch, image_key, self), image_key)
        return masked_image, as_mask(get_input(batch, mask_key, self), mask_key)

    def _concat(self, masked_image: Tensor, mask: Tensor, encode_fn: EncodeFn | None) -> Tensor:
        if self.masked_fill:  # masked pixels (0 in the task's masked image) -> masked_fill
            mask_px = mask.to(masked_image)
            masked_image = masked_image * (1 - mask_px) + self.masked_fill * mask_px
        latents = _encode(encode_fn, masked_image, self.latent_channels, self)  # (B, C, h, w)
        mask = mask.to(latents) if self.mask_range == "01" else 2 * mask.to(latents) - 1
        mask = resize(mask, latents.shape[-2:], self.mask_mode)  # (B, 1, h, w)
        parts = [mask, latents] if self.order == "mask_first" else [latents, mask]
        return torch.cat(parts, dim=1)  # (B, 1 + C, h, w)


class SuperResConditioner(BaseConditioner):
    """Low-res image resized to latent resolution -> (B, 3, h, w), as LDM-SR (or its latents, encode=True).

    LDM-SR (x4, f=4 autoencoder) concatenates the 64x64 low-res pixels to the 64x64 latent, so
    `upscale` (latent size / low-res size) is 1 there. SD's x4 upscaler also noises the low-res image
    (`ldm.conditioning.noise_augment.NoiseAugmentedLowRes`, a subclass).
    """

    output = "concat"

    def __init__(
        self,
        upscale: float = 1.0,  # latent size / size of the low-res input (or of its latents if encode)
        mode: str = "bicubic",
        encode: bool = False,  # True: concat encode_fn(lowres) instead of the pixels
        latent_channels: int = 4,  # used only when encode=True
        input_key: str = "lowres",
        dropout: float = 0.0,
    ) -> None:
        super().__init__(dropout)
        self.input_keys = (input_key,)
        self.upscale = float(upscale)
        self.mode = mode
        self.encode = bool(encode)
        self.latent_channels = int(latent_channels)

    @property
    def out_dim(self) -> int:
        return self.latent_channels if self.encode else 3

    def prepare(self, inputs: Mapping[str, Any]) -> dict[str, Any]:
        key = self.input_keys[0]
        return {key: as_image_batch(get_input(inputs, key, self), key)}

    def forward(
        self,
        batch: Mapping[str, Any],
        *,
        encode_fn: EncodeFn | None = None,
        latent_size: tuple[int, int] | None = None,
    ) -> Tensor:
        key = self.input_keys[0]
        lowres = as_image_batch(get_input(batch, key, self), key)
        return self.augment(self._resized(lowres, encode_fn, latent_size), batch)

    def null(
        self,
        batch: Mapping[str, Any],
        *,
        encode_fn: EncodeFn | None = None,
        latent_size: tuple[int, int] | None = None,
    ) -> Tensor:
        key = self.input_keys[0]
        lowres = as_image_batch(get_input(batch, key, self), key)
        return self.augment(self._resized(torch.zeros_like(lowres), encode_fn, latent_size), batch)

    def augment(self, x: Tensor, batch: Mapping[str, Any]) -> Tensor:
        """Hook for subclasses (SD x4's noise augmentation, `NoiseAugmentedLowRes`); identity here."""
        return x

    def _resized(
        self, lowres: Tensor, encode_fn: EncodeFn | None, latent_size: Sequence[int] | None
    ) -> Tensor:
        x = _encode(encode_fn, lowres, self.latent_channels, self) if self.encode else lowres
        if latent_size is None:
            latent_size = [round(s * self.upscale) for s in x.shape[-2:]]
        return resize(x, latent_size, self.mode)  # (B, C, h, w)


def read_segmap(
    batch: Mapping[str, Any], key: str, num_classes: int, owner: nn.Module, option: str
) -> Tensor:
    """`batch[key]` as int64 (B,H,W), checked to hold class ids in [0, num_classes) (`option` names it)."""
    seg = get_input(batch, key, owner)
    if not isinstance(seg, Tensor) or seg.is_floating_point() or seg.ndim not in (2, 3, 4):
        raise UserError(f"'{key}' must be an integer tensor (H,W), (B,H,W) or (B,1,H,W).")
    seg = seg[None] if seg.ndim == 2 else seg[:, 0] if seg.ndim == 4 else seg
    if seg.numel() and (int(seg.min()) < 0 or int(seg.max()) >= num_classes):
        raise UserError(
            f"'{key}' holds class ids from {int(seg.min())} to {int(seg.max())}, but "
            f"{type(owner).__name__} has {option}={num_classes}; set {option} to "
            "(largest id + 1) or map ignore labels (e.g. 255) to 0 in the data transform."
        )
    return seg.long()


def one_hot_area(segmap: Tensor, num_classes: int, size: Sequence[int]) -> Tensor:
    """Fraction of each latent cell covered by each class, (B,K,h,w) = area-resized one-hot of (B,H,W).

    For integer factors it counts pixels with one scatter_add at latent size instead of building the
    full-resolution one-hot (182 classes at 512x512 would be 190 MB per image).
    """
    (b, height, width), (h, w) = segmap.shape, (int(size[0]), int(size[1]))
    if height % h or width % w:
        one_hot = F.one_hot(segmap, num_classes).permute(0, 3, 1, 2).float()
        return F.interpolate(one_hot, size=(h, w), mode="area")
    fy, fx = height // h, width // w
    rows = torch.arange(height, device=segmap.device) // fy
    cols = torch.arange(width, device=segmap.device) // fx
    cell = rows[:, None] * w + cols[None, :]  # (H, W): index of the latent cell of each pixel
    index = (segmap * (h * w) + cell).flatten(1)  # (B, H*W) into (K, h, w) flattened
    counts = torch.zeros(b, num_classes * h * w, device=segmap.device)
    counts.scatter_add_(1, index, torch.ones_like(index, dtype=counts.dtype))
    return counts.view(b, num_classes, h, w) / (fy * fx)


class SemanticMapConditioner(BaseConditioner):
    """Integer class map -> one-hot (K) at latent resolution [-> learned 1x1 conv], as LDM semantic synthesis.

    LDM's `SpatialRescaler` halved the one-hot map n_stages times (bilinear) and remapped channels
    with a bias-free 1x1 conv (182 COCO-stuff classes -> 3); "area" resizing equals those halvings.
    """

    output = "concat"

    def __init__(
        self,
        num_classes: int,  # classes in the map, 0 = background
        downsample_factor: int = 8,  # autoencoder's f (8 for SD's); ignored when latent_size is given
        mode: str = "area",  # "area": class fractions per latent cell; "nearest": hard one-hot
        out_channels: int | None = None,  # learned 1x1 channel remap (LDM: 182 -> 3); None = K channels
        input_key: str = "segmap",
        dropout: float = 0.0,
    ) -> None:
        super().__init__(dropout)
        if mode not in ("area", "nearest"):
            raise UserError(f"SemanticMapConditioner: mode={mode!r}; use 'area' or 'nearest'.")
        self.input_keys = (input_key,)
        self.num_classes = int(num_classes)
        self.downsample_factor = int(downsample_factor)
        self.mode = mode
        self.remap = nn.Conv2d(num_classes, out_channels, 1, bias=False) if out_channels else None

    @property
    def out_dim(self) -> int:
        return self.remap.out_channels if self.remap is not None else self.num_classes

    def segmap(self, batch: Mapping[str, Any]) -> Tensor:
        """The batch's map as int64 (B,H,W), checked to hold ids in [0, num_classes)."""
        return read_segmap(batch, self.input_keys[0], self.num_classes, self, "num_classes")

    def latent_size(self, seg: Tensor, latent_size: Sequence[int] | None) -> tuple[int, int]:
        if latent_size is not None:
            return int(latent_size[0]), int(latent_size[1])
        return seg.shape[-2] // self.downsample_factor, seg.shape[-1] // self.downsample_factor

    def prepare(self, inputs: Mapping[str, Any]) -> dict[str, Any]:
        return {self.input_keys[0]: self.segmap(inputs)}

    def forward(
        self,
        batch: Mapping[str, Any],
        *,
        encode_fn: EncodeFn | None = None,
        latent_size: tuple[int, int] | None = None,
    ) -> Tensor:
        seg = self.segmap(batch)
        size = self.latent_size(seg, latent_size)
        if self.mode == "area":
            one_hot = one_hot_area(seg, self.num_classes, size)  # (B, K, h, w)
        else:
            small = F.interpolate(seg[:, None].float(), size=size, mode="nearest")[:, 0].long()
            one_hot = F.one_hot(small, self.num_classes).permute(0, 3, 1, 2).float()
        return one_hot if self.remap is None else self.remap(one_hot.to(self.remap.weight))

    def null(
        self,
        batch: Mapping[str, Any],
        *,
        encode_fn: EncodeFn | None = None,
        latent_size: tuple[int, int] | None = None,
    ) -> Tensor:
        seg = self.segmap(batch)
        size = self.latent_size(seg, latent_size)
        dtype = self.remap.weight.dtype if self.remap is not None else torch.float32
        # An empty one-hot map; the bias-free remap keeps it zero.
        return torch.zeros(seg.shape[0], self.out_dim, *size, device=seg.device, dtype=dtype)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, mode={self.mode!r}, " + super().extra_repr()


class SpatialRescaler(BaseConditioner):
    """One-hot class map, resized `n_stages` times by `multiplier`, [-> 1x1 conv] (LDM `SpatialRescaler`).

    The LDM paper's semantic synthesis (Sec. 4.3.2, `models/ldm/semantic_synthesis256`) concatenates the
    one-hot segmentation (182 COCO-stuff classes) shrunk twice by 1/2 (bilinear) to the f=4 latent, after a
    learned bias-free 1x1 conv to 3 channels: (B,H,W) ids -> (B, out_channels, H*m^n, W*m^n). The
    parameter names are the original's (`channel_mapper.weight`), so its `cond_stage_model.*` loads as is.
    """

    output = "concat"

    def __init__(
        self,
        n_stages: int = 1,  # resizing steps
        method: str = "bilinear",  # F.interpolate mode of each step
        multiplier: float = 0.5,  # scale factor of each step
        in_channels: int = 3,  # classes of the one-hot map (ids in [0, in_channels))
        out_channels: int | None = None,  # learned 1x1 channel remap; None: keep the in_channels maps
        bias: bool = False,
        input_key: str = "segmap",
        dropout: float = 0.0,
    ) -> None:
        super().__init__(dropout)
        methods = ("nearest", "bilinear", "bicubic", "area")
        if method not in methods or int(n_stages) < 0:
            raise UserError(
                f"SpatialRescaler: method={method!r}, n_stages={n_stages}; use one of {methods} and "
                "n_stages >= 0."
            )
        self.input_keys = (input_key,)
        self.n_stages = int(n_stages)
        self.method = method
        self.multiplier = float(multiplier)
        self.in_channels = int(in_channels)
        self.channel_mapper = (
            nn.Conv2d(self.in_channels, int(out_channels), 1, bias=bias) if out_channels else None
        )

    @property
    def out_dim(self) -> int:
        return self.channel_mapper.out_channels if self.channel_mapper is not None else self.in_channels

    def prepare(self, inputs: Mapping[str, Any]) -> dict[str, Any]:
        key = self.input_keys[0]
        return {key: read_segmap(inputs, key, self.in_channels, self, "in_channels")}

    def forward(
        self,
        batch: Mapping[str, Any],
        *,
        encode_fn: EncodeFn | None = None,
        latent_size: tuple[int, int] | None = None,
    ) -> Tensor:
        seg = read_segmap(batch, self.input_keys[0], self.in_channels, self, "in_channels")
        one_hot = F.one_hot(seg, self.in_channels).permute(0, 3, 1, 2)  # (B, K, H, W)
        return self._rescale(one_hot, latent_size)

    def null(
        self,
        batch: Mapping[str, Any],
        *,
        encode_fn: EncodeFn | None = None,
        latent_size: tuple[int, int] | None = None,
    ) -> Tensor:
        seg = read_segmap(batch, self.input_keys[0], self.in_channels, self, "in_channels")
        empty = torch.zeros(seg.shape[0], self.in_channels, *seg.shape[-2:], device=seg.device)
        return self._rescale(empty, latent_size)  # no class anywhere (a bias, if any, stays)

    def _rescale(self, maps: Tensor, latent_size: Sequence[int] | None) -> Tensor:
        dtype = self.channel_mapper.weight.dtype if self.channel_mapper is not None else torch.float32
        x = maps.to(dtype)
        for _ in range(self.n_stages):
            x = F.interpolate(x, scale_factor=self.multiplier, mode=self.method)  # (B, K, H*m, W*m)
        if latent_size is not None and tuple(x.shape[-2:]) != tuple(int(s) for s in latent_size):
            raise UserError(
                f"SpatialRescaler turns the {tuple(maps.shape[-2:])} segmap into {tuple(x.shape[-2:])} maps "
                f"but the latent is {tuple(latent_size)}: pass a segmap of the output image's size "
                f"(n_stages={self.n_stages} x multiplier={self.multiplier} must match the autoencoder's f)."
            )
        return x if self.channel_mapper is None else self.channel_mapper(x)  # (B, out_channels, h, w)

    def extra_repr(self) -> str:
        return (
            f"n_stages={self.n_stages}, method={self.method!r}, multiplier={self.multiplier}, "
            + super().extra_repr()
        )
