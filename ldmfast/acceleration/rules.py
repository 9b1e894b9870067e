"""A rule: how to accelerate one known block class of a peer library, and when not to."""
from __future__ import annotations

import dataclasses
import sys
from typing import Callable, Optional

from torch import nn

from .patcher import forward_patched_elsewhere
from .report import AccelerationReport

@dataclasses.dataclass(frozen=True)
class Rule:
    """`matches(module)` says the rule is about this module; `why_not(module)` gives the reason to
    leave it alone (None: go ahead); `apply(path, module, report)` makes and records the change."""

    name: str
    kind: str
    matches: Callable[[nn.Module], bool]
    why_not: Callable[[nn.Module], Optional[str]]
    apply: Callable[[str, nn.Module, AccelerationReport], None]


def peer_class(module_name: str, class_name: str):
    """A peer library's class if that library module is already imported, else None: a model can
    hold instances of a class only once its module is imported, so nothing is imported here."""
    mod = sys.modules.get(module_name)
    return getattr(mod, class_name, None) if mod is not None else None


def class_rule(cls, name: str, kind: str, why_not: Callable[[nn.Module], Optional[str]],
               apply: Callable[[str, nn.Module, AccelerationReport], None]) -> Rule:
    """A rule for instances of `cls` whose forward is `cls.forward`: the fused forward replicates
    exactly that one, so a subclass overriding it, or an instance whose forward someone else
    patched, is left alone."""

    def matches(module: nn.Module) -> bool:
        return isinstance(module, cls)

    def why_not_here(module: nn.Module) -> Optional[str]:
        if type(module).forward is not cls.forward:
            return f"{type(module).__name__} overrides {cls.__name__}.forward"
        if forward_patched_elsewhere(module):
            return "its forward is already patched by someone else (e.g. an offloading hook)"
        return why_not(module)

    return Rule(name, kind, matches, why_not_here, apply)
