"""What `accelerate` did to a model: the modules it replaced, those it left alone and why, and
the undo log that puts the model back."""
from __future__ import annotations

import collections
import dataclasses
from typing import Callable


@dataclasses.dataclass(frozen=True)
class Change:
    """One module made faster: `path` in the model (as named_modules() names it, "" for the root),
    `kind` ("group_norm", "group_norm+silu" or "attention") and what was done."""

    path: str
    kind: str
    detail: str


@dataclasses.dataclass(frozen=True)
class LeftAlone:
    """A module that looked like a candidate (a normalization or an attention layer) but was not
    touched, with the reason."""

    path: str
    type_name: str
    reason: str


class AccelerationReport:
    """The result of `ldmfast.accelerate(model)`. `undo()` (or `ldmfast.restore(model)`) reverts
    every change, in reverse order; the parameters were shared all along, so training done while
    accelerated is kept."""

    def __init__(self, model_type: str):
        self.model_type = model_type
        self.replaced: list[Change] = []
        self.left_alone: list[LeftAlone] = []
        self._undo: list[Callable[[], None]] = []
        self.active = True

    def record(self, change: Change, undo: Callable[[], None]) -> None:
        self.replaced.append(change)
        self._undo.append(undo)

    def leave(self, path: str, module, reason: str) -> None:
        self.left_alone.append(LeftAlone(path, type(module).__name__, reason))

    def undo(self) -> None:
        """Put every replaced module, forward and processor back; a second call does nothing."""
        while self._undo:
            self._undo.pop()()
        self.active = False

    def counts(self) -> dict[str, int]:
        """Number of changes per kind."""
        return dict(collections.Counter(c.kind for c in self.replaced))

    def __str__(self) -> str:
        """One line per distinct change or reason, with the count and the first paths."""
        state = "" if self.active else " (undone)"
        lines = [f"ldmfast.accelerate({self.model_type}){state}: {len(self.replaced)} replaced, "
                 f"{len(self.left_alone)} left alone"]
        replaced = _group((c.detail, c.path) for c in self.replaced)
        left = _group((f"{s.type_name}: {s.reason}", s.path) for s in self.left_alone)
        lines += [f"  replaced   {n:3d} x {what}  [{paths}]" for what, n, paths in replaced]
        lines += [f"  left alone {n:3d} x {what}  [{paths}]" for what, n, paths in left]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"AccelerationReport({self.model_type}, replaced={self.counts()}, "
                f"left_alone={len(self.left_alone)}, active={self.active})")


def _group(items, shown: int = 3):
    groups: dict[str, list[str]] = {}
    for key, path in items:
        groups.setdefault(key, []).append(path or "<root>")
    return [(key, len(paths), ", ".join(paths[:shown]) + (", ..." if len(paths) > shown else ""))
            for key, paths in groups.items()]
