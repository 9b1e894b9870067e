"""Atomic writes: build the output under a temporary name beside it, then rename.

A rename within one folder is atomic on POSIX and Windows, so an interrupted run leaves
either the previous file or the new one, never a half-written one that a rerun would
mistake for finished work.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in `path`'s folder; on success rename it to `path`.

    The temporary name keeps `path`'s suffixes (".nii.gz" tells nibabel to compress) and
    starts with a dot so folder listings skip it. It can be filled as a file or created as
    a folder; on any exception it is removed and `path` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}-{path.name}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise
