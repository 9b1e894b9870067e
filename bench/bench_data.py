"""Throughput of the training data pipeline: slice cache hit vs NIfTI read each time.

Both pipelines give the same samples (preprocessed, cropped/padded, augmented, batched by a
DataLoader); they differ only in where a slice comes from: the memory-mapped slice cache,
or loading and preprocessing the case's NIfTI files for every slice. Runs on a phantom
data set written to a temporary folder. Prints a table and writes
bench/results/data-<device>-<YYYY-MM-DD>.json (bench/common.py names the device).

    python bench/bench_data.py                      # about 30 s on 2 CPU cores
    python bench/bench_data.py --shape 224 224 32 --size 192 224 --workers 4
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import torch
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from ldmfast.data import (  # noqa: E402
    TRAINING_MODALITIES,
    AugmentConfig,
    SliceDataset,
    find_cases,
    load_case,
    make_phantom_dataset,
    preprocess_case,
    slice_sample,
)


class NiftiSliceDataset(Dataset):
    """The uncached pipeline: every sample loads and preprocesses its case's NIfTI files."""

    def __init__(self, cases, index: list[tuple[int, int]], size, augment):
        self.cases, self.index, self.size, self.augment = cases, index, size, augment

    def __len__(self):
        return len(self.index)

    def __getitem__(self, i):
        position, local = self.index[i]
        prepared = preprocess_case(load_case(self.cases[position]), require_target=True)
        sample = slice_sample(
            prepared.ctp[local],
            prepared.target[local],
            prepared.mask[local],
            prepared.lesion[local],
            size=self.size,
            augment=self.augment,  # drawn from torch's global generator, which DataLoader seeds per worker
        )
        sample["case_id"] = prepared.case_id
        sample["slice_index"] = int(prepared.slice_index[local])
        return sample


class Meter:
    """Slices per second of one pipeline, accumulated over timed rounds. Rounds of the two
    pipelines alternate, so load from other processes on the machine hits both alike."""

    def __init__(self, dataset: Dataset, batch_size: int, workers: int):
        torch.manual_seed(0)
        self.loader = DataLoader(
            dataset, batch_size=batch_size, shuffle=True, num_workers=workers, persistent_workers=workers > 0
        )
        self.batches = iter(self.loader)
        next(self.batches)  # warm-up: starts the workers, opens the files
        self.slices, self.seconds = 0, 0.0

    def run(self, seconds: float) -> None:
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            try:
                batch = next(self.batches)
            except StopIteration:
                self.batches = iter(self.loader)
                continue
            self.slices += batch["ctp"].shape[0]
        self.seconds += time.perf_counter() - start

    def result(self) -> dict:
        return {
            "slices": self.slices,
            "seconds": round(self.seconds, 3),
            "slices_per_second": round(self.slices / self.seconds, 1),
        }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=8, help="phantom cases (default: 8)")
    parser.add_argument("--shape", type=int, nargs=3, default=(128, 128, 16), metavar=("X", "Y", "Z"),
                        help="phantom volume size (default: 128 128 16)")
    parser.add_argument("--size", type=int, nargs=2, default=(96, 112), metavar=("H", "W"),
                        help="training slice size to crop/pad to (default: 96 112; the release: 192 224)")
    parser.add_argument("--batch-size", type=int, default=8, help="slices per batch (default: 8)")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers (default: 0)")
    parser.add_argument("--seconds", type=float, default=8.0, help="timed seconds per pipeline (default: 8)")
    parser.add_argument("--rounds", type=int, default=4, help="alternating timed rounds (default: 4)")
    parser.add_argument("--no-save", action="store_true", help="print only, write no JSON")
    args = parser.parse_args(argv)

    augment, size = AugmentConfig(), tuple(args.size)
    with tempfile.TemporaryDirectory(prefix="ldmfast-bench-data-") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        make_phantom_dataset(tmp / "data", n_cases=args.cases, shape=tuple(args.shape), progress=False)
        phantom_s = time.perf_counter() - t0
        cases = find_cases(tmp / "data", require=TRAINING_MODALITIES)

        t0 = time.perf_counter()
        cached = SliceDataset(cases, tmp / "cache", augment=augment, size=size, progress=False)
        build_s = time.perf_counter() - t0
        index = [(p, local) for p, e in enumerate(cached.entries) for local in range(e.n_slices)]
        uncached = NiftiSliceDataset(cases, index, size, augment)

        meters = {
            "cache hit": Meter(cached, args.batch_size, args.workers),
            "NIfTI each time": Meter(uncached, args.batch_size, args.workers),
        }
        for _ in range(args.rounds):
            for meter in meters.values():
                meter.run(args.seconds / args.rounds)
        results = {name: meter.result() for name, meter in meters.items()}
    baseline = results["NIfTI each time"]["slices_per_second"]
    rows = [{"pipeline": name, **r, "ratio": round(r["slices_per_second"] / baseline, 2)} for name, r in results.items()]

    device = torch.device("cpu")
    print(f"data pipeline on {common.device_tag(device)}: {args.cases} phantom cases of "
          f"{' x '.join(map(str, args.shape))} x 15 frames, slices {size[0]} x {size[1]}, batch {args.batch_size}, "
          f"{args.workers} workers, augmented")
    print(f"phantom written in {phantom_s:.2f} s; slice cache built in {build_s:.2f} s ({len(cached)} slices)")
    common.print_table(rows, ["pipeline", "slices", "seconds", "slices_per_second", "ratio"])
    print(f"cache hit: {rows[0]['ratio']:.1f}x the slices per second of reading NIfTI each time")
    if not args.no_save:
        meta = {
            "config": {
                "cases": args.cases,
                "shape": list(args.shape),
                "size": list(size),
                "batch_size": args.batch_size,
                "workers": args.workers,
                "seconds": args.seconds,
                "rounds": args.rounds,
            },
            "nibabel": nib.__version__,
            "phantom_seconds": round(phantom_s, 3),
            "cache_build_seconds": round(build_s, 3),
        }
        print(f"saved {common.save('data', device, rows, meta)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
