"""One process or many under `torchrun`: process group set-up from torchrun's environment
variables (gloo on CPU, nccl on GPU), the device of each process, resumable sharded sampling and
helpers that let only rank 0 talk."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from .config import ConfigError


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str) -> torch.device:
    """"auto": CUDA when visible, else CPU; otherwise the named device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", f"{name!r} asked for, but no CUDA GPU is visible to torch")
    return device


def init_distributed(device_name: str = "auto") -> DistInfo:
    """Join the process group when started by torchrun (WORLD_SIZE > 1), else run alone."""
    device = resolve_device(device_name)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world_size > 1:
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    elif device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return DistInfo(rank, world_size, local_rank, device)


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over processes, in place; the tensor itself when running alone."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t


class ShardedSampler(Sampler[int]):
    """Each process's share of a seeded per-epoch permutation (like DistributedSampler), able to
    start part-way through an epoch, so that a resumed run reads exactly the samples the
    uninterrupted run would have read. Every process gets the same number of samples: the
    permutation is cut to a multiple of `world_size`."""

    def __init__(self, length: int, *, rank: int = 0, world_size: int = 1, shuffle: bool = True, seed: int = 0):
        self.length, self.rank, self.world_size = length, rank, world_size
        self.shuffle, self.seed = shuffle, seed
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Iterate over epoch `epoch`'s order from this process's `start`-th sample on."""
        self.epoch, self.start = epoch, start

    def per_rank(self) -> int:
        return self.length // self.world_size

    def __len__(self) -> int:
        return self.per_rank() - self.start

    def __iter__(self):
        if self.shuffle:
            order = torch.randperm(self.length, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            order = torch.arange(self.length)
        mine = order[:self.per_rank() * self.world_size][self.rank::self.world_size]
        return iter(mine[self.start:].tolist())
