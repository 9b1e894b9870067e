"""Stage 3 training loop: lesion-aware post-training (cLDM-PT) of a trained cLDM, with the loss
of `posttrain_loss` (latent + image + lesion terms through the frozen, checkpointed decoder).

Everything else is the cLDM loop's (cached latents, AdamW, EMA, AMP, exact resume, DDP), plus
early stopping on a validation metric. Run folder as `train ldm`'s; the model folder is ldm/
(the best model by the early-stopping metric when early stopping is on, else the latest)."""
from __future__ import annotations

import math
import warnings

import torch

from ldmfast.models import ConditionalLDM

from .config import ConfigError, unloadable_model
from .distributed import DistInfo
from .ldm import MODEL_DIR, LDMTrainer
from .posttrain_config import PostTrainConfig
from .posttrain_loss import NO_BRAIN_WARNING, posttrain_loss

#: what a post-training step logs: every process logs every key (their all-reduce pairs them up)
LOGGED_LOSSES = ("loss", "latent", "image", "lesion", "skipped")


class PostTrainer(LDMTrainer):
    stage = "posttrain"
    resume_sections = ("init", "posttrain")
    resume_model_folders = ("init",)
    #: decoder checkpointing trades memory for compute with the same gradients: a run that ran out
    #: of memory may resume with it on
    resume_exempt = ("posttrain.decoder_checkpoint",)
    skips_batches = True
    validate_one_step = True

    def __init__(self, config: PostTrainConfig, *, resume: bool | None = None, progress: bool = True,
                 dist_info: DistInfo | None = None):
        self.best: float | None = None
        self.best_step = 0
        self.bad_validations = 0
        self._warned_no_brain = False
        super().__init__(config, resume=resume, progress=progress, dist_info=dist_info)

    def _build_model(self) -> ConditionalLDM:
        try:
            model = ConditionalLDM.from_pretrained(self.config.init, self.device)
        except (OSError, ValueError, KeyError, RuntimeError) as err:  # a damaged or incomplete folder
            raise unloadable_model("init", f"cannot load the cLDM from {self.config.init}",
                                   str(err) or type(err).__name__) from err
        if model.diffusion.latent_scale != 1.0:
            raise ConfigError("init", f"latent_scale {model.diffusion.latent_scale}: post-training decodes x0_hat "
                                      "as it is and supports latent scale 1 only (PAPER.md's)")
        model.unet.gradient_checkpointing = self.config.train.unet_checkpoint
        return model

    def train_step(self, batches) -> dict:
        losses = super().train_step(batches)  # sums over the step's micro-batches / grad_accum
        # The parts average over the micro-batches that had brain pixels (as the gradient does); a
        # step with none measured no loss: NaN (logged as null), not a made-up 0 and not a missing key.
        skipped = losses.get("skipped", 0.0)  # the fraction of micro-batches skipped
        measured = 1.0 - skipped
        return {k: skipped if k == "skipped" else (losses.get(k, 0.0) / measured if measured > 0 else math.nan)
                for k in LOGGED_LOSSES}

    def _postfix(self, losses: dict) -> dict:
        if losses.get("skipped", 0.0) >= 1.0:
            return {"loss": "skipped (no brain pixels)"}
        return {"loss": f"{losses.get('loss', math.nan):.4f}", "les": f"{losses.get('lesion', math.nan):.4f}"}

    def _describe_validation(self, m: dict) -> str:
        return (super()._describe_validation(m) + f", one-step MAE {m['x0_mae']:.4f}, "
                f"one-step lesion MAE {m['x0_lesion_mae']:.4f}")

    def _batch_loss(self, batch: dict, sums: dict) -> torch.Tensor | None:
        z0 = self._latents(batch).contiguous(memory_format=self.memory_format)
        ctp = batch["ctp"].to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
        image = batch["target"].to(self.device, non_blocking=True)
        mask, lesion = batch["mask"].to(self.device), batch["lesion"].to(self.device)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with self._autocast():
                out = posttrain_loss(lambda z, t: self.ddp(z, t, ctp), self.model.autoencoder, self.model.schedule,
                                     z0, image, mask, lesion, config=self.config.posttrain,
                                     parameterization=self.model.diffusion.parameterization)
        if out is None:
            if not self._warned_no_brain and any(NO_BRAIN_WARNING in str(w.message) for w in caught):
                warnings.warn(f"{NO_BRAIN_WARNING} (step {self.step}; warned once)", RuntimeWarning)
                self._warned_no_brain = True
            sums["skipped"] += 1
            if self.dist.distributed:
                # The other processes run backward through DDP; a zero loss through the model
                # keeps this one in step with them.
                return 0.0 * self.ddp(z0, torch.zeros(z0.shape[0], dtype=torch.long, device=self.device),
                                      ctp).float().sum()
            return None
        sums["loss"] += out.total.item()
        sums["latent"] += out.latent.item()
        sums["image"] += out.image.item()
        sums["lesion"] += out.lesion.item()
        return out.total

    # ---- early stopping and the exported model ------------------------------------------------

    def _early_stopping(self) -> bool:
        return self.config.train.early_stop_patience > 0

    def _after_validation(self, metrics: dict) -> bool:
        if not self._early_stopping():
            return False
        metric = self.config.train.early_stop_metric
        value = metrics.get(metric)
        # A value that is not finite (a diverged loss, no lesion pixel) is no better: it counts
        # toward the patience like any worse one.
        if value is not None and math.isfinite(value) and (self.best is None or value < self.best):
            self.best, self.best_step, self.bad_validations = value, self.step, 0
            if self.dist.is_main:
                LDMTrainer.export(self)
            return False
        self.bad_validations += 1
        stop = self.bad_validations >= self.config.train.early_stop_patience
        if stop and self.progress:
            since = (f"has not improved on {self.best:.4g} (step {self.best_step})" if self.best is not None
                     else "has not been finite")
            print(f"early stop at step {self.step}: {metric} {since} for {self.bad_validations} validations")
        return stop

    def export(self) -> None:
        # With early stopping, the best model is exported when it is found; until a finite metric
        # gives one, the model folder holds the latest, so that there is always a model.
        if not self._early_stopping() or self.best is None:
            LDMTrainer.export(self)

    def _extra_state(self) -> dict:
        return {"best": self.best, "best_step": self.best_step, "bad_validations": self.bad_validations}

    def _load_extra_state(self, state: dict) -> None:
        self.best = state.get("best")
        self.best_step = state.get("best_step", 0)
        self.bad_validations = state.get("bad_validations", 0)
        # Stopped is what the configured patience says of the checkpoint's count: a rerun with more
        # patience (or without early stopping) goes on training, one with the same stays stopped
        # (so do checkpoints written before runs saved that they stopped).
        self.stopped_early = (self._early_stopping()
                              and self.bad_validations >= self.config.train.early_stop_patience)

    def run(self) -> dict:
        summary = super().run()
        summary["model_dir"] = str(self.run_dir / MODEL_DIR)
        if self._early_stopping():
            metric = self.config.train.early_stop_metric
            summary["best_metric"], summary["best_step"], summary["best"] = metric, self.best_step, self.best
            if self.best is None and self.dist.is_main:
                warnings.warn(f"train.early_stop_metric {metric} was never finite: {summary['model_dir']} holds the "
                              f"latest model (step {self.step}), not a best one", RuntimeWarning)
        return summary


def train_posttrain(config: PostTrainConfig, *, resume: bool | None = None, progress: bool = True) -> dict:
    """Post-train a trained cLDM as configured; returns the final step and the last validation metrics."""
    return PostTrainer(config, resume=resume, progress=progress).run()
