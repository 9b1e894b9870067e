"""Stage 1 training loop: the VQGAN with L1 + codebook losses, then the adaptive hinge GAN term.

Run folder (`output_dir`): config.json (the full configuration), metrics.jsonl (training and
validation records), checkpoints/ (exact-resume checkpoints), vqgan/ (the latest model in
`VQGAN.from_pretrained` form), samples/ (validation reconstructions as PNG), cache/ and,
for phantom data, phantom/.
"""
from __future__ import annotations

import contextlib
import math
from collections import defaultdict

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ldmfast.models import (VQGAN, PatchDiscriminator, PerceptualLoss, adaptive_gan_weight, hinge_d_loss,
                            hinge_g_loss)

from . import optim
from .data import TrainBatches, build_datasets, validation_loader
from .distributed import DistInfo, all_reduce_sum
from .preview import reconstruction_grid, write_png_grey
from .stage import StageTrainer
from .vqgan_config import VQGANTrainConfig

#: Images are in [-1, 1]: PSNR's peak-to-peak range is 2.
DATA_RANGE = 2.0


def _set_requires_grad(module: nn.Module, flag: bool) -> None:
    for p in module.parameters():
        p.requires_grad_(flag)


def _average_gradients(module: nn.Module, world_size: int) -> None:
    """All-reduce a module's gradients (for the discriminator, which is not wrapped in DDP: it
    runs twice per step, on real and on fake images, as in the reference)."""
    if world_size == 1:
        return
    for p in module.parameters():
        if p.grad is not None:
            all_reduce_sum(p.grad).div_(world_size)


class VQGANTrainer(StageTrainer):
    """One training run; `run()` trains to `train.steps`, resuming from the run folder's latest
    checkpoint when `resume` is None (auto) or True (required)."""

    stage = "vqgan"
    # The discriminator's width and depth shape its tensors in the checkpoint.
    resume_settings = {"loss.disc_channels": None, "loss.disc_layers": None}

    def __init__(self, config: VQGANTrainConfig, *, resume: bool | None = None, progress: bool = True,
                 dist_info: DistInfo | None = None):
        super().__init__(config, progress=progress, dist_info=dist_info)
        t, c = config.train, config
        self.train_set, self.val_set = build_datasets(c.data, self.run_dir, c.seed, self.dist, self.progress)
        self.batches = TrainBatches(self.train_set, batch_size=t.batch_size, seed=c.seed, dist_info=self.dist,
                                    augment=c.data.augment.to_augment_config(), num_workers=c.data.num_workers)

        self.model = VQGAN(c.model).to(self.device, memory_format=self.memory_format)
        self.disc = PatchDiscriminator(c.model.out_channels, c.loss.disc_channels, c.loss.disc_layers).to(
            self.device, memory_format=self.memory_format)
        self.perceptual = (PerceptualLoss(c.loss.perceptual_weights).to(self.device)
                           if c.loss.perceptual_weight > 0 else None)
        self.lr = c.optim.lr if c.optim.lr is not None else c.optim.base_lr * self.effective_batch
        self.opt_g = optim.adam([p for p in self.model.parameters() if p.requires_grad], lr=self.lr,
                                betas=c.optim.betas)
        self.opt_d = optim.adam(self.disc.parameters(), lr=self.lr, betas=c.optim.betas)
        self._finish_setup(resume)
        self.generator = (DistributedDataParallel(self.model, device_ids=[self.device.index]
                                                  if self.device.type == "cuda" else None)
                          if self.dist.distributed else self.model)

    def _modules(self) -> dict[str, nn.Module]:
        return {"vqgan": self.model, "disc": self.disc}

    def _optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"vqgan": self.opt_g, "disc": self.opt_d}

    def export(self) -> None:
        self.model.save_pretrained(self.run_dir / "vqgan")

    def batch_iterator(self):
        return self.batches.iterate(self.step * self.config.train.grad_accum)

    def _postfix(self, losses: dict) -> dict:
        return {"rec": f"{losses['rec_loss']:.4f}", "ppl": f"{losses['perplexity']:.0f}"}

    def _describe_validation(self, m: dict) -> str:
        return f"PSNR {m['psnr']:.2f} dB, MAE {m['mae']:.4f}, lesion MAE {m['lesion_mae']:.4f}"

    # ---- one optimizer step -----------------------------------------------------------------

    def _micro_step(self, x: torch.Tensor, gan_on: bool, scale: float, sync: bool, sums: dict) -> None:
        loss_cfg = self.config.loss
        no_sync = self.generator.no_sync if (self.dist.distributed and not sync) else contextlib.nullcontext
        with no_sync():
            with self._autocast():
                recon, q = self.generator(x)
                rec_loss = (x - recon.float()).abs().mean()
                nll = rec_loss
                if self.perceptual is not None:
                    p_loss = self.perceptual(x, recon.float())
                    nll = nll + loss_cfg.perceptual_weight * p_loss
                    sums["perceptual"] += p_loss.item()
                loss = nll + loss_cfg.codebook_weight * q.loss
                if gan_on:
                    # The discriminator judges but does not learn from the generator's loss.
                    _set_requires_grad(self.disc, False)
                    g_loss = hinge_g_loss(self.disc(recon).float())
                    _set_requires_grad(self.disc, True)
                    d_weight = adaptive_gan_weight(nll, g_loss, self.model.last_layer_weight) * loss_cfg.disc_weight
                    loss = loss + d_weight * g_loss
                    sums["g_loss"] += g_loss.item()
                    sums["d_weight"] += d_weight.item()
            (loss * scale).backward()
        if gan_on:
            with self._autocast():
                logits_real = self.disc(x).float()
                logits_fake = self.disc(recon.detach()).float()
                d_loss = hinge_d_loss(logits_real, logits_fake)
            (d_loss * scale).backward()
            sums["d_loss"] += d_loss.item()
            sums["logits_real"] += logits_real.mean().item()
            sums["logits_fake"] += logits_fake.mean().item()
        sums["rec_loss"] += rec_loss.item()
        sums["quant_loss"] += q.loss.item()
        sums["commitment"] += q.commitment_loss.item()
        sums["perplexity"] += q.perplexity.item()
        sums["code_usage"] += q.usage.item()

    def train_step(self, batches) -> dict:
        """One optimizer update over `grad_accum` micro-batches; returns the mean of each loss."""
        t = self.config.train
        self._apply_lr()
        gan_on = self.step >= self.config.loss.disc_start
        self.model.train()
        self.disc.train()
        sums: dict[str, float] = defaultdict(float)
        for micro in range(t.grad_accum):
            x = next(batches)["target"].to(self.device, non_blocking=True).contiguous(
                memory_format=self.memory_format)
            self._micro_step(x, gan_on, 1.0 / t.grad_accum, micro == t.grad_accum - 1, sums)
        self.opt_g.step()
        self.opt_g.zero_grad(set_to_none=True)
        if gan_on:
            _average_gradients(self.disc, self.dist.world_size)
            self.opt_d.step()
        self.opt_d.zero_grad(set_to_none=True)
        self.step += 1
        return {k: v / t.grad_accum for k, v in sums.items()}

    # ---- validation ---------------------------------------------------------------------------

    @torch.no_grad()
    def validate(self) -> dict:
        """Reconstruction PSNR (mean over slices), MAE and lesion MAE over the held-out cases;
        writes a preview PNG of the slices with the largest lesions."""
        self.model.eval()
        # sums of: per-slice PSNR, slices, |error|, pixels, |error| in lesions, lesion pixels
        totals = torch.zeros(6, dtype=torch.float64, device=self.device)
        keep: list[tuple[float, np.ndarray, np.ndarray, np.ndarray]] = []
        loader = validation_loader(self.val_set, self.config.train.batch_size, self.dist, self.config.data.num_workers)
        for batch in loader:
            x = batch["target"].to(self.device).contiguous(memory_format=self.memory_format)
            lesion = batch["lesion"].to(self.device)
            with self._autocast():
                recon, _ = self.model(x)
            err = (recon.float().clamp(-1, 1) - x).double()
            mse = err.square().mean(dim=(1, 2, 3)).clamp_min(1e-12)
            totals[0] += (10 * torch.log10(DATA_RANGE ** 2 / mse)).sum()
            totals[1] += x.shape[0]
            totals[2] += err.abs().sum()
            totals[3] += err.numel()
            totals[4] += (err.abs() * lesion).sum()
            totals[5] += lesion.sum() * err.shape[1]
            if self.dist.is_main and self.config.train.preview_slices:
                areas = lesion.sum(dim=(1, 2, 3)).tolist()
                for i, area in enumerate(areas):
                    keep.append((area, x[i].float().cpu().numpy(), recon[i].float().clamp(-1, 1).cpu().numpy(),
                                 batch["lesion"][i].numpy()))
                keep = sorted(keep, key=lambda item: -item[0])[:self.config.train.preview_slices]
        all_reduce_sum(totals)
        t = totals.tolist()
        metrics = {"psnr": t[0] / max(t[1], 1), "mae": t[2] / max(t[3], 1),
                   "lesion_mae": t[4] / t[5] if t[5] > 0 else math.nan, "slices": int(t[1])}
        if keep:
            grid = reconstruction_grid(np.stack([k[1] for k in keep]), np.stack([k[2] for k in keep]),
                                       np.stack([k[3] for k in keep]))
            write_png_grey(grid, self.run_dir / "samples" / f"step-{self.step:08d}.png")
        return metrics


def train_vqgan(config: VQGANTrainConfig, *, resume: bool | None = None, progress: bool = True) -> dict:
    """Train (or continue training) a VQGAN as configured; returns the final step and the last
    validation metrics."""
    return VQGANTrainer(config, resume=resume, progress=progress).run()
