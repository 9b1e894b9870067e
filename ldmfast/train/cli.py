"""Command-line hooks of the training stages: `ldmfast train vqgan --config FILE`."""
from __future__ import annotations

import argparse
import sys

_VQGAN_EXAMPLE = """example:
  ldmfast train vqgan --config ldmfast/configs/vqgan_demo.toml
  ldmfast train vqgan --config ldmfast/configs/vqgan_demo.toml --set train.steps=3000 --resume
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

See ldmfast/configs/vqgan_demo.toml and configs/vqgan_release.toml for complete files.
"""


_LDM_EXAMPLE = """example:
  ldmfast train ldm --config ldmfast/configs/ldm_demo.toml
  ldmfast train ldm --config ldmfast/configs/ldm_demo.toml --set train.steps=2000 --set train.ema_decay=0.999
  torchrun --nproc_per_node 4 -m ldmfast train ldm --config configs/ldm_release.toml

a configuration (TOML; every key not given keeps its default, the paper's release):
  output_dir = "runs/ldm"             # checkpoints, metrics.jsonl, samples/, ldm/ (the model)
  autoencoder = "runs/vqgan/vqgan"    # a trained autoencoder folder (frozen)
  [data]                              # as for `train vqgan`
  [unet]                              # base_channels = 224, channel_mult = [1, 4, 8], ...
  [diffusion]                         # schedule = "linear", parameterization = "eps", ...
  [optim]                             # AdamW; lr = base_lr (2e-6) x effective batch unless lr is given
  [train]                             # batch_size = 48, steps, ema_decay, latent_cache = true,
                                      # val_sample_steps (DDIM steps of validation syntheses)

See ldmfast/configs/ldm_demo.toml and configs/ldm_release.toml for complete files.
"""

_POSTTRAIN_EXAMPLE = """example:
  ldmfast train posttrain --config ldmfast/configs/posttrain_demo.toml
  ldmfast train posttrain --config ldmfast/configs/posttrain_demo.toml --set posttrain.image_loss=l1
  torchrun --nproc_per_node 4 -m ldmfast train posttrain --config configs/posttrain_release.toml

a configuration (TOML; every key not given keeps its default, the paper's release):
  output_dir = "runs/posttrain"       # checkpoints, metrics.jsonl, samples/, ldm/ (the model)
  init = "runs/ldm/ldm"               # the trained cLDM folder (UNet, schedule, autoencoder)
  [data]                              # as for `train ldm`
  [posttrain]                         # lambda_img = 0.01, lambda_les = 0.02, image_loss = "l2",
                                      # image_target = "decoded" (D(z0)), timestep_weighting = "none",
                                      # decoder_checkpoint = true (per decoder block)
  [optim]                             # AdamW; lr = base_lr (2e-6) x effective batch (6)
  [train]                             # batch_size = 6, steps, early_stop_metric = "latent_loss",
                                      # early_stop_patience (validations; 0 = off), unet_checkpoint,
                                      # step_in_backward, recast_weight_copies (memory for time)

See ldmfast/configs/posttrain_demo.toml and configs/posttrain_release.toml for complete files.
"""

#: stage name -> (help, description, epilog, handler's "module:function config-class" names)
_STAGES = {
    "vqgan": ("train the VQGAN autoencoder (stage 1)",
              "Train the VQGAN of stage 1 on DWI/ADC slices.", _VQGAN_EXAMPLE,
              ("vqgan", "train_vqgan", "vqgan_config", "VQGANTrainConfig", "vqgan")),
    "ldm": ("train the conditional latent diffusion model (stage 2)",
            "Train the cLDM of stage 2 on the latents of a trained, frozen autoencoder (encoded once and "
            "cached), conditioned on CTP.", _LDM_EXAMPLE,
            ("ldm", "train_ldm", "ldm_config", "LDMTrainConfig", "ldm")),
    "posttrain": ("lesion-aware post-training of a trained cLDM (stage 3)",
                  "Post-train a cLDM with the latent, image and lesion losses of PAPER.md through the frozen, "
                  "gradient-checkpointed decoder.", _POSTTRAIN_EXAMPLE,
                  ("posttrain", "train_posttrain", "posttrain_config", "PostTrainConfig", "ldm")),
}


def _add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, metavar="FILE", help="TOML configuration file")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="override a configuration key, e.g. --set train.steps=500 (repeatable)")
    resume = parser.add_mutually_exclusive_group()
    resume.add_argument("--resume", action="store_true", default=None,
                        help="require a checkpoint to continue from (default: continue if there is one)")
    resume.add_argument("--no-resume", dest="resume", action="store_false",
                        help="refuse to start if the run folder already holds checkpoints")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    """Add `train` (with one subcommand per stage) to an argparse subparsers object."""
    train = subparsers.add_parser("train", help=f"train a model stage ({', '.join(_STAGES)})",
                                  description="Train one stage of the pipeline from a TOML configuration.")
    stages = train.add_subparsers(dest="stage", metavar="STAGE", required=True)
    for name, (help_text, description, epilog, handler) in _STAGES.items():
        parser = stages.add_parser(
            name, help=help_text, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter,
            description=description + " Resumes from the run folder's latest checkpoint automatically; runs on "
                                      "several processes under torchrun (DDP).")
        _add_common_arguments(parser)
        parser.set_defaults(func=run_train_stage, stage_handler=(name, *handler))
    return train


def run_train_stage(args: argparse.Namespace) -> int:
    """Handler of `ldmfast train STAGE`: 0 on success, 2 on a refused configuration."""
    import importlib

    from ldmfast.data import DataError
    from ldmfast.interrupts import INTERRUPTIONS, report_interruption, stop_on_sigterm

    from .config import ConfigError, load_config
    from .distributed import shutdown_distributed

    stage, loop_module, loop_name, config_module, config_name, model_dir = args.stage_handler
    train = getattr(importlib.import_module(f"ldmfast.train.{loop_module}"), loop_name)
    config_cls = getattr(importlib.import_module(f"ldmfast.train.{config_module}"), config_name)
    stop_on_sigterm()
    try:
        config = load_config(args.config, config_cls, args.overrides)
        summary = train(config, resume=args.resume, progress=not args.quiet)
    except (ConfigError, DataError) as err:
        print(f"ldmfast train {stage}: error: {err}", file=sys.stderr)
        return 2
    except INTERRUPTIONS as err:
        return report_interruption(f"ldmfast train {stage}", err, "the run goes on from its latest checkpoint "
                                                                  "when the same command is run again")
    finally:
        shutdown_distributed()
    if not args.quiet:
        print(f"trained to step {summary['step']}" + (" (stopped early)" if summary.get("stopped_early") else "")
              + _validation_summary(summary) + _best_summary(summary) + f"; model in {summary['run_dir']}/{model_dir}")
    return 0


def _best_summary(summary: dict) -> str:
    """With early stopping, the model folder holds the best validation's model, not the last's."""
    if "best_metric" not in summary:
        return ""
    if summary.get("best") is None:
        return f"; {summary['best_metric']} was never finite: the model is the latest"
    return f"; the model is the best: {summary['best_metric']} {summary['best']:.4g} at step {summary['best_step']}"


def _validation_summary(summary: dict) -> str:
    parts = []
    if summary.get("val_psnr") is not None:
        parts.append(f"PSNR {summary['val_psnr']:.2f} dB")
    if summary.get("val_latent_loss") is not None:
        parts.append(f"latent loss {summary['val_latent_loss']:.4f}")
    if summary.get("val_lesion_mae") is not None:
        parts.append(f"lesion MAE {summary['val_lesion_mae']:.4f}")
    last = "last validation" if "best_metric" in summary else "validation"
    return (f", {last} " + ", ".join(parts)) if parts else ""
