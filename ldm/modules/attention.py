"""Attention blocks of the latent-diffusion UNet (Rombach et al. 2022), with CompVis parameter names.

Every attention goes through `F.scaled_dot_product_attention`, which picks the flash or memory-efficient
kernel on GPU and a fused kernel on CPU. Those kernels accumulate the softmax in float32 even for
fp16/bf16 inputs, which is what CompVis' `ATTN_PRECISION="fp32"` buys, so no explicit upcast is needed.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


class GroupNorm32(nn.GroupNorm):
    """GroupNorm (Wu & He 2018) computed in float32 when the input is half precision, as CompVis does."""

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32:  # the common case: no casts, no copies
            return super().forward(x)
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).to(x.dtype)


def normalization(channels: int, eps: float = 1e-5) -> GroupNorm32:
    """The UNet's normalisation: 32 groups (CompVis `normalization`); SpatialTransformer uses eps=1e-6."""
    return GroupNorm32(32, channels, eps=eps)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a module's parameters so its residual branch starts as the identity (as in CompVis)."""
    for p in module.parameters():
        p.detach().zero_()
    return module


def _split_heads(x: Tensor, heads: int) -> Tensor:
    """(N, T, H*D) -> (N, H, T, D) as a view (SDPA accepts the strides)."""
    n, t, _ = x.shape
    return x.view(n, t, heads, -1).transpose(1, 2)


class CrossAttention(nn.Module):
    """Multi-head attention softmax(QK^T/sqrt(d))V (Vaswani et al. 2017); cross-attention given a context."""

    def __init__(
        self,
        query_dim: int,
        context_dim: int | None = None,  # None: keys/values come from the queries (self-attention)
        heads: int = 8,
        dim_head: int = 64,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        inner_dim = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim or query_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim or query_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(dropout))

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        source = x if context is None else context  # (N, S, Dc)
        q = _split_heads(self.to_q(x), self.heads)  # (N, H, T, D)
        k = _split_heads(self.to_k(source), self.heads)  # (N, H, S, D)
        v = _split_heads(self.to_v(source), self.heads)  # (N, H, S, D)
        out = F.scaled_dot_product_attention(q, k, v)  # (N, H, T, D)
        out = out.transpose(1, 2).flatten(2)  # (N, T, H*D)
        return self.to_out(out)


class GEGLU(nn.Module):
    """Gated GELU projection x·GELU(g) (Shazeer 2020), used in the transformer feed-forward."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: Tensor) -> Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    """Position-wise feed-forward GEGLU -> Linear with a 4x hidden width (Vaswani et al. 2017)."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        inner_dim = dim * mult
        # Sequential indices are part of the checkpoint names: net.0.proj, net.2.
        self.net = nn.Sequential(GEGLU(dim, inner_dim), nn.Dropout(dropout), nn.Linear(inner_dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm transformer block: self-attn, cross-attn, GEGLU feed-forward (Rombach et al. 2022)."""

    def __init__(
        self,
        dim: int,
        heads: int,
        dim_head: int,
        dropout: float = 0.0,
        context_dim: int | None = None,
        use_checkpoint: bool = False,
        disable_self_attn: bool = False,  # SD x4 upscaler: attn1 attends to the context as well
    ) -> None:
        super().__init__()
        self.use_checkpoint = use_checkpoint
        self.disable_self_attn = disable_self_attn
        # attn1 is self-attention, unless disabled: then a second cross-attention to the context.
        self.attn1 = CrossAttention(dim, context_dim if disable_self_attn else None, heads, dim_head, dropout)
        self.ff = FeedForward(dim, dropout=dropout)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head, dropout)  # self-attn if no context
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        if self.use_checkpoint and torch.is_grad_enabled():
            return checkpoint(self._forward, x, context, use_reentrant=False)
        return self._forward(x, context)

    def _forward(self, x: Tensor, context: Tensor | None) -> Tensor:
        x = x + self.attn1(self.norm1(x), context if self.disable_self_attn else None)  # (N, T, D)
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map, conditioned on `context` (Rombach et al. 2022, Sec. 3.3).

    `use_linear=False` projects in/out with 1x1 convolutions (SD v1), `True` with linear layers after
    flattening (SD v2); the parameters have the same names, only the weight shapes differ.
    `disable_self_attn=True` (SD x4 upscaler, `disable_self_attentions`) makes every block's attn1 attend
    to the context instead of the pixels (its to_k / to_v then read `context_dim` features).
    """

    def __init__(
        self,
        in_channels: int,
        heads: int,
        dim_head: int,
        depth: int = 1,
        dropout: float = 0.0,
        context_dim: int | None = None,
        use_linear: bool = False,
        use_checkpoint: bool = False,
        disable_self_attn: bool = False,
    ) -> None:
        super().__init__()
        inner_dim = heads * dim_head
        self.use_linear = use_linear
        self.norm = normalization(in_channels, eps=1e-6)
        if use_linear:
            self.proj_in = nn.Linear(in_channels, inner_dim)
        else:
            self.proj_in = nn.Conv2d(in_channels, inner_dim, kernel_size=1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(
                inner_dim, heads, dim_head, dropout, context_dim, use_checkpoint, disable_self_attn
            )
            for _ in range(depth)
        )
        if use_linear:
            self.proj_out = zero_module(nn.Linear(inner_dim, in_channels))
        else:
            self.proj_out = zero_module(nn.Conv2d(inner_dim, in_channels, kernel_size=1))

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        n, _, h, w = x.shape  # (N, C, H, W)
        x_in = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)  # (N, D, H, W)
        x = x.flatten(2).transpose(1, 2)  # (N, H*W, D)
        if self.use_linear:
            x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x, context)
        if self.use_linear:
            x = self.proj_out(x)  # (N, H*W, C)
        x = x.transpose(1, 2).reshape(n, -1, h, w)  # (N, D, H, W)
        if not self.use_linear:
            x = self.proj_out(x)  # (N, C, H, W)
        return x + x_in


class AttentionBlock(nn.Module):
    """Self-attention over pixels, no context (Ho et al. 2020; CompVis / guided-diffusion `AttentionBlock`).

    One 1x1 conv makes q, k, v: `qkv` (N, 3C, T). CompVis reads its channels in one of two orders, which
    decides how a checkpoint's weights are used:
    - legacy (`QKVAttentionLegacy`, default): heads outermost, [q_h | k_h | v_h] per head;
    - `new_order=True` (`QKVAttention`, `use_new_attention_order`): [q | k | v], each split into heads.
    """

    def __init__(
        self, channels: int, heads: int, use_checkpoint: bool = False, new_order: bool = False
    ) -> None:
        super().__init__()
        if channels % heads:
            raise ValueError(f"AttentionBlock: {channels} channels do not split into {heads} heads")
        self.heads = heads
        self.new_order = new_order
        self.use_checkpoint = use_checkpoint
        self.norm = normalization(channels)
        self.qkv = nn.Conv1d(channels, channels * 3, kernel_size=1)
        self.proj_out = zero_module(nn.Conv1d(channels, channels, kernel_size=1))

    def forward(self, x: Tensor) -> Tensor:
        if self.use_checkpoint and torch.is_grad_enabled():
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)

    def _forward(self, x: Tensor) -> Tensor:
        n, c, *spatial = x.shape  # (N, C, H, W)
        x = x.reshape(n, c, -1)  # (N, C, T)
        qkv = self.qkv(self.norm(x))  # (N, 3C, T)
        d = c // self.heads
        if self.new_order:  # (N, 3, H, D, T): q, k, v outermost
            q, k, v = qkv.view(n, 3, self.heads, d, -1).transpose(3, 4).unbind(1)  # each (N, H, T, D)
        else:  # (N, H, 3D, T): heads outermost, then q, k, v per head
            q, k, v = qkv.view(n, self.heads, 3 * d, -1).transpose(2, 3).chunk(3, dim=-1)
        out = F.scaled_dot_product_attention(q, k, v)  # (N, H, T, D)
        out = out.transpose(2, 3).reshape(n, c, -1)  # (N, C, T)
        return (x + self.proj_out(out)).reshape(n, c, *spatial)
