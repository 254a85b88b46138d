"""Vector quantisation bottleneck of VQ-VAE / VQGAN (van den Oord et al. 2017; Esser et al. 2021).

CompVis names (`embedding.weight`), so released VQ first stages load. Two options for healthier codebooks:
EMA codebook updates (van den Oord et al. 2017, appendix A.1) instead of the codebook loss, and restarting
dead codes from current encoder outputs (Dhariwal et al. 2020, Jukebox).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ldm.errors import UserError


def _all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum over data-parallel ranks (identity in a single process), so every rank keeps the same codebook."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def _broadcast(tensor: Tensor) -> Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast(tensor, src=0)
    return tensor


class VectorQuantizer(nn.Module):
    """Nearest-neighbour codebook lookup with a straight-through gradient (VQ-VAE eq. 3).

    `forward` returns (z_q, loss, info): the loss is ||sg[z] - e||^2 + beta * ||z - sg[e]||^2 (eq. 3; with
    EMA updates only the commitment term beta * ||z - sg[e]||^2), and info holds `indices` (B, h, w),
    `perplexity` (exp of the code-assignment entropy; k for a uniform use of k codes) and `codebook_usage`
    (fraction of codes used in this batch). The codebook changes (EMA, restarts) only in training mode with
    gradients enabled, so encoding in eval or under `torch.no_grad()` never touches it.
    """

    def __init__(
        self,
        n_embed: int,  # codebook size K
        embed_dim: int,  # code dimension (the latent channels)
        beta: float = 0.25,  # commitment weight (VQ-VAE paper: results robust in [0.1, 2.0])
        ema_decay: float | None = None,  # e.g. 0.99 (VQ-VAE A.1); None: learn the codebook by gradient
        restart_dead_codes: bool = False,
        dead_code_threshold: float = 1e-3,  # EMA count per step below which a code is dead (see below)
        ema_eps: float = 1e-5,  # Laplace smoothing of the EMA cluster sizes (Sonnet's default)
    ) -> None:
        super().__init__()
        if ema_decay is not None and not 0.0 < ema_decay < 1.0:
            raise UserError(f"VectorQuantizer: ema_decay={ema_decay} must be in (0, 1) (e.g. 0.99) or null")
        self.n_embed = n_embed
        self.embed_dim = embed_dim
        self.beta = beta
        self.ema_decay = ema_decay
        self.restart_dead_codes = restart_dead_codes
        self.dead_code_threshold = dead_code_threshold
        self.ema_eps = ema_eps

        self.embedding = nn.Embedding(n_embed, embed_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / n_embed, 1.0 / n_embed)  # taming's init
        if ema_decay is not None:
            # updated by the moving averages, not by the optimizer
            self.embedding.weight.requires_grad_(False)
            # As if every code had been assigned once to itself: e = sum / size = the initial codebook
            self.register_buffer("ema_cluster_size", torch.ones(n_embed))
            self.register_buffer("ema_embed_sum", self.embedding.weight.detach().clone())
        if restart_dead_codes:
            # Assignments per step, averaged with decay 0.99 (or ema_decay). Starting at 1, a never-used code
            # falls below the default threshold 1e-3 after ~690 steps and is then restarted.
            self.register_buffer("code_usage", torch.ones(n_embed))

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        b, c, h, w = z.shape
        if c != self.embed_dim:
            raise ValueError(
                f"VectorQuantizer expects {self.embed_dim} channels, got input of shape {tuple(z.shape)}"
            )
        z_last = z.permute(0, 2, 3, 1)  # (B, h, w, C)
        flat = z_last.reshape(-1, c).detach().float()  # (N, C); distances in float32 even under autocast
        # autocast would run the matmul in half precision and flip near-ties; keep the search in float32
        with torch.no_grad(), torch.autocast(z.device.type, enabled=False):
            codebook = self.embedding.weight.detach().float()  # (K, C)
            # ||z - e||^2 = ||z||^2 - 2 z.e + ||e||^2
            dist_sq = flat.pow(2).sum(1, keepdim=True) - 2.0 * flat @ codebook.t() + codebook.pow(2).sum(1)
            indices = dist_sq.argmin(dim=1)  # (N,)
            counts = torch.bincount(indices, minlength=self.n_embed).to(flat.dtype)  # (K,)
        z_q = F.embedding(indices, self.embedding.weight).view(b, h, w, c).to(z.dtype)

        if self.ema_decay is None:
            loss = F.mse_loss(z_q, z_last.detach()) + self.beta * F.mse_loss(z_last, z_q.detach())
        else:
            loss = self.beta * F.mse_loss(z_last, z_q.detach())

        if self.training and torch.is_grad_enabled():
            with torch.no_grad():
                global_counts = _all_reduce_sum(counts.clone())
                if self.ema_decay is not None:
                    self._ema_update(flat, indices, global_counts)
                if self.restart_dead_codes:
                    self._restart_dead_codes(flat, global_counts)

        z_q = z_last + (z_q - z_last).detach()  # straight-through estimator: gradient of z_q is copied to z
        probs = counts / counts.sum()
        info = {
            "indices": indices.view(b, h, w),
            "perplexity": torch.exp(-torch.special.xlogy(probs, probs).sum()),
            "codebook_usage": (counts > 0).float().mean(),
        }
        return z_q.permute(0, 3, 1, 2).contiguous(), loss, info

    def _ema_update(self, flat: Tensor, indices: Tensor, counts: Tensor) -> None:
        """N_i <- g N_i + (1-g) n_i ; m_i <- g m_i + (1-g) sum z ; e_i = m_i / N_i (VQ-VAE A.1, eqs. 6-8)."""
        decay = self.ema_decay
        embed_sum = torch.zeros_like(self.ema_embed_sum).index_add_(0, indices, flat)  # (K, C)
        _all_reduce_sum(embed_sum)
        self.ema_cluster_size.mul_(decay).add_(counts, alpha=1.0 - decay)
        self.ema_embed_sum.mul_(decay).add_(embed_sum, alpha=1.0 - decay)
        total = self.ema_cluster_size.sum()
        # Laplace smoothing keeps unused codes from dividing by zero
        size = (self.ema_cluster_size + self.ema_eps) / (total + self.n_embed * self.ema_eps) * total
        self.embedding.weight.copy_(self.ema_embed_sum / size.unsqueeze(1))

    def _restart_dead_codes(self, flat: Tensor, counts: Tensor) -> None:
        """Move codes whose average use fell below the threshold onto random encoder outputs of this batch."""
        decay = self.ema_decay if self.ema_decay is not None else 0.99
        self.code_usage.mul_(decay).add_(counts, alpha=1.0 - decay)
        dead = self.code_usage < self.dead_code_threshold  # same on every rank (the counts are summed)
        n_dead = int(dead.sum())
        if n_dead == 0:
            return
        pick = torch.randint(flat.shape[0], (n_dead,), device=flat.device)
        new_codes = _broadcast(flat[pick].contiguous())  # rank 0's choice, so codebooks stay identical
        self.embedding.weight[dead] = new_codes.to(self.embedding.weight.dtype)
        self.code_usage[dead] = 1.0
        if self.ema_decay is not None:
            self.ema_cluster_size[dead] = 1.0
            self.ema_embed_sum[dead] = new_codes

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        """Released codebooks (no EMA/usage buffers) load too: the buffers start from the loaded codebook."""
        weight = state_dict.get(prefix + "embedding.weight")
        if weight is not None:
            if self.ema_decay is not None and prefix + "ema_embed_sum" not in state_dict:
                state_dict[prefix + "ema_embed_sum"] = weight.detach().clone()
                state_dict[prefix + "ema_cluster_size"] = torch.ones(weight.shape[0])
            if self.restart_dead_codes and prefix + "code_usage" not in state_dict:
                state_dict[prefix + "code_usage"] = torch.ones(weight.shape[0])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def lookup(self, indices: Tensor) -> Tensor:
        """Code indices (B, h, w) -> quantised latent (B, C, h, w)."""
        return self.embedding(indices).permute(0, 3, 1, 2).contiguous()
