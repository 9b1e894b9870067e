"""Per-slice seeds derived from (run seed, case, slice, sample) alone, so that the way cases are
sharded across processes, batched or skipped on a rerun never changes what a slice is drawn from."""
from __future__ import annotations

import hashlib


def slice_seed(seed: int, case_id: str, slice_index: int, sample: int = 0) -> int:
    """A 63-bit generator seed for one slice of one sample of a case. A hash rather than
    arithmetic, so that neighbouring seeds, slices or case names give unrelated streams."""
    if sample < 0 or slice_index < 0:
        raise ValueError(f"slice_index, sample: must be >= 0, got {slice_index}, {sample}")
    key = f"ldmfast-synthesis\0{int(seed)}\0{case_id}\0{int(slice_index)}\0{int(sample)}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1
