"""Training metrics as JSON lines: one object per logged step, appended and flushed, so the log
of an interrupted run is readable and a resumed run continues it."""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path


class MetricsLog:
    """Append-only JSONL writer; on resume, lines past the resumed step are dropped so that the
    log reads as one uninterrupted run."""

    def __init__(self, path: str | os.PathLike, resume_step: int = 0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            keep = [line for line in self.path.read_text().splitlines()
                    if line.strip() and _step_of(line) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in keep))
        self._file = self.path.open("a")

    def write(self, step: int, kind: str, values: dict) -> None:
        record = {"step": step, "kind": kind, "time": round(time.time(), 3)}
        record.update({k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in values.items()})
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def last(self, kind: str) -> dict:
        """The values of the last record of `kind` ("train", "val"), without its step, kind and
        time ({} when there is none); null values come back as NaN."""
        for line in reversed(self.path.read_text().splitlines()):
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("kind") == kind:
                return {k: math.nan if v is None else v for k, v in record.items()
                        if k not in ("step", "kind", "time")}
        return {}


def _step_of(line: str) -> float:
    """The step of a log line; a line cut short by a killed run counts as past every step."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return math.inf
