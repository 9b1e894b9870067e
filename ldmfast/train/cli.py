"""Command-line hooks of the training stages: `ldmfast train vqgan --config FILE`."""
from __future__ import annotations

import argparse
import sys

_VQGAN_EXAMPLE = """example:
  ldmfast train vqgan --config configs/vqgan_demo.toml
  ldmfast train vqgan --config configs/vqgan_demo.toml --set train.steps=3000 --resume
  torchrun --nproc_per_node 4 -m ldmfast train vqgan --config configs/vqgan_release.toml

a configuration (TOML; every key not given keeps its default):
  output_dir = "runs/vqgan"          # checkpoints, metrics.jsonl, samples/, vqgan/ (the model)
  seed = 0
  device = "auto"                     # auto, cpu, cuda

  [data]
  root = "data/release"               # or: phantom = { cases = 12, shape = [64, 64, 8] }
  size = [192, 224]                   # slices are centre-cropped/padded to this (H, W)
  val_fraction = 0.1                  # cases held out for validation

  [model]                             # defaults: the paper's release configuration
  base_channels = 128
  channel_mult = [1, 2, 4]            # downsampling factor 2^(len - 1)
  num_res_blocks = 2
  attn_resolutions = []               # downsampling factors with attention; middle block: mid_attention
  latent_channels = 3
  num_codes = 8192

  [loss]
  disc_start = 30000                  # hinge PatchGAN with adaptive weight from this step on
  disc_weight = 0.2

  [optim]
  base_lr = 4.5e-6                    # lr = base_lr x effective batch unless lr is given
  betas = [0.5, 0.9]

  [train]
  batch_size = 8
  grad_accum = 1
  steps = 200000
  val_every = 2000                    # validation PSNR / MAE on the held-out cases
  ckpt_every = 2000
  amp = "auto"                        # bf16 autocast on GPU

See configs/vqgan_demo.toml and configs/vqgan_release.toml for complete files.
"""


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    """Add `train` (with its `vqgan` subcommand) to an argparse subparsers object."""
    train = subparsers.add_parser("train", help="train a model stage (vqgan)",
                                  description="Train one stage of the pipeline from a TOML configuration.")
    stages = train.add_subparsers(dest="stage", metavar="STAGE", required=True)
    vqgan = stages.add_parser(
        "vqgan", help="train the VQGAN autoencoder (stage 1)",
        description="Train the VQGAN of stage 1 on DWI/ADC slices. Resumes from the run folder's latest "
                    "checkpoint automatically; runs on several processes under torchrun (DDP).",
        epilog=_VQGAN_EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    vqgan.add_argument("--config", required=True, metavar="FILE", help="TOML configuration file")
    vqgan.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                       help="override a configuration key, e.g. --set train.steps=500 (repeatable)")
    resume = vqgan.add_mutually_exclusive_group()
    resume.add_argument("--resume", action="store_true", default=None,
                        help="require a checkpoint to continue from (default: continue if there is one)")
    resume.add_argument("--no-resume", dest="resume", action="store_false",
                        help="refuse to start if the run folder already holds checkpoints")
    vqgan.add_argument("--quiet", action="store_true", help="no progress bar")
    vqgan.set_defaults(func=run_train_vqgan)
    return train


def run_train_vqgan(args: argparse.Namespace) -> int:
    """Handler of `ldmfast train vqgan`: 0 on success, 2 on a refused configuration."""
    from ldmfast.data import DataError

    from .config import ConfigError, load_config
    from .distributed import shutdown_distributed
    from .vqgan import train_vqgan
    from .vqgan_config import VQGANTrainConfig

    try:
        config = load_config(args.config, VQGANTrainConfig, args.overrides)
        summary = train_vqgan(config, resume=args.resume, progress=not args.quiet)
    except (ConfigError, DataError) as err:
        print(f"ldmfast train vqgan: error: {err}", file=sys.stderr)
        return 2
    finally:
        shutdown_distributed()
    if not args.quiet:
        psnr = summary.get("val_psnr")
        print(f"trained to step {summary['step']}" + (f", validation PSNR {psnr:.2f} dB" if psnr is not None else "")
              + f"; model in {summary['run_dir']}/vqgan")
    return 0
