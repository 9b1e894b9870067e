"""The `ldmfast synthesize` subcommand, wired into `ldmfast` by ldmfast/cli.py."""
from __future__ import annotations

import argparse
import sys

from ldmfast.data.layouts import LAYOUTS
from ldmfast.diffusion import SPACINGS

from .config import DTYPES, SCALES

_EXAMPLE = """examples:
  ldmfast synthesize --model runs/cldm/model --input data/test --output synth/test
  ldmfast synthesize --model runs/cldm/model --input cases.csv --output synth --steps 20 --samples 3 --seed 7
  ldmfast synthesize --config configs/synthesize_demo.toml --batch-size 32     # flags override the file
  torchrun --nproc_per_node 4 -m ldmfast synthesize --config synth.toml         # cases sharded across GPUs

outputs: OUTPUT/<case>/dwi.nii.gz and adc.nii.gz on the CTP's grid, with its affine and header
(further samples: dwi_s1.nii.gz, adc_s1.nii.gz, ...), and synthesis.json (settings, scale, slices),
written last: a case is finished when its synthesis.json is there. A rerun skips finished cases
(--overwrite redoes them); an interrupted run leaves no partial file. A case that cannot be read is
reported and skipped; the exit status is 1 when any case failed, 2 for a refused configuration.

intensity scale (--scale): "case" maps slices back with the case's own DWI/ADC clip bounds (0.5 and
99.5 percentiles in the brain mask, as the reference release does; needs DWI and ADC files); "unit"
writes the normalized [0, 1] scale; "auto" (default) is "case" where the case has DWI and ADC, else
the model folder's intensity_stats.json ({"dwi": [low, high], "adc": [low, high]}) if it has one,
else "unit". synthesis.json records the scale of each case.

a configuration file (TOML; every key is optional and a flag of the same name overrides it):
  model = "runs/cldm/model"
  input = "data/test"              # folder (release or ISLES'24 layout) or CSV manifest
  output = "synth/test"
  batch_size = 16                  # slices per model call, taken across volumes
  steps = 50
  eta = 0.0
  seed = 0                         # slice seeds derive from (seed, case, slice, sample)
  samples = 1
  size = [192, 224]                # crop/pad slices to the training size (default: as they are)
"""


def add_synthesize_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `synthesize` subcommand to an argparse subparsers object; `func` runs it."""
    parser = subparsers.add_parser(
        "synthesize", help="synthesize DWI/ADC volumes from the CTP of every case of a data set",
        description="Synthesize DWI and ADC volumes (NIfTI) from the CT perfusion of every case of a data set with "
                    "a trained conditional LDM, slices batched across volumes to fill the device. Runs on several "
                    "processes under torchrun, each writing its share of the cases.",
        epilog=_EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--config", metavar="FILE", help="TOML configuration file with any of the keys below")
    add("--model", metavar="DIR", help="model folder (config.json, model.safetensors, autoencoder/)")
    add("--input", metavar="DIR|CSV", help="data folder (release or ISLES'24 layout) or CSV manifest")
    add("--output", metavar="DIR", help="output folder (created if needed; must not be the input)")
    add("--layout", choices=LAYOUTS, help="input layout (default: auto, detected)")
    add("--batch-size", type=int, metavar="N", help="slices per model call, across volumes (default: 16)")
    add("--steps", type=int, metavar="N", help="DDIM steps (default: 50)")
    add("--eta", type=float, help="DDIM eta; 0 is deterministic given the seed (default: 0)")
    add("--spacing", choices=SPACINGS, help="DDIM timestep spacing (default: uniform)")
    add("--samples", type=int, metavar="K", help="samples per case (default: 1)")
    add("--seed", type=int, help="run seed; slice seeds derive from (seed, case, slice, sample) (default: 0)")
    add("--device", help="auto, cpu, cuda or cuda:N (default: auto; under torchrun each process takes its GPU)")
    add("--size", type=int, nargs=2, metavar=("H", "W"), help="crop/pad slices to H x W for the model "
        "(default: each case's own in-plane size, which must suit the model)")
    add("--scale", choices=SCALES, help="intensity scale of the outputs (default: auto; see below)")
    add("--dtype", choices=DTYPES, help="sampling precision (default: auto: bfloat16 on a GPU where supported)")
    graph = parser.add_mutually_exclusive_group()
    graph.add_argument("--cuda-graph", dest="cuda_graph", action="store_true", default=None,
                       help="replay the denoiser as a CUDA graph (default: on a GPU where supported)")
    graph.add_argument("--no-cuda-graph", dest="cuda_graph", action="store_false")
    add("--prefetch", type=int, metavar="N", help="cases read ahead in a background thread (default: 2 on a GPU, "
        "0 on the CPU, where reading would compete with the model for cores)")
    add("--overwrite", action="store_true", default=None, help="redo cases whose outputs are complete")
    add("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=run_synthesize)
    return parser


_KEYS = ("model", "input", "output", "layout", "batch_size", "steps", "eta", "spacing", "samples", "seed", "device",
         "size", "scale", "dtype", "cuda_graph", "prefetch", "overwrite")


def run_synthesize(args: argparse.Namespace) -> int:
    """Handler of `ldmfast synthesize`: 0 when every case was written or skipped, 1 when any case
    failed, 2 on a refused configuration."""
    from ldmfast.data import DataError
    from ldmfast.interrupts import INTERRUPTIONS, report_interruption, stop_on_sigterm
    from ldmfast.train.config import ConfigError
    from ldmfast.train.distributed import init_distributed, shutdown_distributed

    from .config import load_synthesis_config
    from .runner import synthesize

    stop_on_sigterm()
    overrides = {key: getattr(args, key) for key in _KEYS}
    if overrides["size"] is not None:
        overrides["size"] = list(overrides["size"])
    try:
        config = load_synthesis_config(args.config, overrides)
        dist = init_distributed(config.device)  # RuntimeError: a CUDA device asked for but absent
    except (ConfigError, RuntimeError) as err:
        print(f"ldmfast synthesize: error: {err}", file=sys.stderr)
        return 2
    try:
        summary = synthesize(config, dist=dist, progress=not args.quiet)
    except (ConfigError, DataError) as err:  # refused settings, or an input with no case at all
        print(f"ldmfast synthesize: error: {err}", file=sys.stderr)
        return 2
    except INTERRUPTIONS as err:
        return report_interruption("ldmfast synthesize", err, f"the cases written so far in {config.output} are "
                                                              "complete; run the same command again to go on")
    finally:
        shutdown_distributed()
    if dist.is_main:
        print(f"written {len(summary.written)} cases ({summary.slices} slices, {summary.slices_per_second:.2f} "
              f"slices/s), skipped {len(summary.skipped)} already complete, failed {len(summary.failed)}"
              + (f"; outputs in {config.output}" if summary.written or summary.skipped else ""))
        for case_id, reason in summary.failed.items():
            print(f"  failed: {case_id}: {reason}")
    return 1 if summary.failed else 0
