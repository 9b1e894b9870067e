"""The training dataset: axial slices read from the slice cache, optionally augmented."""

from __future__ import annotations

import bisect
import os
import warnings
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .augment import AugmentConfig, augment_slice
from .cache import ARRAY_NAMES, CacheEntry, ensure_cached
from .errors import DataError
from .geometry import fit_to_size
from .layouts import CaseFiles
from .preprocess import PreprocessOptions, VolumeStats

#: Cases whose memory maps one process keeps open at a time. Each map holds a file
#: descriptor, and a data set of hundreds of cases would exceed the usual limit of 1024.
MAX_OPEN_CASES = 64


class SliceDataset(Dataset):
    """Axial slices of cases with CTP, DWI and ADC, preprocessed once into `cache_dir`.

    Each sample is a dict: "ctp" (frames x H x W), "target" (2 x H x W: DWI, ADC),
    "mask" and "lesion" (1 x H x W), all float32 (images in [-1, 1], masks 0/1), plus
    "case_id" (str) and "slice_index" (int, the axial index in the original volume).

    size: (H, W) to centre-crop/pad every slice to (the release uses (192, 224)); None keeps
        each case's own in-plane size, which batches only if all cases share it.
    augment: an `AugmentConfig` for training; None for validation and synthesis.
    skip_bad: leave out cases that fail to load or preprocess, keeping their `DataError`s in
        `errors`, instead of raising the first.

    Worker-safe: memory maps are opened lazily in each process, and the augmentation
    generator is seeded from `torch.initial_seed()`, which DataLoader makes distinct per
    worker and per epoch (and reproducible under `torch.manual_seed`).
    """

    def __init__(
        self,
        cases: Iterable[CaseFiles],
        cache_dir: str | os.PathLike,
        *,
        options: PreprocessOptions = PreprocessOptions(),
        augment: AugmentConfig | None = None,
        size: tuple[int, int] | None = None,
        skip_bad: bool = False,
        progress: bool = True,
    ):
        result = ensure_cached(list(cases), cache_dir, options, skip_bad=skip_bad, progress=progress)
        if not result.entries:
            left_out = f"; {len(result.errors)} left out, the first: {result.errors[0]}" if result.errors else ""
            raise DataError(f"no usable case{left_out}", path=cache_dir)
        self.cache_dir = Path(cache_dir)
        self.options = options
        self.augment = augment
        self.size = None if size is None else tuple(size)
        self.entries: list[CacheEntry] = result.entries
        self.errors: list[DataError] = result.errors
        self.n_built, self.n_reused = result.n_built, result.n_reused
        self._starts = np.cumsum([0] + [e.n_slices for e in self.entries]).tolist()
        self._by_case = {e.case_id: e for e in self.entries}
        self._process_state()
        if self.size is not None:
            self._warn_about_cut_brain()

    def _warn_about_cut_brain(self, share: float = 0.01) -> None:
        """Say which cases a centre crop to `size` cuts brain from (more than `share` of it): their
        in-plane pixels are likely finer than the models' ~1 mm, or the size too small."""
        cut = []
        for e in self.entries:
            lost, total = e.brain_cut_by(self.size)
            if total and lost > share * total:
                cut.append((lost / total, e))
        if cut:
            cut.sort(key=lambda c: -c[0])
            worst = ", ".join(f"{e.case_id} ({100 * f:.0f} %, {e.spatial_shape[0]} x {e.spatial_shape[1]})"
                              for f, e in cut[:3])
            warnings.warn(f"the centre crop to {self.size[0]} x {self.size[1]} cuts away brain in {len(cut)} of "
                          f"{len(self.entries)} cases, at least: {worst}{' ...' if len(cut) > 3 else ''}; resample "
                          "them to the models' in-plane spacing (~1 mm) or choose a larger size", stacklevel=3)

    def _process_state(self) -> None:
        """Per-process handles: open memory maps and the augmentation generator."""
        self._pid = os.getpid()
        self._maps: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()
        self._rng: torch.Generator | None = None
        self._rng_seed: int | None = None

    def __getstate__(self):
        # Memory maps would pickle as full copies of the arrays; workers reopen their own.
        state = self.__dict__.copy()
        for handle in ("_maps", "_rng"):
            state[handle] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._process_state()

    def __len__(self) -> int:
        return self._starts[-1]

    def stats(self, case_id: str) -> tuple[VolumeStats, VolumeStats]:
        """The (DWI, ADC) clip bounds of a case, to map its synthesized slices back."""
        entry = self._by_case[case_id]
        return entry.dwi_stats, entry.adc_stats

    def _arrays(self, position: int) -> dict[str, np.ndarray]:
        if os.getpid() != self._pid:  # forked without pickling: the parent's maps are not ours
            self._process_state()
        maps = self._maps.get(position)
        if maps is None:
            entry = self.entries[position]
            maps = {name: np.load(entry.array_path(name), mmap_mode="r") for name in ARRAY_NAMES}
            self._maps[position] = maps
            if len(self._maps) > MAX_OPEN_CASES:
                self._maps.popitem(last=False)
        else:
            self._maps.move_to_end(position)
        return maps

    def _generator(self) -> torch.Generator:
        seed = torch.initial_seed()
        if self._rng is None or self._rng_seed != seed:
            self._rng = torch.Generator().manual_seed(seed)
            self._rng_seed = seed
        return self._rng

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} slices")
        position = bisect.bisect_right(self._starts, index) - 1
        local = index - self._starts[position]
        maps = self._arrays(position)
        entry = self.entries[position]
        sample = slice_sample(
            maps["ctp"][local],
            maps["target"][local],
            maps["mask"][local],
            maps["lesion"][local],
            size=self.size,
            augment=self.augment,
            generator=self._generator() if self.augment is not None else None,
        )
        sample["case_id"] = entry.case_id
        sample["slice_index"] = entry.slice_index[local]
        return sample


def slice_sample(
    ctp: np.ndarray,
    target: np.ndarray,
    mask: np.ndarray,
    lesion: np.ndarray,
    *,
    size: tuple[int, int] | None = None,
    augment: AugmentConfig | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Tensors of one preprocessed slice (ctp: frames x H x W, target: 2 x H x W, mask and
    lesion: H x W), fitted to `size` and augmented when `augment` is given (with
    `generator`): the "ctp", "target", "mask" and "lesion" entries of a `SliceDataset` sample."""
    n_frames = ctp.shape[0]
    # Images and masks are fitted and augmented together, as C x H x W stacks.
    images = np.concatenate([ctp, target], axis=0).astype(np.float32, copy=False)
    masks = np.stack([mask, lesion]).astype(np.float32)
    if size is not None:
        images = fit_to_size(images, size, fill=-1.0)
        masks = fit_to_size(masks, size, fill=0.0)
    images, masks = torch.from_numpy(images), torch.from_numpy(masks)
    if augment is not None:
        images, masks = augment_slice(images, masks, augment, generator)
    return {"ctp": images[:n_frames], "target": images[n_frames:], "mask": masks[:1], "lesion": masks[1:]}
