"""Rules for any model: every nn.GroupNorm becomes the fused GroupNorm (same parameters, same
state_dict keys); an nn.Sequential that runs a GroupNorm then an nn.SiLU runs them as one op; and
the scan listing the normalization and attention modules nothing took, with the reason."""
from __future__ import annotations

from torch import nn

from .fused import (AcceleratedGroupNorm, accelerated_group_norm, fusable_norm_params, is_plain_silu, norm_silu,
                    why_not_group_norm)
from .patcher import forward_patched_elsewhere, fused_forward, has_fused_forward, override_forward, swap_child
from .report import AccelerationReport, Change

# ---- GroupNorm swap ---------------------------------------------------------------------------


def _child_slots(model: nn.Module):
    """(path of the child, parent, attribute name, child) for every module slot in the tree; a
    module held by two parents appears once per slot."""
    for parent_path, parent in model.named_modules(remove_duplicate=True):
        for name, child in parent._modules.items():
            if child is not None:
                yield (f"{parent_path}.{name}" if parent_path else name), parent, name, child


def swap_group_norms(model: nn.Module, report: AccelerationReport) -> None:
    replacements: dict[int, AcceleratedGroupNorm] = {}  # one replacement per shared module
    for path, parent, name, child in list(_child_slots(model)):
        if not isinstance(child, nn.GroupNorm) or isinstance(child, AcceleratedGroupNorm):
            continue  # (an AcceleratedGroupNorm is an nn.GroupNorm too: the walk listed it already)
        reason = why_not_group_norm(child)
        if reason is not None:
            report.leave(path, child, reason)
            continue
        new = replacements.setdefault(id(child), accelerated_group_norm(child))
        swap_child(report, parent, name, new, Change(path, "group_norm", f"{type(child).__name__} -> ldmfast "
                                                                         "fused GroupNorm"))
    if isinstance(model, nn.GroupNorm) and not isinstance(model, AcceleratedGroupNorm):
        report.leave("", model, "the root module cannot be replaced in place; accelerate its parent, or use "
                                "ldmfast.nn.GroupNormAct.from_module")


# ---- GroupNorm then SiLU inside an nn.Sequential ----------------------------------------------

def _is_group_norm_like(module: nn.Module) -> bool:
    return fusable_norm_params(module) is not None  # a plain or accelerated GroupNorm, or an unfused GroupNormAct


def _fusable_pairs(seq: nn.Sequential) -> list[int]:
    children = list(seq._modules.values())
    return [i for i in range(len(children) - 1)
            if _is_group_norm_like(children[i]) and is_plain_silu(children[i + 1])]


@fused_forward
def _sequential_forward(self, x):
    """nn.Sequential.forward, with each GroupNorm directly followed by a plain SiLU run as one op.
    Read at call time, so a child swapped or hooked since `accelerate` still runs as itself."""
    children = list(self._modules.values())
    i = 0
    while i < len(children):
        if i + 1 < len(children) and _is_group_norm_like(children[i]) and is_plain_silu(children[i + 1]):
            x = norm_silu(children[i], x)
            i += 2
        else:
            x = children[i](x)
            i += 1
    return x


def fuse_sequentials(modules: list[tuple[str, nn.Module]], report: AccelerationReport) -> None:
    """Only the Sequential's own forward changes: code that indexes or slices it (openaimodel's
    `out_layers[0]` under use_scale_shift_norm) gets the plain children and stays exact."""
    for path, module in modules:
        if not isinstance(module, nn.Sequential) or type(module).forward is not nn.Sequential.forward:
            continue
        pairs = _fusable_pairs(module)
        if not pairs or has_fused_forward(module):
            continue
        if forward_patched_elsewhere(module):
            report.leave(path, module, "its forward is already patched by someone else")
            continue
        at = ", ".join(f"[{i}]+[{i + 1}]" for i in pairs)
        override_forward(report, module, _sequential_forward,
                         Change(path, "group_norm+silu", f"{type(module).__name__}: GroupNorm+SiLU fused at {at}"))


# ---- what was left alone ----------------------------------------------------------------------

_NORM_TYPES = (nn.LayerNorm, nn.modules.batchnorm._NormBase, nn.LocalResponseNorm, nn.RMSNorm)
_ATTENTION_WORDS = ("attention", "attn")


def _looks_like_attention(module: nn.Module) -> bool:
    name = type(module).__name__.lower()
    return isinstance(module, nn.MultiheadAttention) or any(w in name for w in _ATTENTION_WORDS)


def list_left_alone(model: nn.Module, report: AccelerationReport, attention: bool) -> None:
    """Normalization layers ldmfast has no op for, and attention-like modules no rule took. An
    attention container (a down block, a transformer) is not listed when something inside it was
    already accelerated or listed: the entry for that inner module says what happened."""
    noted = {s.path for s in report.left_alone}
    accounted = noted | {c.path for c in report.replaced if c.kind == "attention"}
    for path, module in model.named_modules():
        if path in noted or isinstance(module, AcceleratedGroupNorm) or has_fused_forward(module):
            continue
        if isinstance(module, _NORM_TYPES) or (type(module).__name__.endswith("Norm")
                                               and not isinstance(module, nn.GroupNorm)):
            report.leave(path, module, f"ldmfast has no fused {type(module).__name__}")
        elif _looks_like_attention(module):
            prefix = f"{path}." if path else ""
            if path in accounted or any(p.startswith(prefix) for p in accounted):
                continue
            report.leave(path, module, "no ldmfast rule for this attention module" if attention
                         else "attention=False")
