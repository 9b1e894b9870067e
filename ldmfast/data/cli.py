"""Command-line hooks of the data layer, wired into `ldmfast` by ldmfast/cli.py."""

from __future__ import annotations

import argparse
import os
import sys

from .phantom import make_phantom_dataset

_PHANTOM_EXAMPLE = """example:
  ldmfast phantom data/phantom                       # 8 cases of 64 x 64 x 8, 15 frames
  ldmfast phantom data/big --cases 40 --shape 224 224 32 --seed 1 --lesion-fraction 0.5
"""


def add_phantom_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `phantom` subcommand to an argparse subparsers object; `func` runs it."""
    parser = subparsers.add_parser(
        "phantom",
        help="write a synthetic stroke data set (release layout)",
        description="Write a synthetic stroke data set in the reference release's layout "
        "(OUT_DIR/<case>/{ctp,dwi,adc,mask,lesion}.nii.gz, 1 x 1 x 4 mm voxels), "
        "deterministic by seed: CTP contrast curves with a delayed, reduced territory around "
        "an infarct core that is bright on DWI and dark on ADC; some cases have no lesion.",
        epilog=_PHANTOM_EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("out_dir", help="folder to write the cases into (created if needed)")
    parser.add_argument("--cases", type=int, default=8, help="number of cases (default: 8)")
    parser.add_argument(
        "--shape", type=int, nargs=3, default=(64, 64, 8), metavar=("X", "Y", "Z"),
        help="volume size in voxels; keep X and Y divisible by 4 for the models (default: 64 64 8)",
    )
    parser.add_argument("--frames", type=int, default=15, help="CTP time frames (default: 15)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument(
        "--lesion-fraction", type=float, default=0.75, help="fraction of cases with a lesion (default: 0.75)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=run_phantom)
    return parser


def run_phantom(args: argparse.Namespace) -> int:
    """Handler of `ldmfast phantom`: 0 on success, 2 on invalid arguments or an unwritable folder."""
    from ldmfast.interrupts import INTERRUPTIONS, report_interruption, stop_on_sigterm

    if os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
        print(f"ldmfast phantom: error: out_dir: {args.out_dir} exists and is not a folder", file=sys.stderr)
        return 2
    stop_on_sigterm()
    try:
        folders = make_phantom_dataset(
            args.out_dir,
            n_cases=args.cases,
            shape=tuple(args.shape),
            n_frames=args.frames,
            seed=args.seed,
            lesion_fraction=args.lesion_fraction,
            progress=not args.quiet,
        )
    except ValueError as err:
        print(f"ldmfast phantom: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a folder that cannot be written, a full disk
        print(f"ldmfast phantom: error: out_dir: {err}", file=sys.stderr)
        return 2
    except INTERRUPTIONS as err:
        return report_interruption("ldmfast phantom", err, "every file written is whole, but cases may be missing "
                                                         "files; run the same command again")
    if not args.quiet:
        print(f"wrote {len(folders)} cases to {args.out_dir}")
    return 0
