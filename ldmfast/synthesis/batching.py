"""The slice queue: work items (case, sample, slice) from many cases, grouped into model batches.

Every batch has exactly `batch_size` entries; the last batch of a slice shape is padded by
repeating its last entry (the padding's outputs are dropped). With a fixed batch size, what a
slice comes out as depends only on its CTP, its seed and the batch size, never on the other
slices in its batch: some kernels (e.g. the CPU convolution) round differently for different
batch sizes, and a vector-quantized decoder can turn such a rounding difference into a different
code. So a sharded run, a rerun that skips finished cases and a single run agree bit for bit, and
batch shapes are static (what CUDA graphs need).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(eq=False)
class CaseJob:
    """One case's work: ctp (S x frames x H x W), seeds (samples x S); images (samples x S x
    2 x H x W) fill in as batches come back. `payload` travels along for the writer."""

    case_id: str
    ctp: np.ndarray
    seeds: np.ndarray
    payload: Any = None
    images: np.ndarray | None = None
    remaining: int = field(init=False)
    failed: bool = False

    def __post_init__(self):
        if self.ctp.ndim != 4 or self.seeds.ndim != 2 or self.seeds.shape[1] != self.ctp.shape[0]:
            raise ValueError(f"seeds: need samples x {self.ctp.shape[0]} for case {self.case_id!r}, "
                             f"got {self.seeds.shape}")
        self.remaining = self.seeds.size

    @property
    def items(self) -> int:
        """Slices to generate: slices x samples."""
        return self.seeds.size


@dataclass
class Batch:
    """ctp: batch_size x frames x H x W; seeds: one per entry; entries: (job, sample, slice
    position) of the real entries, which come first (the rest is padding)."""

    ctp: np.ndarray
    seeds: list[int]
    entries: list[tuple[CaseJob, int, int]]

    @property
    def real(self) -> int:
        return len(self.entries)


class SliceBatcher:
    """Queues the slices of each added case and hands out full batches; slices of different
    sizes never share a batch."""

    def __init__(self, batch_size: int):
        if batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self._pending: dict[tuple[int, ...], list[tuple[CaseJob, int, int]]] = {}

    def add(self, job: CaseJob) -> list[Batch]:
        """Queue all of a case's slices (sample by sample); return the batches now full."""
        queue = self._pending.setdefault(job.ctp.shape[1:], [])
        samples, slices = job.seeds.shape
        queue.extend((job, k, s) for k in range(samples) for s in range(slices))
        batches = []
        while len(queue) >= self.batch_size:
            batches.append(self._make(queue[:self.batch_size]))
            del queue[:self.batch_size]
        return batches

    def flush(self) -> list[Batch]:
        """The remaining slices, one padded batch per slice size."""
        batches = [self._make(queue) for queue in self._pending.values() if queue]
        self._pending.clear()
        return batches

    def drop(self, job: CaseJob) -> None:
        """Forget the queued slices of a case (it failed)."""
        for shape, queue in self._pending.items():
            self._pending[shape] = [e for e in queue if e[0] is not job]

    @property
    def queued(self) -> int:
        return sum(len(q) for q in self._pending.values())

    def _make(self, entries: list[tuple[CaseJob, int, int]]) -> Batch:
        padded = entries + [entries[-1]] * (self.batch_size - len(entries))
        ctp = np.stack([job.ctp[s] for job, _, s in padded])
        seeds = [int(job.seeds[k, s]) for job, k, s in padded]
        return Batch(ctp, seeds, list(entries))


def scatter(batch: Batch, images: np.ndarray) -> list[CaseJob]:
    """Store a batch's generated images (batch_size x 2 x H x W) in their jobs; return the jobs
    this batch completed (failed jobs are skipped)."""
    done = []
    for (job, k, s), image in zip(batch.entries, images):
        if job.failed:
            continue
        if job.images is None:
            samples, slices = job.seeds.shape
            job.images = np.empty((samples, slices, *image.shape), dtype=np.float32)
        job.images[k, s] = image
        job.remaining -= 1
        if job.remaining == 0:
            done.append(job)
    return done
