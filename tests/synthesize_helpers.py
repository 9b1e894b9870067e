"""Shared pieces of the `ldmfast synthesize` tests: a tiny random model folder, phantom data, running
the command in a subprocess, and an independent float64 reference of what a case's files hold."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from ldmfast.data import find_cases, load_case, make_phantom_dataset, mri_to_unit, preprocess_case
from ldmfast.models import VQGAN, ConditionalLDM, UNetConfig, VQGANConfig
from ldmfast.synthesis import slice_seed

# One thread in the subprocesses and in the in-test reference: the same kernels then see the same
# batch shapes and thread counts, so results can be compared at fp32 rounding.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def tiny_model(seed: int) -> ConditionalLDM:
    torch.manual_seed(seed)
    unet = UNetConfig(in_channels=18, out_channels=3, base_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                      attention_levels=(1,), head_channels=16, norm_groups=8)
    unet.validate()
    vqgan = VQGAN(VQGANConfig(base_channels=16, channel_mult=[1, 2, 2], num_res_blocks=1, norm_groups=8,
                              num_codes=64).validate())
    return ConditionalLDM(unet, autoencoder=vqgan).eval()


def make_model_dir(path: Path, seed: int) -> Path:
    tiny_model(seed).save_pretrained(path)
    return path


def make_data(path: Path, cases: int, seed: int, shape=(32, 32, 6)) -> Path:
    make_phantom_dataset(path, n_cases=cases, shape=shape, seed=seed, progress=False)
    return path


def run_cli(*args, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ldmfast", "synthesize", *map(str, args), "--quiet"],
                          capture_output=True, text=True, timeout=timeout, env=ENV)


def start_cli(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ldmfast", "synthesize", *map(str, args), "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)


def read_volume(path: Path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj, dtype=np.float32)


def output_files(out: Path) -> dict[str, list[str]]:
    """Every file under each case folder of `out`, hidden ones included."""
    return {d.name: sorted(p.name for p in d.iterdir()) for d in sorted(out.iterdir()) if d.is_dir()}


def reference_case(model: ConditionalLDM, case, *, steps: int, batch_size: int, seed: int, sample: int = 0,
                   scale: str = "case") -> dict[str, np.ndarray]:
    """What `ldmfast synthesize` should write for one case, computed without ldmfast.synthesis:
    the case's CTP-usable slices generated in groups of batch_size (padded by repetition) with the
    documented seeds, mapped back in float64 with the case's clip bounds (or [0, 1])."""
    volumes = load_case(case)
    stats = None
    if scale == "case":
        stats = {name: mri_to_unit(getattr(volumes, name), volumes.mask)[1] for name in ("dwi", "adc")}
    volumes.dwi = volumes.adc = None
    prepared = preprocess_case(volumes)
    seeds = [slice_seed(seed, case.case_id, int(i), sample) for i in prepared.slice_index]
    ctp = torch.from_numpy(prepared.ctp)
    images = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for start in range(0, len(seeds), batch_size):
            chunk, chunk_seeds = ctp[start:start + batch_size], seeds[start:start + batch_size]
            pad = batch_size - len(chunk_seeds)
            chunk = torch.cat([chunk, chunk[-1:].expand(pad, *chunk.shape[1:])])
            out = model.generate(chunk, chunk_seeds + [chunk_seeds[-1]] * pad, steps=steps)
            images.append(out[:len(chunk_seeds)].double().numpy())
    finally:
        torch.set_num_threads(threads)
    images = np.concatenate(images)
    result = {}
    for channel, name in enumerate(("dwi", "adc")):
        low, high = (stats[name].low, stats[name].high) if stats else (0.0, 1.0)
        values = (np.clip(images[:, channel], -1, 1) + 1) / 2 * (high - low) + low
        volume = np.zeros(prepared.spatial_shape)
        volume[:, :, prepared.slice_index] = np.moveaxis(values * prepared.mask, 0, -1)
        result[name] = volume
    return result


def cases_of(data: Path):
    return find_cases(data)
