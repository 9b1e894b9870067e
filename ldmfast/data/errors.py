"""The one error type of the data layer: bad input, named by case and file."""

from __future__ import annotations

from os import PathLike


class DataError(ValueError):
    """Bad input data. Carries the case and the file at fault so a user can fix or drop it.

    `case` and `path` are kept as attributes (either may be None when unknown) so callers
    that skip bad cases can report them in a table rather than parse the message.
    """

    def __init__(self, message: str, *, case: str | None = None, path: str | PathLike | None = None):
        self.reason = message
        self.case = case
        self.path = None if path is None else str(path)
        where = []
        if case is not None:
            where.append(f"case {case!r}")
        if path is not None:
            where.append(f"file {self.path}")
        super().__init__(f"{', '.join(where)}: {message}" if where else message)
