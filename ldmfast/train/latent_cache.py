"""The latents of every training and validation target, encoded once by the frozen autoencoder
and kept on disk: the cLDM and post-training then never run the encoder in their loops.

The file's name carries a key of the autoencoder's weights, the slices (case cache entries) and
the slice size, so a changed autoencoder or data set is encoded again, never mixed up. Rank 0
encodes and writes atomically; the other processes wait and read."""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ldmfast.data import SliceDataset

from .checkpoint import save_safetensors_atomic
from .distributed import DistInfo, barrier


def latent_key(autoencoder: nn.Module, datasets: list[SliceDataset], size) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(autoencoder.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().float().cpu().numpy().tobytes())
    for ds in datasets:
        for entry in ds.entries:
            h.update(f"{entry.case_id}:{entry.folder.name}:{entry.n_slices};".encode())
        h.update(b"|")
    h.update(repr(tuple(size)).encode())
    return h.hexdigest()[:16]


@torch.no_grad()
def encode_dataset(encode, dataset: Dataset, device: torch.device, batch_size: int = 16,
                   progress: bool = False, desc: str = "latents") -> torch.Tensor:
    """encode(targets) for every slice of `dataset`, in order, as float32 on the CPU."""
    # A generator of its own: a DataLoader draws a seed from the one it has even unshuffled, and
    # the global one would then differ between a run that encodes and its resumption that finds
    # the cache (different training noise after an interruption).
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, generator=torch.Generator(),
                        collate_fn=lambda samples: torch.stack([s["target"] for s in samples]))
    out = []
    for target in tqdm(loader, desc=desc, unit="batch", disable=not progress, leave=False):
        out.append(encode(target.to(device)).float().cpu())
    return torch.cat(out)


def cached_latents(encode, autoencoder: nn.Module, datasets: dict[str, SliceDataset], size, cache_dir: Path,
                   device: torch.device, dist_info: DistInfo, progress: bool = True) -> dict[str, torch.Tensor]:
    """{name: (slices, c, h, w) latents} for each dataset, from the cache file or encoded now."""
    key = latent_key(autoencoder, list(datasets.values()), size)
    path = Path(cache_dir) / f"latents-{key}.safetensors"
    if dist_info.is_main and not path.is_file():
        latents = {name: encode_dataset(encode, ds, device, progress=progress, desc=f"encode {name}")
                   for name, ds in datasets.items()}
        save_safetensors_atomic(latents, path)
    barrier()
    latents = load_file(str(path))
    for name, ds in datasets.items():
        if latents[name].shape[0] != len(ds):
            raise RuntimeError(f"{path}: holds {latents[name].shape[0]} {name} latents for {len(ds)} slices; "
                               "delete it to encode again")
    return latents


class WithLatents(Dataset):
    """A slice dataset whose samples also carry their cached latent under "latent"."""

    def __init__(self, dataset: Dataset, latents: torch.Tensor):
        if len(dataset) != latents.shape[0]:
            raise ValueError(f"latents: {latents.shape[0]} for {len(dataset)} slices")
        self.dataset, self.latents = dataset, latents

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        return {**self.dataset[index], "latent": self.latents[index]}
