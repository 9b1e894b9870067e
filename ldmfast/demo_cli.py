"""The `ldmfast demo` subcommand."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

_EXAMPLE = """examples:
  ldmfast demo                          # everything, on the CPU or the GPU, in minutes
  ldmfast demo --output runs/demo --device cpu
  ldmfast demo --steps ldm=100,posttrain=20 --sample-steps 5   # a quicker, rougher look
  ldmfast demo --output ldmfast-demo-seed1 --seed 1              # another run: other phantom cases and models

What it does: generates a phantom data set (CTP, DWI, ADC, brain and lesion masks), trains a small
VQGAN, a cLDM on its latents, post-trains the cLDM with the lesion-aware loss, synthesizes DWI/ADC
for the held-out cases with both the base and the post-trained model, evaluates both and writes an
HTML report. Rerun the same command to continue an interrupted demo: finished stages are kept.
Stage configurations: ldmfast/configs/{vqgan,ldm,posttrain}_demo.toml.
"""


def add_demo_parser(subparsers) -> argparse.ArgumentParser:
    demo = subparsers.add_parser(
        "demo", help="the whole method on built-in phantom data (train, post-train, synthesize, evaluate)",
        description="Run the whole pipeline end to end on generated phantom data and print base vs "
                    "post-trained metrics.", epilog=_EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    demo.add_argument("--output", default="ldmfast-demo", metavar="DIR", help="run folder (default: ldmfast-demo)")
    demo.add_argument("--device", default="auto", help="auto (GPU when present), cpu, cuda or cuda:N")
    demo.add_argument("--steps", default="", metavar="STAGE=N,...",
                      help="training steps per stage instead of the demo configuration's, e.g. ldm=100")
    demo.add_argument("--sample-steps", type=int, default=10, metavar="N", help="DDIM steps of the syntheses")
    demo.add_argument("--samples", type=int, default=None, metavar="N",
                      help="draws per held-out case that the metrics average (default 16: one draw's noise exceeds "
                      "the models' difference)")
    demo.add_argument("--seed", type=int, default=0, metavar="N",
                      help="seed of the phantom data, the split and the training (default 0); another seed is "
                      "another whole run")
    demo.add_argument("--quiet", action="store_true", help="no progress bars or stage messages (the results still)")
    demo.set_defaults(func=run_demo_command)
    return demo


def _parse_steps(text: str) -> dict[str, int]:
    from .demo import STAGES

    steps = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        stage, sep, value = item.partition("=")
        if not sep or stage not in STAGES or not value.isdigit() or int(value) < 1:
            raise ValueError(f"--steps: expected STAGE=N with STAGE in {', '.join(STAGES)} and N >= 1, got {item!r}")
        steps[stage] = int(value)
    return steps


def run_demo_command(args: argparse.Namespace) -> int:
    from ldmfast.data import DataError
    from ldmfast.interrupts import INTERRUPTIONS, report_interruption, stop_on_sigterm
    from ldmfast.train.config import ConfigError

    from .demo import DemoSettings, run_demo

    stop_on_sigterm()
    try:
        if args.sample_steps < 1:
            raise ValueError(f"--sample-steps: must be >= 1, got {args.sample_steps}")
        if not 0 <= args.seed < 2**31:
            raise ValueError(f"--seed: must be in [0, 2^31), got {args.seed}")
        if args.samples is not None and args.samples < 1:
            raise ValueError(f"--samples: must be >= 1, got {args.samples}")
        settings = DemoSettings(output_dir=Path(args.output), device=args.device, steps=_parse_steps(args.steps),
                                sample_steps=args.sample_steps, seed=args.seed, progress=not args.quiet)
        if args.samples is not None:  # (else the demo's default, kept in one place)
            settings.samples = args.samples
        run_demo(settings)
    except (ValueError, ConfigError, DataError, RuntimeError) as err:
        print(f"ldmfast demo: error: {err}", file=sys.stderr)
        return 2
    except INTERRUPTIONS as err:
        return report_interruption("ldmfast demo", err, "run the same command again to continue: finished "
                                                        "stages are kept")
    return 0
