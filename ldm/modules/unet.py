"""The latent-diffusion UNet (Rombach et al. 2022) with CompVis / Stable Diffusion parameter names.

A state dict saved by CompVis under `model.diffusion_model.` loads here after stripping that prefix.
"""

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ldm.errors import UserError
from ldm.modules.attention import AttentionBlock, SpatialTransformer, normalization, zero_module
from ldm.modules.embeddings import timestep_embedding


class ResBlock(nn.Module):
    """Residual block with a timestep embedding (Ho et al. 2020; CompVis / guided-diffusion `ResBlock`).

    The embedding is added to the features, or with `use_scale_shift_norm` applied FiLM-style after the
    output norm: h = norm(h) * (1 + scale) + shift, where (scale, shift) = emb_layers(emb) (Dhariwal & Nichol
    2021, "adaptive group normalisation"). With `up` / `down` (guided-diffusion's `resblock_updown`) the
    block also halves or doubles the resolution, resampling both branches in the middle of `in_layers`.
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        out_channels: int | None = None,
        dropout: float = 0.0,
        use_checkpoint: bool = False,
        use_scale_shift_norm: bool = False,  # emb_layers output 2*C_out: a scale and a shift
        up: bool = False,  # 2x nearest upsampling inside the block (no parameters)
        down: bool = False,  # 2x2 average pooling inside the block (no parameters)
    ) -> None:
        super().__init__()
        out_channels = out_channels or channels
        self.use_checkpoint = use_checkpoint
        self.use_scale_shift_norm = use_scale_shift_norm
        self.up = up
        self.in_layers = nn.Sequential(
            normalization(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.updown = up or down
        if up:  # CompVis names h_upd / x_upd; parameter-free, so no checkpoint keys
            self.h_upd: nn.Module = Upsample(channels, use_conv=False)
            self.x_upd: nn.Module = Upsample(channels, use_conv=False)
        elif down:
            self.h_upd = Downsample(channels, use_conv=False)
            self.x_upd = Downsample(channels, use_conv=False)
        emb_out = 2 * out_channels if use_scale_shift_norm else out_channels
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, emb_out))
        self.out_layers = nn.Sequential(
            normalization(out_channels),
            nn.SiLU(),
            nn.Dropout(dropout),
            zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1)),  # block starts as identity
        )
        if out_channels == channels:
            self.skip_connection: nn.Module = nn.Identity()
        else:
            self.skip_connection = nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: Tensor, emb: Tensor, size: Sequence[int] | None = None) -> Tensor:
        """x (N, C, H, W), emb (N, E) -> (N, C_out, H', W'); `size`: target side of an `up` block."""
        if self.use_checkpoint and torch.is_grad_enabled():
            return checkpoint(self._forward, x, emb, size, use_reentrant=False)
        return self._forward(x, emb, size)

    def _forward(self, x: Tensor, emb: Tensor, size: Sequence[int] | None = None) -> Tensor:
        if self.updown:
            h = self.in_layers[:-1](x)  # norm + SiLU at the input resolution
            h = self.h_upd(h, size) if self.up else self.h_upd(h)
            x = self.x_upd(x, size) if self.up else self.x_upd(x)
            h = self.in_layers[-1](h)  # (N, C_out, H', W')
        else:
            h = self.in_layers(x)  # (N, C_out, H, W)
        emb_out = self.emb_layers(emb).to(h.dtype)[:, :, None, None]  # (N, C_out or 2*C_out, 1, 1)
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class Downsample(nn.Module):
    """Halve the resolution with a stride-2 3x3 convolution, or 2x2 average pooling."""

    def __init__(self, channels: int, use_conv: bool = True) -> None:
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1) if use_conv else nn.AvgPool2d(2)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)  # (N, C, ceil(H/2), ceil(W/2))


class Upsample(nn.Module):
    """Nearest-neighbour upsampling (2x, or to the skip connection's size) and an optional 3x3 conv."""

    def __init__(self, channels: int, use_conv: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1) if use_conv else None

    def forward(self, x: Tensor, size: Sequence[int] | None = None) -> Tensor:
        # An explicit size lets latents whose sides are not multiples of 2^levels round-trip.
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")  # (N, C, 2H, 2W)
        else:
            x = F.interpolate(x, size=tuple(size), mode="nearest")
        return x if self.conv is None else self.conv(x)


class TimestepEmbedSequential(nn.Sequential):
    """A sequence of UNet layers; each gets the inputs it needs (embedding, context or target size)."""

    def forward(  # type: ignore[override]
        self, x: Tensor, emb: Tensor, context: Tensor | None = None, size: Sequence[int] | None = None
    ) -> Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb, size if layer.up else None)  # only an upsampling block takes the size
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, size)
            else:
                x = layer(x)
        return x


def attention_block_heads(
    ch: int, num_heads: int, num_head_channels: int, heads_here: int, legacy: bool
) -> int:
    """Heads of a self-attention `AttentionBlock` of `ch` channels, by CompVis' rules.

    A set `num_head_channels` gives ch // num_head_channels heads. Otherwise the legacy rule uses `heads_here`
    (num_heads, or num_heads_upsample in the decoder), and the non-legacy one ch // (ch // num_heads) heads
    everywhere (CompVis passes a head width derived from num_heads, so num_heads_upsample has no effect).
    """
    if num_head_channels != -1:
        return ch // num_head_channels
    if legacy:
        return heads_here
    return ch // (ch // num_heads)


class UNetModel(nn.Module):
    """Denoising UNet eps_theta(x_t, t, c) of latent diffusion (Rombach et al. 2022; Ho et al. 2020)."""

    def __init__(
        self,
        in_channels: int,  # latent channels, plus any concatenated conditioning (inpainting: 4+4+1)
        out_channels: int,  # latent channels
        model_channels: int,  # width of the first level; the timestep embedding is 4x wider
        num_res_blocks: int,  # ResBlocks per level on the way down (one more on the way up)
        attention_resolutions: Sequence[int],  # downsampling factors (1, 2, 4, ...) that get attention
        channel_mult: Sequence[int] = (1, 2, 4, 8),  # width multiplier per level
        num_heads: int = -1,  # heads per attention layer; -1: derive from num_head_channels
        num_head_channels: int = -1,  # width per head (SD v2: 64); -1: derive from num_heads
        transformer_depth: int = 1,  # transformer blocks per SpatialTransformer
        context_dim: int | None = None,  # cross-attention width (SD v1: 768); None: plain self-attention
        num_classes: int | None = None,  # class-conditional: a label embedding is added to the time one
        use_linear_in_transformer: bool = False,  # SD v2 projects in/out with Linear instead of 1x1 conv
        disable_self_attentions: Sequence[bool] | None = None,  # per level: attn1 attends to the context
        disable_middle_self_attn: bool = False,  # the same for the middle block (SD x4 upscaler: False)
        num_attention_blocks: Sequence[int] | None = None,  # per level: only the first n blocks get attention
        use_checkpoint: bool = False,  # gradient checkpointing: ~30% slower steps for far less memory
        dropout: float = 0.0,  # inside ResBlocks only, as in CompVis
        conv_resample: bool = True,  # learned down/upsampling convs (False: average pooling / copy)
        num_heads_upsample: int = -1,  # heads of the decoder's AttentionBlocks (-1: num_heads; legacy only)
        use_scale_shift_norm: bool = False,  # FiLM the ResBlocks' output norm with the time embedding
        resblock_updown: bool = False,  # resample with up/down ResBlocks instead of Downsample/Upsample
        use_new_attention_order: bool = False,  # AttentionBlock qkv channels as [q | k | v], else per head
        legacy: bool = True,  # CompVis head-width rule: dim_head = ch // heads (same for divisible widths)
        pooled_context: bool = False,  # also add an MLP of the mean-pooled context to the time embedding
    ) -> None:
        super().__init__()
        if num_heads == -1 and num_head_channels == -1:
            raise UserError("UNetModel: set either num_heads or num_head_channels (both are -1)")
        for mult in channel_mult:
            if (model_channels * mult) % 32:
                raise UserError(
                    f"UNetModel: model_channels * channel_mult = {model_channels * mult} is not a multiple "
                    "of 32, the GroupNorm group count; choose model_channels and channel_mult accordingly"
                )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.model_channels = model_channels
        self.num_classes = num_classes
        self.context_dim = context_dim
        attention_resolutions = {int(r) for r in attention_resolutions}
        channel_mult = [int(m) for m in channel_mult]

        levels = len(channel_mult)
        for key, value in (
            ("disable_self_attentions", disable_self_attentions),
            ("num_attention_blocks", num_attention_blocks),
        ):
            if value is not None and len(value) != levels:
                raise UserError(
                    f"UNet config: {key} has {len(value)} entries but channel_mult has {levels} levels; "
                    f"give one entry per level"
                )

        def has_attention(ds: int, level: int, block: int) -> bool:
            """Attention at the listed resolutions, in the first num_attention_blocks[level] blocks."""
            return ds in attention_resolutions and (
                num_attention_blocks is None or block < int(num_attention_blocks[level])
            )

        def attention(ch: int, decoder: bool = False, no_self_attn: bool = False) -> nn.Module:
            heads = num_heads if num_head_channels == -1 else ch // num_head_channels
            if context_dim is None:  # CompVis use_spatial_transformer=False: no cross-attention
                self_heads = attention_block_heads(
                    ch, num_heads, num_head_channels, heads_up if decoder else num_heads, legacy
                )
                return AttentionBlock(ch, self_heads, use_checkpoint, use_new_attention_order)
            dim_head = ch // heads if (legacy or num_head_channels == -1) else num_head_channels
            return SpatialTransformer(
                ch,
                heads,
                dim_head,
                depth=transformer_depth,
                context_dim=context_dim,
                use_linear=use_linear_in_transformer,
                use_checkpoint=use_checkpoint,
                disable_self_attn=bool(no_self_attn),
            )

        heads_up = num_heads if num_heads_upsample == -1 else num_heads_upsample

        def resblock(ch: int, out_ch: int, up: bool = False, down: bool = False) -> ResBlock:
            return ResBlock(
                ch, time_embed_dim, out_ch, dropout, use_checkpoint, use_scale_shift_norm, up=up, down=down
            )

        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, time_embed_dim), nn.SiLU(), nn.Linear(time_embed_dim, time_embed_dim)
        )
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, time_embed_dim)
        self.pooled_context = bool(pooled_context)
        if self.pooled_context:
            # Imagen (Saharia et al. 2022, Sec. 2.4) adds a pooled text embedding to the timestep embedding:
            # global attributes (colours, the class of a scene) are learned far sooner than through
            # cross-attention alone. Not in SD v1, so off by default (CompVis checkpoints have no such keys).
            if context_dim is None:
                raise UserError(
                    "UNetModel: pooled_context=true needs context_dim (a cross-attention context)"
                )
            self.context_emb = nn.Sequential(
                nn.Linear(context_dim, time_embed_dim), nn.SiLU(), nn.Linear(time_embed_dim, time_embed_dim)
            )

        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(nn.Conv2d(in_channels, model_channels, 3, padding=1))]
        )
        skip_channels = [model_channels]
        ch, ds = model_channels, 1  # current width and downsampling factor
        for level, mult in enumerate(channel_mult):
            no_self_attn = bool(disable_self_attentions[level]) if disable_self_attentions else False
            for block in range(num_res_blocks):
                layers = [resblock(ch, model_channels * mult)]
                ch = model_channels * mult
                if has_attention(ds, level, block):
                    layers.append(attention(ch, no_self_attn=no_self_attn))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(channel_mult) - 1:
                down = resblock(ch, ch, down=True) if resblock_updown else Downsample(ch, conv_resample)
                self.input_blocks.append(TimestepEmbedSequential(down))
                skip_channels.append(ch)
                ds *= 2

        middle_attention = attention(ch, no_self_attn=disable_middle_self_attn)
        self.middle_block = TimestepEmbedSequential(resblock(ch, ch), middle_attention, resblock(ch, ch))

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            no_self_attn = bool(disable_self_attentions[level]) if disable_self_attentions else False
            for i in range(num_res_blocks + 1):
                layers = [resblock(ch + skip_channels.pop(), model_channels * mult)]
                ch = model_channels * mult
                if has_attention(ds, level, i):
                    layers.append(attention(ch, decoder=True, no_self_attn=no_self_attn))
                if level and i == num_res_blocks:
                    up = resblock(ch, ch, up=True) if resblock_updown else Upsample(ch, conv_resample)
                    layers.append(up)
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            normalization(ch), nn.SiLU(), zero_module(nn.Conv2d(model_channels, out_channels, 3, padding=1))
        )

    @classmethod
    def from_compvis_config(cls, params: Mapping[str, Any]) -> "UNetModel":
        """Build from the `unet_config.params` of a CompVis/SD yaml (keys we do not model must be unset)."""
        params = dict(params)
        params.pop("image_size", None)  # CompVis only stores it
        params.pop("use_fp16", None)  # a no-op in CompVis (its fp16 conversion functions are empty)
        spatial = params.pop("use_spatial_transformer", params.get("context_dim") is not None)
        if bool(spatial) != (params.get("context_dim") is not None):
            raise UserError(
                f"UNet config: use_spatial_transformer={spatial} needs context_dim to be "
                f"{'set' if spatial else 'null'} (got {params.get('context_dim')})"
            )
        if params.get("num_heads_upsample", -1) in (-1, params.get("num_heads", -1)):
            params.pop("num_heads_upsample", None)
        unsupported_defaults = {
            "dims": 2,
            "n_embed": None,
            "adm_in_channels": None,
        }
        for key, default in unsupported_defaults.items():
            if key in params and params.pop(key) != default:
                raise UserError(
                    f"UNet config: {key} is not supported by ldm.modules.unet.UNetModel; remove it"
                )
        if isinstance(params.get("num_classes"), str):
            raise UserError(f"UNet config: num_classes must be an integer, got {params['num_classes']!r}")
        try:
            return cls(**params)
        except TypeError as err:
            raise UserError(f"UNet config: {err}; see UNetModel.__init__ for the accepted keys") from err

    def forward(
        self, x: Tensor, timesteps: Tensor, context: Tensor | None = None, y: Tensor | None = None
    ) -> Tensor:
        """Predict the model output for noisy latents x (N, C_in, H, W) at (possibly fractional) timesteps."""
        if (y is None) != (self.num_classes is None):
            raise ValueError("UNetModel: pass y (class labels) if and only if num_classes is set")
        if context is None and self.context_dim is not None:
            raise ValueError(f"UNetModel: pass context (N, L, {self.context_dim}) for cross-attention")
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(x.shape[0])
        t_emb = timestep_embedding(timesteps, self.model_channels)  # (N, C) float32
        emb = self.time_embed(t_emb.to(self.time_embed[0].weight.dtype))  # (N, 4C)
        if y is not None:
            emb = emb + self.label_emb(y)
        if self.pooled_context:
            emb = emb + self.context_emb(context.mean(dim=1).to(emb.dtype))  # (N, L, D) -> (N, 4C)

        skips = []
        h = x  # (N, C_in, H, W)
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)  # (N, C_max, H/2^L, W/2^L)
        for block in self.output_blocks:
            h = torch.cat([h, skips.pop()], dim=1)  # (N, C + C_skip, h, w)
            h = block(h, emb, context, skips[-1].shape[-2:] if skips else None)
        return self.out(h)  # (N, C_out, H, W)
