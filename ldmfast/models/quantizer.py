"""Vector quantizer: nearest codebook entry, straight-through gradients, codebook and commitment
losses, optional EMA codebook updates and restart of dead codes, usage statistics."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

#: Distance matrix entries computed at once: 2**24 fp32 values are 64 MiB, whatever the batch.
DISTANCE_CHUNK_ELEMENTS = 1 << 24


@dataclass
class QuantizerOutput:
    """z_q: quantized latent with straight-through gradient to z (same shape and layout as z);
    indices: (N, H, W) code numbers; loss = codebook_loss + beta * commitment_loss;
    perplexity: exp(entropy) of the batch's code histogram; usage: fraction of codes used."""

    z_q: torch.Tensor
    indices: torch.Tensor
    loss: torch.Tensor
    codebook_loss: torch.Tensor
    commitment_loss: torch.Tensor
    perplexity: torch.Tensor
    usage: torch.Tensor


def nearest_codes(z: torch.Tensor, codebook: torch.Tensor, chunk_elements: int = DISTANCE_CHUNK_ELEMENTS
                  ) -> torch.Tensor:
    """Index of the nearest codebook row (squared Euclidean distance) for each row of z (M, D).

    Rows go in chunks so that the chunk x K distance matrix stays under `chunk_elements` values:
    8192 codes and a batch of 48 latents of 48 x 56 would otherwise need 4 GiB. Computed in
    float32 (float64 for float64 input); ||z||^2 is the same for all codes and is left out."""
    dtype = torch.float64 if z.dtype == torch.float64 else torch.float32
    z, codebook = z.to(dtype), codebook.to(dtype)
    codes_sq = codebook.square().sum(1)
    rows = max(1, chunk_elements // codebook.shape[0])
    out = torch.empty(z.shape[0], dtype=torch.long, device=z.device)
    for start in range(0, z.shape[0], rows):
        chunk = z[start:start + rows]
        # addmm: ||e||^2 - 2 z.e in one kernel, without a separate -2 z e^T temporary
        distances = torch.addmm(codes_sq, chunk, codebook.t(), alpha=-2.0)
        out[start:start + rows] = distances.argmin(1)
    return out


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t


class VectorQuantizer(nn.Module):
    """Quantize (N, D, H, W) latents to the nearest of `num_codes` D-dimensional codes.

    beta: weight of the commitment loss ||z - sg(z_q)||^2 (the codebook loss ||sg(z) - z_q||^2
        has weight 1; with `ema` it is 0 and the codebook follows EMA cluster means instead).
    ema_decay: decay of the EMA codebook updates (used only with `ema`).
    dead_code_threshold: when > 0, a code whose exponentially averaged number of assignments
        per training batch (decay `ema_decay`) falls below it is restarted at a random latent
        vector of the current batch, its average reset to the threshold.
    Under torch.distributed, EMA statistics and restarts are combined over all processes, so
    every process keeps the same codebook.
    """

    def __init__(self, num_codes: int, dim: int, *, beta: float = 0.25, ema: bool = False,
                 ema_decay: float = 0.99, dead_code_threshold: float = 0.0, epsilon: float = 1e-5):
        super().__init__()
        self.num_codes, self.dim, self.beta = num_codes, dim, beta
        self.ema, self.ema_decay, self.epsilon = ema, ema_decay, epsilon
        self.dead_code_threshold = dead_code_threshold
        self.codebook = nn.Parameter(torch.empty(num_codes, dim).uniform_(-1.0 / num_codes, 1.0 / num_codes),
                                     requires_grad=not ema)
        if ema:
            self.register_buffer("ema_cluster_size", torch.zeros(num_codes))
            self.register_buffer("ema_code_sum", self.codebook.detach().clone())
        if dead_code_threshold > 0:
            # Starts at 0: the first training batch restarts every code it does not use, which
            # doubles as a data-dependent initialization of the codebook.
            self.register_buffer("code_usage", torch.zeros(num_codes))

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        if z.dim() != 4 or z.shape[1] != self.dim:
            raise ValueError(f"z: expected (N, {self.dim}, H, W), got {tuple(z.shape)}")
        # Distances and losses in float32 even under autocast: codes closer than bf16's resolution
        # would be confused, and the losses are small differences.
        with torch.autocast(z.device.type, enabled=False):
            return self._quantize(z.float() if z.dtype in (torch.float16, torch.bfloat16) else z)

    def _quantize(self, z: torch.Tensor) -> QuantizerOutput:
        n, d, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, d)  # a view for channels-last z
        with torch.no_grad():
            indices = nearest_codes(flat.detach(), self.codebook.detach())
            counts = torch.bincount(indices, minlength=self.num_codes).to(flat.dtype)
            if self.training:
                self._update_codebook(flat.detach(), indices, counts)
        codebook = self.codebook.to(z.dtype)
        z_q = F.embedding(indices, codebook).view(n, h, w, d).permute(0, 3, 1, 2)
        commitment = F.mse_loss(z, z_q.detach())
        codebook_loss = z.new_zeros(()) if self.ema else F.mse_loss(z_q, z.detach())
        # Straight-through: forward z_q, identity gradient to z. Without a gradient to carry,
        # z_q itself: exactly the code vectors, not z + (z_q - z) rounded.
        z_st = z + (z_q - z).detach() if z.requires_grad and torch.is_grad_enabled() else z_q
        probs = counts / counts.sum()
        perplexity = torch.exp(-(probs * torch.log(probs.clamp_min(1e-10))).sum())
        return QuantizerOutput(z_q=z_st, indices=indices.view(n, h, w),
                               loss=codebook_loss + self.beta * commitment, codebook_loss=codebook_loss,
                               commitment_loss=commitment, perplexity=perplexity,
                               usage=(counts > 0).float().mean())

    def _update_codebook(self, flat: torch.Tensor, indices: torch.Tensor, local_counts: torch.Tensor) -> None:
        if not (self.ema or self.dead_code_threshold > 0):
            return
        counts = _all_reduce_sum(local_counts.clone())
        if self.ema:
            sums = torch.zeros_like(self.ema_code_sum).index_add_(0, indices, flat)
            _all_reduce_sum(sums)
            self.ema_cluster_size.lerp_(counts, 1 - self.ema_decay)
            self.ema_code_sum.lerp_(sums, 1 - self.ema_decay)
            # Laplace smoothing keeps codes with no assignment from dividing by zero.
            total = self.ema_cluster_size.sum()
            size = (self.ema_cluster_size + self.epsilon) / (total + self.num_codes * self.epsilon) * total
            self.codebook.copy_(self.ema_code_sum / size.unsqueeze(1))
        if self.dead_code_threshold > 0:
            self.code_usage.lerp_(counts, 1 - self.ema_decay)
            self._restart_dead_codes(flat)

    def _restart_dead_codes(self, flat: torch.Tensor) -> None:
        dead = (self.code_usage < self.dead_code_threshold).nonzero().squeeze(1)
        if dead.numel() == 0:
            return
        # Rank 0 draws the replacements from its batch; broadcasting them keeps codebooks equal.
        picks = torch.randint(flat.shape[0], (dead.numel(),), device=flat.device)
        fresh = flat[picks].to(self.codebook.dtype)
        if dist.is_available() and dist.is_initialized():
            dist.broadcast(fresh, src=0)
        self.codebook[dead] = fresh
        self.code_usage[dead] = self.dead_code_threshold
        if self.ema:
            self.ema_cluster_size[dead] = 1.0
            self.ema_code_sum[dead] = fresh
