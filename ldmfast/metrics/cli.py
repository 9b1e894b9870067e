"""The `ldmfast evaluate` subcommand, wired into `ldmfast` by ldmfast/cli.py."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

_EXAMPLE = """examples:
  ldmfast evaluate --pred runs/cldm/synth --ref data/test --out eval/cldm
  ldmfast evaluate --pred runs/cldm/synth --compare runs/cldm-pt/synth --labels base post-trained \\
      --ref data/test --out eval/base-vs-pt --region brain
  ldmfast evaluate --pred synth --ref data/test --out eval --fid-weights pt_inception-2015-12-05-6726825d.pth
  ldmfast evaluate --pred synth --ref data/test --out eval --fid-extractor radimagenet \\
      --fid-weights RadImageNet-ResNet50_notop.pth --figure-slice case_007:14 --figure-slice case_012:9

outputs (in --out): cases.csv (per run and case), slices.csv (per run and slice), summary.json
(settings, data-set statistics, FID, differences between runs), report.html with figures/*.png.
Column names say the scale: normalized_* (the model's [-1, 1] scale, the paper's, the default in
the report) and original_* (stored intensities). Undefined values (lesion MAE without a lesion)
are empty in the CSV files and null in the JSON.
"""


def add_evaluate_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `evaluate` subcommand to an argparse subparsers object; `func` runs it."""
    parser = subparsers.add_parser(
        "evaluate",
        help="metrics, tables and an HTML report of synthesized DWI/ADC against a reference",
        description="Compare synthesized DWI/ADC volumes (--pred, as `ldmfast` writes them: <case>/{dwi,adc}.nii.gz) "
        "with a reference data set (--ref, any layout ldmfast reads) on the reference's usable slices: MAE, PSNR, "
        "SSIM, MS-SSIM and lesion MAE per slice, volume and data set, in the normalized and original intensity "
        "scales; FID when a weights file is given. --compare adds a second run (e.g. post-trained) side by side.",
        epilog=_EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--pred", required=True, help="folder of synthesized cases (the baseline run when comparing)")
    parser.add_argument("--ref", required=True, help="reference data set: folder or CSV manifest with CTP, DWI, ADC")
    parser.add_argument("--out", required=True, help="folder for the CSV, JSON and report (created if needed)")
    parser.add_argument("--compare", help="a second folder of synthesized cases, shown beside --pred with differences")
    parser.add_argument("--labels", nargs=2, metavar=("PRED", "COMPARE"),
                        help="names of the runs (default: the folders' names)")
    parser.add_argument("--layout", default="auto", choices=("auto", "release", "isles24", "manifest"),
                        help="layout of --ref (default: detected)")
    parser.add_argument("--region", default="slice", choices=("slice", "brain"),
                        help="MAE/PSNR/SSIM/MS-SSIM over the whole slice (default, as usually reported) or the brain mask")
    parser.add_argument("--ms-ssim-scales", type=int, default=5,
                        help="MS-SSIM scales, 1-5 (default 5: slices need >= 176 pixels a side; fewer for small slices)")
    parser.add_argument("--samples", default="all", choices=("all", "first"),
                        help="cases synthesized with several samples (synthesize --samples): all, each value the mean "
                        "over the draws (default), or first, draw 0 alone")
    parser.add_argument("--fid-weights", help="weights file of the FID extractor; without it FID is reported unavailable")
    parser.add_argument("--fid-extractor", default="inception", choices=("inception", "radimagenet"),
                        help="inception: pt_inception-2015-12-05-6726825d.pth (standard FID); radimagenet: "
                        "RadImageNet-ResNet50_notop.pth (default: inception)")
    parser.add_argument("--figure-cases", type=int, default=4,
                        help="cases drawn in the report: those with the largest lesion, at their largest lesion slice (default 4)")
    parser.add_argument("--figure-slice", action="append", default=[], metavar="CASE:Z",
                        help="draw this axial slice of this case instead (repeatable)")
    parser.add_argument("--error-max", type=float, default=0.5,
                        help="absolute error (normalized scale) at which error maps saturate (default 0.5)")
    parser.add_argument("--device", default=None, help="torch device for metrics and FID (default: cuda if available, else cpu)")
    parser.add_argument("--batch-size", type=int, default=64, help="slices per batch (default 64)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=run_evaluate)
    return parser


def _figure_slices(values: list[str]) -> list[tuple[str, int]]:
    out = []
    for v in values:
        case, sep, z = v.rpartition(":")
        if not sep or not case or not z.isdigit():
            raise ValueError(f"--figure-slice: expected CASE:Z (e.g. case_007:14), got {v!r}")
        out.append((case, int(z)))
    return out


def run_evaluate(args: argparse.Namespace) -> int:
    """Handler of `ldmfast evaluate`: 0 on success, 2 on bad arguments or input."""
    import torch

    from ldmfast.data import DataError
    from ldmfast.interrupts import INTERRUPTIONS, report_interruption, stop_on_sigterm

    from .evaluate import EvaluateOptions, evaluate
    from .extractors import load_extractor
    from .report import write_report
    from .results import write_csv, write_summary

    def fail(message: str) -> int:
        print(f"ldmfast evaluate: error: {message}", file=sys.stderr)
        return 2

    stop_on_sigterm()
    # Arguments checked before minutes of metrics, and before anything is written.
    if not 0 < args.error_max < float("inf"):
        return fail(f"--error-max: must be a positive number, got {args.error_max}")
    if args.figure_cases < 0:
        return fail(f"--figure-cases: must be >= 0, got {args.figure_cases}")
    if args.batch_size < 1:
        return fail(f"--batch-size: must be >= 1, got {args.batch_size}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        parsed = torch.device(device)
    except RuntimeError as err:
        return fail(f"--device: {err}")
    if parsed.type == "cuda" and not (torch.cuda.is_available() and (parsed.index or 0) < torch.cuda.device_count()):
        return fail(f"--device: {device} is not available here ({torch.cuda.device_count()} CUDA devices)")
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        return fail(f"--out: cannot create {out}: {err}")
    if not os.access(out, os.W_OK):
        return fail(f"--out: {out} is not writable")
    try:
        options = EvaluateOptions(region=args.region, ms_ssim_scales=args.ms_ssim_scales, device=device,
                                  batch_size=args.batch_size, samples=args.samples)
        folders = [args.pred] + ([args.compare] if args.compare else [])
        labels = args.labels[: len(folders)] if args.labels else [Path(f).resolve().name for f in folders]
        if len(labels) > 1 and labels[0] == labels[1]:
            labels = [f"{labels[0]} (pred)", f"{labels[1]} (compare)"]
        extractor, reason = None, "no FID weights file given (--fid-weights)"
        if args.fid_weights:
            # Loaded first: a bad weights file fails before minutes of metrics, not after.
            extractor = load_extractor(args.fid_extractor, args.fid_weights).to(device)
        evaluation = evaluate(args.ref, list(zip(labels, folders)), options, layout=args.layout, extractor=extractor,
                              fid_unavailable=reason, figure_cases=args.figure_cases,
                              figure_slices=_figure_slices(args.figure_slice), progress=not args.quiet,
                              exclude=(out,))
        write_csv(out / "cases.csv", evaluation, "cases")
        write_csv(out / "slices.csv", evaluation, "slices")
        write_summary(out / "summary.json", evaluation)
        report = write_report(out, evaluation, error_max=args.error_max)
    except (DataError, ValueError, FileNotFoundError) as err:
        return fail(str(err))
    except OSError as err:  # writing the results (a full disk, a file removed meanwhile)
        return fail(f"--out: {err}")
    except INTERRUPTIONS as err:
        return report_interruption("ldmfast evaluate", err, "results are written at the end only; run it again")
    if not args.quiet:
        if evaluation.not_predicted:
            print(f"{len(evaluation.not_predicted)} reference case(s) without prediction, not evaluated")
        print(f"wrote {out / 'cases.csv'}, {out / 'slices.csv'}, {out / 'summary.json'} and {report}")
    return 0
