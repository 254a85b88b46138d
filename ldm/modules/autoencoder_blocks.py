"""Encoder and decoder of the first-stage autoencoder (Esser et al. 2021; Rombach et al. 2022), CompVis names.

Parameter names match CompVis `ldm/modules/diffusionmodules/model.py` one to one (`down.N.block.M.conv1`,
`mid.attn_1.q`, `up.N.upsample.conv`, ...), so released Stable Diffusion VAE weights load without renaming.
The downsampling factor is f = 2 ** (len(ch_mult) - 1).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from ldm.errors import UserError
from ldm.modules.attention import GroupNorm32


def Normalize(in_channels: int, num_groups: int = 32) -> nn.GroupNorm:  # CompVis name
    """GroupNorm (Wu & He 2018) with eps=1e-6 as in CompVis, computed in float32 for half-precision inputs.

    CompVis always uses 32 groups; we take gcd(num_groups, channels), which is 32 for every released config
    (channels are multiples of 32) and still works for narrow models (e.g. 16 channels).
    """
    return GroupNorm32(math.gcd(num_groups, in_channels), in_channels, eps=1e-6, affine=True)


def nonlinearity(x: Tensor) -> Tensor:
    """Swish / SiLU (Ramachandran et al. 2017)."""
    return F.silu(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 upsampling followed by a 3x3 convolution."""

    def __init__(self, in_channels: int, with_conv: bool = True) -> None:
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if self.with_conv else x


class Downsample(nn.Module):
    """x2 downsampling: stride-2 3x3 conv after asymmetric zero padding (right/bottom), as CompVis."""

    def __init__(self, in_channels: int, with_conv: bool = True) -> None:
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        if not self.with_conv:
            return F.avg_pool2d(x, kernel_size=2, stride=2)
        x = F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0)  # (left, right, top, bottom)
        return self.conv(x)


class ResnetBlock(nn.Module):
    """Pre-activation residual block (He et al. 2016): norm-swish-conv twice; 1x1 `nin_shortcut` if needed.

    The autoencoder has no timestep embedding, so CompVis' `temb_proj` (temb_channels=0) is not built.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int | None = None,
        conv_shortcut: bool = False,  # 3x3 instead of 1x1 shortcut; never used by released configs
        dropout: float = 0.0,
        norm_groups: int = 32,
    ) -> None:
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.norm1 = Normalize(in_channels, norm_groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm2 = Normalize(out_channels, norm_groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if in_channels != out_channels:
            if conv_shortcut:
                self.conv_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
            else:
                self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(nonlinearity(self.norm1(x)))
        h = self.conv2(self.dropout(nonlinearity(self.norm2(h))))
        if self.in_channels != self.out_channels:
            x = self.conv_shortcut(x) if hasattr(self, "conv_shortcut") else self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv q/k/v/proj_out and a residual connection."""

    def __init__(self, in_channels: int, norm_groups: int = 32) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.norm = Normalize(in_channels, norm_groups)
        self.q = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.k = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.v = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.proj_out = nn.Conv2d(in_channels, in_channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, height, width = x.shape
        h = self.norm(x)
        # (B, C, H, W) -> (B, 1, H*W, C): one head attending over all positions; SDPA scales by 1/sqrt(C)
        # contiguous (N, 1, HW, C): SDPA's flash / memory-efficient kernels need a unit last-dim stride
        q, k, v = (
            t.flatten(2).transpose(1, 2).contiguous().unsqueeze(1) for t in (self.q(h), self.k(h), self.v(h))
        )
        h = F.scaled_dot_product_attention(q, k, v)  # (B, 1, H*W, C)
        h = h.squeeze(1).transpose(1, 2).reshape(b, c, height, width)
        return x + self.proj_out(h)


def _check_attn_type(attn_type: str) -> None:
    # CompVis/SGM configs name their attention kernel; every "vanilla" variant is the same math as ours (SDPA)
    if attn_type not in ("vanilla", "vanilla-xformers", "sdpa", "none"):
        raise UserError(
            f"ddconfig.attn_type={attn_type!r} is not supported; use 'vanilla' (scaled dot-product "
            "attention) or 'none' (no attention layers, as LDM's inpainting_big first stage)"
        )


def _attention(channels: int, norm_groups: int, attn_type: str) -> nn.Module:
    """A self-attention layer, or a parameter-free identity for attn_type 'none' (CompVis `make_attn`)."""
    return nn.Identity() if attn_type == "none" else AttnBlock(channels, norm_groups)


class Encoder(nn.Module):
    """Image (B, in_channels, H, W) -> latent moments (B, 2*z_channels or z_channels, H/f, W/f)."""

    def __init__(
        self,
        *,
        ch: int,  # base width; level i has ch * ch_mult[i] channels
        out_ch: int,  # unused by the encoder; part of the shared ddconfig
        ch_mult: Sequence[int] = (1, 2, 4, 8),  # one entry per resolution level; f = 2**(len-1)
        num_res_blocks: int,  # residual blocks per level
        attn_resolutions: Sequence[int],  # feature-map sizes (given `resolution`) that get self-attention
        dropout: float = 0.0,
        resamp_with_conv: bool = True,
        in_channels: int,
        resolution: int,  # nominal input size; only decides where attention goes
        z_channels: int,
        double_z: bool = True,  # output mean and log-variance (KL) or a single latent (VQ)
        attn_type: str = "vanilla",
        # GroupNorm groups; 32 as CompVis. Narrow models (ch < 64) learn much faster with fewer, e.g. 4:
        # 32 groups of 16 or 32 channels normalise every channel alone and wash out per-image colour.
        norm_groups: int = 32,
    ) -> None:
        super().__init__()
        _check_attn_type(attn_type)
        self.ch = ch
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.resolution = resolution
        self.in_channels = in_channels
        attn_resolutions = [int(r) for r in attn_resolutions]

        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, stride=1, padding=1)
        curr_res = resolution
        in_ch_mult = (1, *ch_mult)
        self.down = nn.ModuleList()
        block_in = ch
        for i_level in range(self.num_resolutions):
            block = nn.ModuleList()
            attn = nn.ModuleList()
            block_in = ch * in_ch_mult[i_level]
            block_out = ch * ch_mult[i_level]
            for _ in range(num_res_blocks):
                block.append(ResnetBlock(block_in, block_out, dropout=dropout, norm_groups=norm_groups))
                block_in = block_out
                if curr_res in attn_resolutions:
                    attn.append(_attention(block_in, norm_groups, attn_type))
            down = nn.Module()
            down.block = block
            down.attn = attn
            if i_level != self.num_resolutions - 1:
                down.downsample = Downsample(block_in, resamp_with_conv)
                curr_res //= 2
            self.down.append(down)

        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, dropout=dropout, norm_groups=norm_groups)
        self.mid.attn_1 = _attention(block_in, norm_groups, attn_type)
        self.mid.block_2 = ResnetBlock(block_in, block_in, dropout=dropout, norm_groups=norm_groups)

        self.norm_out = Normalize(block_in, norm_groups)
        out_channels = 2 * z_channels if double_z else z_channels
        self.conv_out = nn.Conv2d(block_in, out_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)  # (B, ch, H, W)
        for i_level, down in enumerate(self.down):
            for i_block, block in enumerate(down.block):
                h = block(h)
                if len(down.attn) > 0:
                    h = down.attn[i_block](h)
            if i_level != self.num_resolutions - 1:
                h = down.downsample(h)  # (B, C, H/2, W/2)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(nonlinearity(self.norm_out(h)))  # (B, 2*z or z, H/f, W/f)


class Decoder(nn.Module):
    """Latent (B, z_channels, h, w) -> image (B, out_ch, h*f, w*f); `up` indexed like `down` (0 = finest)."""

    def __init__(
        self,
        *,
        ch: int,
        out_ch: int,  # image channels produced
        ch_mult: Sequence[int] = (1, 2, 4, 8),
        num_res_blocks: int,  # the decoder has num_res_blocks + 1 blocks per level, as CompVis
        attn_resolutions: Sequence[int],
        dropout: float = 0.0,
        resamp_with_conv: bool = True,
        in_channels: int,  # unused by the decoder; part of the shared ddconfig
        resolution: int,
        z_channels: int,
        double_z: bool = True,  # unused by the decoder; part of the shared ddconfig
        attn_type: str = "vanilla",
        # GroupNorm groups; 32 as CompVis. Narrow models (ch < 64) learn much faster with fewer, e.g. 4:
        # 32 groups of 16 or 32 channels normalise every channel alone and wash out per-image colour.
        norm_groups: int = 32,
    ) -> None:
        super().__init__()
        _check_attn_type(attn_type)
        self.ch = ch
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.resolution = resolution
        self.z_channels = z_channels
        attn_resolutions = [int(r) for r in attn_resolutions]

        block_in = ch * ch_mult[-1]
        curr_res = resolution // 2 ** (self.num_resolutions - 1)
        self.conv_in = nn.Conv2d(z_channels, block_in, kernel_size=3, stride=1, padding=1)

        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, dropout=dropout, norm_groups=norm_groups)
        self.mid.attn_1 = _attention(block_in, norm_groups, attn_type)
        self.mid.block_2 = ResnetBlock(block_in, block_in, dropout=dropout, norm_groups=norm_groups)

        up_levels: list[nn.Module] = []
        for i_level in reversed(range(self.num_resolutions)):
            block = nn.ModuleList()
            attn = nn.ModuleList()
            block_out = ch * ch_mult[i_level]
            for _ in range(num_res_blocks + 1):
                block.append(ResnetBlock(block_in, block_out, dropout=dropout, norm_groups=norm_groups))
                block_in = block_out
                if curr_res in attn_resolutions:
                    attn.append(_attention(block_in, norm_groups, attn_type))
            up = nn.Module()
            up.block = block
            up.attn = attn
            if i_level != 0:
                up.upsample = Upsample(block_in, resamp_with_conv)
                curr_res *= 2
            up_levels.insert(0, up)  # keep CompVis indexing: up.0 is the full-resolution level
        self.up = nn.ModuleList(up_levels)

        self.norm_out = Normalize(block_in, norm_groups)
        self.conv_out = nn.Conv2d(block_in, out_ch, kernel_size=3, stride=1, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.conv_in(z)  # (B, ch*ch_mult[-1], h, w)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for i_level in reversed(range(self.num_resolutions)):
            up = self.up[i_level]
            for i_block, block in enumerate(up.block):
                h = block(h)
                if len(up.attn) > 0:
                    h = up.attn[i_block](h)
            if i_level != 0:
                h = up.upsample(h)  # (B, C, 2h, 2w)
        return self.conv_out(nonlinearity(self.norm_out(h)))  # (B, out_ch, h*f, w*f)
