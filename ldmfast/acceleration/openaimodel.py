"""UNets in the style of the reference release (guided-diffusion / latent-diffusion `openaimodel`):
their attention is a QKVAttention or QKVAttentionLegacy module mapping a (B, 3*H*C, T) qkv tensor to
(B, H*C, T). These live in the user's own code, so they are recognized by class name and shape
(an `n_heads` attribute, no parameters, a forward(self, qkv)) and must compute what those classes
compute, which a probe input checks before the forward is replaced (other projects reuse the names:
GLIDE's QKVAttention has the legacy layout and an optional encoder_kv argument):

    legacy: qkv.reshape(B*H, 3*C, T).split(C)     -> per head q, k, v consecutive
    new:    qkv.chunk(3) then each .view(B*H, C, T) -> all q, then all k, then all v
    softmax((q*s)^T (k*s)) with s = C^-1/4, so scale 1/sqrt(C), then weights @ v^T

ResBlocks need no rule: their GroupNorm32 + SiLU live in nn.Sequentials (in_layers, out_layers),
which the generic Sequential rule fuses when the Sequential runs whole, and leaves exact when
the block slices it (use_scale_shift_norm, up/down resampling)."""
from __future__ import annotations

import inspect
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


def _takes_qkv_only(forward) -> bool:
    """forward(self, qkv), nothing else: GLIDE's QKVAttention.forward(self, qkv, encoder_kv=None),
    say, is another computation, which a caller passing encoder_kv would reach."""
    try:
        params = list(inspect.signature(forward).parameters.values())
    except (TypeError, ValueError):
        return False
    return (len(params) == 2 and params[1].name == "qkv"
            and all(p.kind is p.POSITIONAL_OR_KEYWORD and p.default is p.empty for p in params))


def _why_not_probe(module: nn.Module) -> str | None:
    """None where the fused forward computes what the module's own does, on a small float32 CPU
    probe input: the class name says the layout only for guided-diffusion's classes (GLIDE's
    QKVAttention has the legacy layout under the new name). No parameters: any device will do."""
    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn(2, 3 * module.n_heads * 4, 5, generator=gen, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        try:
            want = type(module).forward(module, qkv)
        except Exception as err:  # noqa: BLE001 - any failure means: not a module we can check
            return f"its forward fails on a float32 CPU probe input ({type(err).__name__})"
        got = _qkv_attention_forward(module, qkv)
    if not (isinstance(want, torch.Tensor) and want.shape == got.shape
            and torch.allclose(got, want.float(), rtol=1e-4, atol=1e-5)):
        return (f"its forward differs from the {'legacy' if type(module).__name__ == LEGACY else 'new'}-order "
                "q,k,v layout its class name implies (checked on a probe input)")
    return None


def _why_not(module: nn.Module):
    if forward_patched_elsewhere(module):
        return "its forward is already patched by someone else"
    if not _takes_qkv_only(type(module).forward):
        return "its forward takes more than (self, qkv) (e.g. GLIDE's encoder_kv)"
    return _why_not_probe(module)


def _apply(path: str, module: nn.Module, report: AccelerationReport) -> None:
    order = "legacy (per-head q,k,v)" if type(module).__name__ == LEGACY else "q,k,v blocks"
    override_forward(report, module, _qkv_attention_forward,
                     Change(path, "attention", f"{type(module).__name__}: ldmfast attention, {module.n_heads} "
                                               f"heads, {order} layout"))


def rules() -> list[Rule]:
    return [Rule("openaimodel-style QKVAttention", "attention", _matches, _why_not, _apply)]
