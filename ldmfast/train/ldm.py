"""Stage 2 training loop: the conditional LDM (condition module + UNet) with the DDPM loss on the
latents of the frozen autoencoder, cached once.

Run folder (`output_dir`): config.json, metrics.jsonl, checkpoints/ (exact resume), ldm/ (the
latest model in `ConditionalLDM.from_pretrained` form, the EMA weights when EMA is on, with the
autoencoder beside), samples/ (validation syntheses as PNG when sampling is on), cache/ (slices
and latents) and, for phantom data, phantom/.
"""
from __future__ import annotations

import contextlib
import math
from collections import defaultdict

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Subset

from ldmfast.diffusion import diffusion_loss
from ldmfast.models import ConditionalLDM, load_autoencoder

from . import optim
from .config import ConfigError
from .data import TrainBatches, build_datasets, validation_loader
from .distributed import DistInfo, all_reduce_sum
from .ema import EMA
from .latent_cache import WithLatents, cached_latents
from .ldm_config import LDMTrainConfig
from .preview import reconstruction_grid, write_png_grey
from .recast import recast_weight_copies
from .stage import StageTrainer
from .step_in_backward import StepInBackward
from .val_metrics import ImageErrorSums

MODEL_DIR = "ldm"


def ema_state(decay: float | None) -> str:
    """What train.ema_decay puts in a checkpoint: an EMA module or none (its value does not)."""
    return "EMA on" if decay else "EMA off"


class LDMTrainer(StageTrainer):
    """Trains (or continues) the cLDM of `config`; `run()` returns the final step and the last
    validation metrics. Subclassed by post-training, which swaps the loss and the validation."""

    stage = "ldm"
    resume_sections = ("unet", "diffusion", "autoencoder")
    resume_model_folders = ("autoencoder",)
    #: whether _batch_loss may skip a micro-batch (counting it in sums["skipped"])
    skips_batches = False
    resume_settings = {"train.ema_decay": ema_state}

    def __init__(self, config: LDMTrainConfig, *, resume: bool | None = None, progress: bool = True,
                 dist_info: DistInfo | None = None):
        super().__init__(config, progress=progress, dist_info=dist_info)
        c, t = config, config.train
        if t.step_in_backward and self.dist.distributed:
            raise ConfigError("train.step_in_backward", "DDP all-reduces the gradients after the backward, so "
                                                        "updates cannot run inside it: set it false under torchrun")
        self.model = self._build_model().to(self.device, memory_format=self.memory_format)
        f = 2 ** self.model.halvings
        if c.data.size[0] % f or c.data.size[1] % f:
            raise ConfigError("data.size", f"{list(c.data.size)} gives no whole latent: the autoencoder downsamples "
                                           f"by {f}; use multiples of {f}")
        self.train_set, self.val_set = build_datasets(c.data, self.run_dir, c.seed, self.dist, self.progress)
        train_data, augment = self.train_set, c.data.augment.to_augment_config()
        if t.latent_cache:
            latents = cached_latents(self.model.encode, self.model.autoencoder,
                                     {"train": self.train_set, "val": self.val_set}, c.data.size,
                                     self.run_dir / "cache", self.device, self.dist, progress=self.progress)
            train_data, augment = WithLatents(self.train_set, latents["train"]), None
            self.val_set = WithLatents(self.val_set, latents["val"])
        self.batches = TrainBatches(train_data, batch_size=t.batch_size, seed=c.seed, dist_info=self.dist,
                                    augment=augment, num_workers=c.data.num_workers)
        self.lr = c.optim.lr if c.optim.lr is not None else c.optim.base_lr * self.effective_batch
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        adamw = optim.adamw_maker(c.optim.state_bits, seed=c.seed, lr=self.lr, betas=c.optim.betas,
                                  weight_decay=c.optim.weight_decay)
        self.opt = StepInBackward(self.trainable, adamw) if t.step_in_backward else adamw(self.trainable)
        self.ema = EMA(self.model, t.ema_decay).to(self.device) if t.ema_decay > 0 else None
        self._finish_setup(resume)
        self.ddp = (DistributedDataParallel(self.model, device_ids=[self.device.index]
                                            if self.device.type == "cuda" else None)
                    if self.dist.distributed else self.model)

    def _build_model(self) -> ConditionalLDM:
        c = self.config
        autoencoder = load_autoencoder(c.autoencoder, self.device)
        ae = autoencoder.config
        halvings = int(math.log2(ae.downsampling))
        frames = 15  # the data layer resamples every CTP to the release's 15 frames
        unet = c.unet
        unet.in_channels, unet.out_channels = ae.latent_channels + frames, ae.latent_channels
        return ConditionalLDM(unet, frames, ae.latent_channels, halvings, autoencoder=autoencoder,
                              diffusion=c.diffusion)

    # ---- StageTrainer hooks -----------------------------------------------------------------

    def _modules(self) -> dict[str, nn.Module]:
        modules = {"condition": self.model.condition, "unet": self.model.unet}
        if self.ema is not None:
            modules["ema"] = self.ema
        return modules

    def _optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"ldm": self.opt}

    def batch_iterator(self):
        return self.batches.iterate(self.step * self.config.train.grad_accum)

    def export(self) -> None:
        state = (self.ema.averaged_state_dict(self.model, self.model.denoiser_state_dict())
                 if self.ema is not None else None)
        self.model.save_pretrained(self.run_dir / MODEL_DIR, state_dict=state)

    def _postfix(self, losses: dict) -> dict:
        return {"loss": f"{losses['loss']:.4f}"}

    def _describe_validation(self, m: dict) -> str:
        text = f"latent loss {m['latent_loss']:.4f}"
        if "mae" in m:
            text += f", sampled MAE {m['mae']:.4f}, lesion MAE {m['lesion_mae']:.4f}, PSNR {m['psnr']:.2f} dB"
        return text

    # ---- one optimizer step -----------------------------------------------------------------

    @contextlib.contextmanager
    def _autocast(self):
        """The stage's autocast, in which the backward casts autocast's weight copies again where
        train.recast_weight_copies asks (ldmfast.train.recast)."""
        recast = self.config.train.recast_weight_copies and self.amp_dtype is not None
        with super()._autocast(), recast_weight_copies(recast):
            yield

    def _latents(self, batch: dict) -> torch.Tensor:
        if "latent" in batch:
            return batch["latent"].to(self.device, non_blocking=True)
        return self.model.encode(batch["target"].to(self.device, non_blocking=True))

    def _batch_loss(self, batch: dict, sums: dict) -> torch.Tensor:
        """The loss of one micro-batch (differentiable), adding its parts to `sums`."""
        z0 = self._latents(batch).contiguous(memory_format=self.memory_format)
        ctp = batch["ctp"].to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
        with self._autocast():
            loss = diffusion_loss(lambda z, t: self.ddp(z, t, ctp), z0, self.model.schedule,
                                  self.model.diffusion.parameterization)
        sums["loss"] += loss.item()
        return loss

    def train_step(self, batches) -> dict:
        t = self.config.train
        self._apply_lr()
        self.model.train()
        sums: dict[str, float] = defaultdict(float)
        for micro in range(t.grad_accum):
            sync = micro == t.grad_accum - 1
            no_sync = self.ddp.no_sync if (self.dist.distributed and not sync) else contextlib.nullcontext
            with no_sync():
                loss = self._batch_loss(next(batches), sums)
                if loss is not None:
                    (loss / t.grad_accum).backward()
        if self.skips_batches:
            self._average_over_measured(t.grad_accum - sums.get("skipped", 0.0))
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model)
        self.step += 1
        return {k: v / t.grad_accum for k, v in sums.items()}

    def _average_over_measured(self, measured: float) -> None:
        """Make the step's gradient the mean over the micro-batches measured, of every process: a
        skipped one (post-training's without brain pixels) adds none, and the backward divided by
        grad_accum (and DDP by the number of processes) counting it. The same factor on every
        process (the counts are summed over them), so their parameters stay equal; no host sync.
        (grad_accum > 1 rules out step_in_backward, whose optimizer would have stepped by now.)"""
        grad_accum = self.config.train.grad_accum
        if not self.dist.distributed:
            if 0 < measured < grad_accum:
                for p in self.model.parameters():
                    if p.grad is not None:
                        p.grad.mul_(grad_accum / measured)
            return
        everyone = grad_accum * torch.distributed.get_world_size()  # the group DDP averaged over
        total = all_reduce_sum(torch.tensor([measured], dtype=torch.float32, device=self.device))
        factor = torch.where(total > 0, everyone / total.clamp_min(1.0), torch.ones_like(total))
        for p in self.model.parameters():
            if p.grad is not None:
                p.grad.mul_(factor.to(p.grad.dtype))

    # ---- validation ---------------------------------------------------------------------------

    def _averaged(self):
        return self.ema.applied(self.model) if self.ema is not None else contextlib.nullcontext()

    def _val_noise(self, batch_index: int, z0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Timesteps and noise of a validation batch: the same at every validation, drawn from a
        generator of their own (the training RNG stays untouched)."""
        g = torch.Generator().manual_seed(self.config.seed * 1_000_003 + batch_index)
        t = torch.randint(0, self.model.schedule.num_steps, (z0.shape[0],), generator=g)
        noise = torch.randn(z0.shape, generator=g)
        return t.to(self.device), noise.to(self.device, z0.dtype)

    @torch.no_grad()
    def _validation_batch(self, batch_index: int, batch: dict, one_step: ImageErrorSums | None) -> torch.Tensor:
        """(sum of per-slice latent losses, slices) of one validation batch; with `one_step`, the
        one-step prediction x0_hat is decoded and its image errors added there."""
        z0 = self._latents(batch)
        ctp = batch["ctp"].to(self.device)
        t, noise = self._val_noise(batch_index, z0)
        schedule, parameterization = self.model.schedule, self.model.diffusion.parameterization
        with self._autocast():
            z_t = schedule.add_noise(z0, noise, t)
            out = self.model(z_t, t, ctp).float()
        per_slice = (out - schedule.target(z0, noise, t, parameterization).float()).square().mean(dim=(1, 2, 3))
        if one_step is not None:
            x0_hat = schedule.predict_x0(z_t.float(), t, out, parameterization)
            one_step.add(self.model.decode(x0_hat), batch["target"].to(self.device), batch["lesion"].to(self.device))
        return torch.stack([per_slice.sum().double(), torch.tensor(float(z0.shape[0]), dtype=torch.float64,
                                                                   device=self.device)])

    #: whether validation decodes the one-step x0_hat (post-training's image and lesion terms)
    validate_one_step = False

    def _sample_indices(self) -> list[int]:
        """The held-out slices validation synthesizes: those with the largest lesions first."""
        if not hasattr(self, "_sample_order"):
            base = self.val_set.dataset if isinstance(self.val_set, WithLatents) else self.val_set
            areas = [float(base[i]["lesion"].sum()) for i in range(len(base))]
            order = sorted(range(len(areas)), key=lambda i: (-areas[i], i))
            self._sample_order = sorted(order[:self.config.train.val_sample_slices])
        return self._sample_order

    @torch.no_grad()
    def _sampled_metrics(self) -> dict:
        t = self.config.train
        mine = self._sample_indices()[self.dist.rank::self.dist.world_size]
        sums = ImageErrorSums(self.device, keep=self.config.train.preview_slices if self.dist.is_main else 0)
        loader = validation_loader(Subset(self.val_set, mine), t.batch_size, DistInfo(0, 1, 0, self.device))
        start = 0
        for batch in loader:
            n = batch["ctp"].shape[0]
            seeds = [self.config.seed * 7919 + i for i in mine[start:start + n]]
            start += n
            with self._autocast():
                images = self.model.generate(batch["ctp"].to(self.device), seeds, steps=t.val_sample_steps)
            sums.add(images, batch["target"].to(self.device), batch["lesion"].to(self.device))
        metrics = sums.reduce()
        arrays = sums.preview_arrays()
        if arrays is not None:
            write_png_grey(reconstruction_grid(*arrays), self.run_dir / "samples" / f"step-{self.step:08d}.png")
        return metrics

    @torch.no_grad()
    def validate(self) -> dict:
        """Latent loss at fixed timesteps and noise on every held-out slice (and, for
        post-training, MAE and lesion MAE of the decoded one-step x0_hat: "x0_mae",
        "x0_lesion_mae"); with train.val_sample_steps, DDIM syntheses' MAE, lesion MAE and PSNR."""
        self.model.eval()
        with self._averaged():
            totals = torch.zeros(2, dtype=torch.float64, device=self.device)
            one_step = ImageErrorSums(self.device) if self.validate_one_step else None
            loader = validation_loader(self.val_set, self.config.train.batch_size, self.dist,
                                       self.config.data.num_workers)
            for i, batch in enumerate(loader):
                totals += self._validation_batch(i * self.dist.world_size + self.dist.rank, batch, one_step)
            all_reduce_sum(totals)
            metrics = {"latent_loss": (totals[0] / totals[1].clamp_min(1)).item()}
            if one_step is not None:
                m = one_step.reduce()
                metrics.update(x0_mae=m["mae"], x0_lesion_mae=m["lesion_mae"])
            if self.config.train.val_sample_steps:
                metrics.update(self._sampled_metrics())
        return metrics


def train_ldm(config: LDMTrainConfig, *, resume: bool | None = None, progress: bool = True) -> dict:
    """Train (or continue training) the cLDM as configured; returns the final step and the last
    validation metrics."""
    return LDMTrainer(config, resume=resume, progress=progress).run()
