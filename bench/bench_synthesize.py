"""End-to-end batch synthesis of N phantom volumes: `ldmfast.synthesis` (slices batched across
volumes, background reading and writing) against looping the cases one volume at a time.

Both read the NIfTI files, preprocess, sample with DDIM, decode and write NIfTI volumes, with the
same randomly initialized model (speed does not depend on training) and the same settings; the
per-volume loop calls the model once per case with all of that case's slices. Runs alternate,
so load from other processes on the machine hits both alike; the median run is reported, with
the process's CPU time (all threads), which on a shared machine says more than wall time.
Prints a table and writes bench/results/synthesize-<device>-<YYYY-MM-DD>.json.

    python bench/bench_synthesize.py                         # demo UNet, 8 cases of 64 x 64 x 8, CPU
    python bench/bench_synthesize.py --threads 1             # on a shared machine: compare cpu_seconds
    python bench/bench_synthesize.py --device cuda --cases 32 --shape 192 224 32 --batch-size 64 --steps 50
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from ldmfast.data import find_cases, make_phantom_dataset  # noqa: E402
from ldmfast.models import VQGAN, ConditionalLDM, UNetConfig, VQGANConfig  # noqa: E402
from ldmfast.synthesis import SynthesisConfig, prepare_case, slice_seed, synthesize, write_case  # noqa: E402
from ldmfast.synthesis.config import model_multiple, read_model_config  # noqa: E402


def demo_model(seed: int = 0) -> ConditionalLDM:
    """The demo UNet with the demo VQGAN (configs/vqgan_demo.toml), random weights."""
    torch.manual_seed(seed)
    vqgan = VQGAN(VQGANConfig(base_channels=32, channel_mult=[1, 2, 2], num_res_blocks=1, norm_groups=8,
                              num_codes=512).validate())
    return ConditionalLDM(UNetConfig.demo(), autoencoder=vqgan).eval()


def one_volume_at_a_time(config: SynthesisConfig, device: torch.device) -> int:
    """The plain loop: read a case, generate all its slices in one call, write it; next case."""
    model = ConditionalLDM.from_pretrained(config.model, device).eval()
    multiple = model_multiple(read_model_config(config.model))
    slices = 0
    for files in find_cases(config.input):
        case = prepare_case(files, frames=model.frames, multiple=multiple)
        seeds = [slice_seed(config.seed, case.case_id, int(i)) for i in case.prepared.slice_index]
        images = model.generate(torch.from_numpy(case.ctp).to(device), seeds, steps=config.steps)
        write_case(config.output, case, images.float().cpu().numpy()[None], {})
        slices += len(seeds)
    return slices


def batched(config: SynthesisConfig, device: torch.device) -> int:
    from ldmfast.train.distributed import DistInfo

    summary = synthesize(config, dist=DistInfo(0, 1, 0, device), progress=False)
    if summary.failed:
        raise RuntimeError(f"cases failed: {summary.failed}")
    return summary.slices


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=8, help="phantom volumes (default: 8)")
    parser.add_argument("--shape", type=int, nargs=3, default=(64, 64, 8), metavar=("X", "Y", "Z"),
                        help="volume size; X and Y divisible by 16 for the demo model (default: 64 64 8)")
    parser.add_argument("--steps", type=int, default=10, help="DDIM steps (default: 10)")
    parser.add_argument("--batch-size", type=int, default=32, help="slices per call, batched run (default: 32)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's); 1 makes the CPU-time column "
                        "robust to other load on a shared machine (no spinning OpenMP threads)")
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs of each (default: 3)")
    parser.add_argument("--no-save", action="store_true", help="print only, write no JSON")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="ldmfast-bench-synth-") as tmp:
        tmp = Path(tmp)
        make_phantom_dataset(tmp / "data", n_cases=args.cases, shape=tuple(args.shape), progress=False)
        demo_model().save_pretrained(tmp / "model")
        base = dict(model=str(tmp / "model"), input=str(tmp / "data"), steps=args.steps, device=args.device)
        other = 0 if device.type == "cuda" else 2
        variants = {
            "one volume at a time": (one_volume_at_a_time, {}),
            f"batched across volumes ({args.batch_size})": (batched, {"batch_size": args.batch_size}),
            # the other read-ahead than the device's default (CPU: none; GPU: 2 cases)
            f"batched ({args.batch_size}), read-ahead {other}": (batched, {"batch_size": args.batch_size,
                                                                          "prefetch": other}),
        }
        seconds = {name: [] for name in variants}
        cpu_seconds = {name: [] for name in variants}
        slices = {}
        for repeat in range(args.repeats + 1):  # the first round warms up (allocator, file cache)
            for i, (name, (run, extra)) in enumerate(variants.items()):
                config = SynthesisConfig(**base, **extra, output=str(tmp / f"out-{repeat}-{i}"))
                start, start_cpu = time.perf_counter(), time.process_time()
                slices[name] = run(config, device)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if repeat:
                    seconds[name].append(time.perf_counter() - start)
                    cpu_seconds[name].append(time.process_time() - start_cpu)
    baseline_name = next(iter(variants))
    rows = []
    for name, times in seconds.items():
        median = statistics.median(times)
        rows.append({"pipeline": name, "slices": slices[name], "seconds": round(median, 3),
                     "slices_per_second": round(slices[name] / median, 2),
                     "cpu_seconds": round(statistics.median(cpu_seconds[name]), 3)})
    base_rate = rows[0]["slices_per_second"]
    for row in rows:
        row["ratio"] = round(row["slices_per_second"] / base_rate, 2)

    print(f"synthesis on {common.device_tag(device)}: {args.cases} phantom volumes of "
          f"{' x '.join(map(str, args.shape))}, demo UNet + demo VQGAN, {args.steps} DDIM steps, "
          f"{torch.get_num_threads()} threads, median of {args.repeats} alternating runs")
    common.print_table(rows, ["pipeline", "slices", "seconds", "slices_per_second", "ratio", "cpu_seconds"])
    print(f"batched across volumes: {rows[1]['ratio']:.2f}x the slices per second of {baseline_name}")
    if not args.no_save:
        meta = {"config": {"cases": args.cases, "shape": list(args.shape), "steps": args.steps,
                           "batch_size": args.batch_size, "repeats": args.repeats, "model": "UNetConfig.demo() + "
                           "VQGAN(base 32, [1, 2, 2], 1 res block, 512 codes), random weights"},
                "note": "end to end: NIfTI read, preprocessing, DDIM, decoding, NIfTI write",
                "load_average_after": list(os.getloadavg())}
        print(f"saved {common.save('synthesize', device, rows, meta)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
