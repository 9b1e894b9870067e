"""UNets in the style of the reference release (guided-diffusion / latent-diffusion `openaimodel`):
their attention is a QKVAttention or QKVAttentionLegacy module mapping a (B, 3*H*C, T) qkv tensor to
(B, H*C, T). These live in the user's own code, so they are recognized by class name and shape
(an `n_heads` attribute, no parameters) and must compute what those classes compute:

    legacy: qkv.reshape(B*H, 3*C, T).split(C)     -> per head q, k, v consecutive
    new:    qkv.chunk(3) then each .view(B*H, C, T) -> all q, then all k, then all v
    softmax((q*s)^T (k*s)) with s = C^-1/4, so scale 1/sqrt(C), then weights @ v^T

ResBlocks need no rule: their GroupNorm32 + SiLU live in nn.Sequentials (in_layers, out_layers),
which the generic Sequential rule fuses when the Sequential runs whole, and leaves exact when
the block slices it (use_scale_shift_norm, up/down resampling)."""
from __future__ import annotations

import math

import torch
from torch import nn

from .. import ops
from .patcher import forward_patched_elsewhere, fused_forward, override_forward
from .report import AccelerationReport, Change
from .rules import Rule

LEGACY, NEW = "QKVAttentionLegacy", "QKVAttention"


def _heads(qkv: torch.Tensor, n_heads: int, legacy: bool):
    """q, k, v as (B, H, T, C) strided views of qkv (B, 3*H*C, T)."""
    bs, width, length = qkv.shape
    ch = width // (3 * n_heads)
    split = qkv.reshape(bs, n_heads, 3, ch, length) if legacy else qkv.reshape(bs, 3, n_heads, ch, length)
    parts = split.unbind(2) if legacy else split.unbind(1)
    return [t.transpose(-1, -2) for t in parts], ch


@fused_forward
def _qkv_attention_forward(self, qkv: torch.Tensor) -> torch.Tensor:
    bs, _, length = qkv.shape
    (q, k, v), ch = _heads(qkv, self.n_heads, type(self).__name__ == LEGACY)
    if ch > ops.MAX_HEAD_DIM:
        return type(self).forward(self, qkv)
    out = ops.attention(q, k, v, scale=1.0 / math.sqrt(ch))  # (B, H, T, C), in q's (T-fastest) order
    return out.transpose(-1, -2).reshape(bs, -1, length)


def _matches(module: nn.Module) -> bool:
    return (type(module).__name__ in (LEGACY, NEW) and isinstance(getattr(module, "n_heads", None), int)
            and next(module.parameters(recurse=True), None) is None)


def _why_not(module: nn.Module):
    if forward_patched_elsewhere(module):
        return "its forward is already patched by someone else"
    return None


def _apply(path: str, module: nn.Module, report: AccelerationReport) -> None:
    order = "legacy (per-head q,k,v)" if type(module).__name__ == LEGACY else "q,k,v blocks"
    override_forward(report, module, _qkv_attention_forward,
                     Change(path, "attention", f"{type(module).__name__}: ldmfast attention, {module.n_heads} "
                                               f"heads, {order} layout"))


def rules() -> list[Rule]:
    return [Rule("openaimodel-style QKVAttention", "attention", _matches, _why_not, _apply)]
