"""Training data for every stage: the cases of a folder (or a phantom set generated in the run
folder), a train/validation split by case, and batches whose order and augmentation depend only
on (seed, epoch, sample), never on RNG state, so that a resumed run sees the same batches."""
from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from ldmfast.data import (LAYOUTS, TRAINING_MODALITIES, AugmentConfig, CaseFiles, SliceDataset, augment_slice,
                          find_cases, make_phantom_dataset, phantom_complete)

from .checkpoint import write_json_atomic
from .config import ConfigError, check_finite_at_least
from .distributed import DistInfo, ShardedSampler, barrier


@dataclass
class PhantomSource:
    """Generate a phantom data set (ldmfast.data.make_phantom_dataset) in the run folder."""

    cases: int = 12
    shape: tuple[int, int, int] = (64, 64, 8)
    seed: int = 0
    lesion_fraction: float = 0.75

    def check(self, prefix: str) -> None:
        if self.cases < 2:
            raise ConfigError(f"{prefix}.cases", f"needs at least 2 cases (training and validation), got {self.cases}")
        if min(self.shape[:2]) < 16 or self.shape[2] < 1:
            raise ConfigError(f"{prefix}.shape", f"expected [X, Y, Z] with X, Y >= 16 and Z >= 1, got {list(self.shape)}")
        if not 0.0 <= self.lesion_fraction <= 1.0:
            raise ConfigError(f"{prefix}.lesion_fraction", f"must be within [0, 1], got {self.lesion_fraction}")


@dataclass
class AugmentSection:
    """Training augmentation (ldmfast.data.AugmentConfig); the defaults are the release's, whose
    32 px translation suits 192 x 224 slices: scale it down for small ones."""

    enabled: bool = True
    flip_prob: float = 0.5
    affine_prob: float = 0.9
    max_rotation: float = math.pi / 16
    max_translation: float = 32.0

    def check(self, prefix: str) -> None:
        for key in ("flip_prob", "affine_prob"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ConfigError(f"{prefix}.{key}", f"must be within [0, 1], got {getattr(self, key)}")
        for key in ("max_rotation", "max_translation"):
            check_finite_at_least(f"{prefix}.{key}", getattr(self, key), 0.0)

    def to_augment_config(self) -> AugmentConfig | None:
        if not self.enabled:
            return None
        return AugmentConfig(flip_prob=self.flip_prob, affine_prob=self.affine_prob,
                             max_rotation=self.max_rotation, max_translation=self.max_translation)


@dataclass
class DataSection:
    """Where slices come from: `root` (a folder or CSV manifest in any layout ldmfast.data reads)
    or `phantom`; `size` is the (H, W) every slice is centre-cropped/padded to."""

    root: str | None = None
    layout: str = "auto"
    phantom: PhantomSource | None = None
    size: tuple[int, int] = (192, 224)
    val_fraction: float = 0.1
    augment: AugmentSection = field(default_factory=AugmentSection)
    num_workers: int = 0
    cache_dir: str | None = None

    def check(self, prefix: str) -> None:
        if (self.root is None) == (self.phantom is None):
            raise ConfigError(f"{prefix}.root", "give exactly one of data.root (a data folder) and data.phantom")
        if self.root is not None and not Path(self.root).exists():
            raise ConfigError(f"{prefix}.root", f"{self.root} does not exist")
        if self.layout not in LAYOUTS:
            raise ConfigError(f"{prefix}.layout", f"must be one of {', '.join(LAYOUTS)}, got {self.layout!r}")
        if self.cache_dir is not None:
            _check_folder_possible(f"{prefix}.cache_dir", Path(self.cache_dir))
        if min(self.size) < 1:
            raise ConfigError(f"{prefix}.size", f"must be positive, got {list(self.size)}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"{prefix}.val_fraction", f"must be within (0, 1), got {self.val_fraction}")
        if self.num_workers < 0:
            raise ConfigError(f"{prefix}.num_workers", f"must be >= 0, got {self.num_workers}")


def _check_folder_possible(key: str, path: Path) -> None:
    """A folder that exists or can be made: not a file, nor under one."""
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                raise ConfigError(key, f"{path} is not a folder ({p} is a file)")
            return


PHANTOM_RECORD = "phantom.json"


def ensure_phantom(p: PhantomSource, root: Path) -> None:
    """The phantom set of `p`'s settings in `root` (a folder of the run): reused when its record
    says a generation of these settings finished, else generated anew, whatever `root` held (the
    cases of other settings, or what an interrupted generation left) removed first. The record is
    written last; a set without one is adopted only when complete and of these settings' size (a
    run folder of the version before the record), else regenerated."""
    settings = {"cases": p.cases, "shape": list(p.shape), "seed": p.seed, "lesion_fraction": p.lesion_fraction}
    try:
        if json.loads((root / PHANTOM_RECORD).read_text()) == settings:
            return
    except FileNotFoundError:
        if phantom_complete(root, p.cases, p.shape):
            # A run folder of an earlier version (no record): its complete set of the same size is
            # adopted, as that version reused it, rather than regenerated (new mtimes would rebuild
            # the slice cache).
            write_json_atomic(settings, root / PHANTOM_RECORD)
            return
    except (OSError, ValueError):
        pass
    shutil.rmtree(root, ignore_errors=True)
    make_phantom_dataset(root, n_cases=p.cases, shape=p.shape, seed=p.seed, lesion_fraction=p.lesion_fraction,
                         progress=True)
    write_json_atomic(settings, root / PHANTOM_RECORD)


def find_training_cases(data: DataSection, run_dir: Path, dist_info: DistInfo) -> list[CaseFiles]:
    """The cases of `data.root`, or of a phantom set rank 0 generates under `run_dir/phantom`."""
    if data.phantom is not None:
        root = run_dir / "phantom"
        if dist_info.is_main:
            ensure_phantom(data.phantom, root)
        barrier()
    else:
        root = Path(data.root)
    cases = find_cases(root, layout=data.layout, require=TRAINING_MODALITIES)
    if len(cases) < 2:
        raise ConfigError("data.root", f"{root} holds {len(cases)} usable case(s); training and validation need >= 2")
    return sorted(cases, key=lambda c: c.case_id)


def split_cases(cases: list[CaseFiles], val_fraction: float, seed: int) -> tuple[list[CaseFiles], list[CaseFiles]]:
    """(train, validation) by case, at least one of each, the same for a given seed."""
    order = np.random.default_rng(seed).permutation(len(cases))
    n_val = min(len(cases) - 1, max(1, round(val_fraction * len(cases))))
    val = sorted(order[:n_val].tolist())
    train = sorted(order[n_val:].tolist())
    return [cases[i] for i in train], [cases[i] for i in val]


def build_datasets(data: DataSection, run_dir: Path, seed: int, dist_info: DistInfo,
                   progress: bool = True) -> tuple[SliceDataset, SliceDataset]:
    """Train and validation slice datasets (no augmentation: `EpochAugmented` adds it); `progress`:
    a bar while slices are cached."""
    train_cases, val_cases = split_cases(find_training_cases(data, run_dir, dist_info), data.val_fraction, seed)
    cache = Path(data.cache_dir) if data.cache_dir else run_dir / "cache"
    datasets = None
    # Rank 0 fills the cache first; the others then only read it.
    for turn in ("main", "others"):
        if dist_info.is_main == (turn == "main"):
            datasets = (SliceDataset(train_cases, cache, size=data.size, progress=progress and dist_info.is_main),
                        SliceDataset(val_cases, cache, size=data.size, progress=False))
        barrier()
    return datasets


class EpochAugmented(Dataset):
    """Training augmentation seeded by (seed, epoch, index): a sample's flips and affine depend
    on nothing else, so resuming mid-epoch or changing the number of workers changes nothing."""

    def __init__(self, dataset: Dataset, augment: AugmentConfig | None, seed: int):
        self.dataset, self.augment, self.seed = dataset, augment, seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        sample = self.dataset[index]
        if self.augment is None:
            return sample
        seed = int(np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(1)[0])
        images = torch.cat([sample["ctp"], sample["target"]])
        masks = torch.cat([sample["mask"], sample["lesion"]])
        images, masks = augment_slice(images, masks, self.augment, torch.Generator().manual_seed(seed))
        n = sample["ctp"].shape[0]
        return {**sample, "ctp": images[:n], "target": images[n:], "mask": masks[:1], "lesion": masks[1:]}


def _collate(samples: list[dict]) -> dict:
    """Tensors (ctp, target, mask, lesion and e.g. a cached latent) stacked; case ids and slice
    indices as lists."""
    return {k: torch.stack([s[k] for s in samples]) if isinstance(v, torch.Tensor) else [s[k] for s in samples]
            for k, v in samples[0].items()}


class TrainBatches:
    """Endless training batches for one process: drop-last batches of a sharded, seeded
    permutation per epoch, positioned by the number of batches already consumed."""

    def __init__(self, dataset: Dataset, *, batch_size: int, seed: int, dist_info: DistInfo,
                 augment: AugmentConfig | None, num_workers: int = 0):
        self.data = EpochAugmented(dataset, augment, seed)
        self.sampler = ShardedSampler(len(dataset), rank=dist_info.rank, world_size=dist_info.world_size, seed=seed)
        self.batch_size, self.num_workers = batch_size, num_workers
        self.per_epoch = self.sampler.per_rank() // batch_size
        if self.per_epoch < 1:
            raise ConfigError("train.batch_size", f"{batch_size} per process is more than the {self.sampler.per_rank()} "
                                                  f"training slices each of {dist_info.world_size} process(es) gets")

    def iterate(self, consumed: int) -> Iterator[dict]:
        """Batches from the `consumed`-th on (counting from the start of training)."""
        epoch, offset = divmod(consumed, self.per_epoch)
        while True:
            self.data.epoch = epoch
            self.sampler.set_epoch(epoch, start=offset * self.batch_size)
            # Its own generator: creating a loader must not draw from the global torch RNG, whose
            # state the checkpoint restores (worker seeds would shift it otherwise).
            loader = DataLoader(self.data, batch_size=self.batch_size, sampler=self.sampler, drop_last=True,
                                num_workers=self.num_workers, collate_fn=_collate,
                                generator=torch.Generator().manual_seed(epoch),
                                pin_memory=torch.cuda.is_available())
            yield from loader
            epoch, offset = epoch + 1, 0


def validation_loader(dataset: Dataset, batch_size: int, dist_info: DistInfo, num_workers: int = 0) -> DataLoader:
    """Every validation slice exactly once over all processes (rank r takes r, r + world, ...)."""
    mine = Subset(dataset, range(dist_info.rank, len(dataset), dist_info.world_size))
    return DataLoader(mine, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=_collate)
