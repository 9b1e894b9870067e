"""What every training stage shares: devices and processes, AMP and memory format, the run
folder, exact-resume checkpoints, the learning-rate schedule, metrics logging and the loop with
its progress bar, validation and checkpoint cadence. A stage (VQGAN, cLDM, post-training)
subclasses `StageTrainer` and supplies its modules, optimizers, one step and its validation."""
from __future__ import annotations

import contextlib
import json
import random
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ldmfast.models.model_folder import folder_fingerprint

from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, write_json_atomic
from .config import ConfigError, to_dict
from .distributed import DistInfo, all_reduce_sum, barrier, init_distributed
from .lr_schedule import lr_at
from .metrics_log import MetricsLog
from .recast import training_autocast


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


#: optim.* settings that are the optimizers' own (param-group keys), re-applied on resume with lr
OPTIMIZER_SETTINGS = ("betas", "weight_decay", "eps")


def _dotted_get(config: dict, dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


class _StepClock:
    """Seconds of training over the steps since the last restart, leaving out the time spent
    `paused()` (validation and checkpoints), so that sec_per_step measures the steps alone."""

    def __init__(self):
        self.restart()

    def restart(self) -> None:
        self.steps, self._counted, self._since = 0, 0.0, time.perf_counter()

    def tick(self) -> None:
        self.steps += 1

    @contextlib.contextmanager
    def paused(self):
        self._counted += time.perf_counter() - self._since
        try:
            yield
        finally:
            self._since = time.perf_counter()

    def seconds(self) -> float:
        return self._counted + time.perf_counter() - self._since


class StageTrainer:
    """Subclasses set `stage` (the progress-bar name), build their data, modules and optimizers
    in `__init__` after `super().__init__`, then call `self._finish_setup(resume)`; they implement
    `_modules`, `_optimizers`, `train_step`, `validate`, `export` and may override
    `_after_validation` (return True to stop early) and `_postfix`."""

    stage = "train"
    #: configuration sections a resumed run must share with its checkpoint
    resume_sections: tuple[str, ...] = ("model",)
    #: single settings that shape a checkpoint (e.g. whether there is an EMA), each with a function
    #: of it that must match the checkpoint's (None: the value itself)
    resume_settings: dict[str, Callable[[Any], Any] | None] = {}
    #: keys of `resume_sections` that a resumed run may change (they leave its results alone)
    resume_exempt: tuple[str, ...] = ()
    #: top-level keys of `resume_sections` that name a model folder the run builds on (the cLDM's
    #: autoencoder, post-training's init): a resumed run may find the folder at another path (a run
    #: tree moved or copied to another disk or machine) as long as it holds the same files; the
    #: checkpoints keep each folder's fingerprint for that
    resume_model_folders: tuple[str, ...] = ()

    def __init__(self, config, *, progress: bool = True, dist_info: DistInfo | None = None):
        self.config = config
        self.dist = dist_info or init_distributed(config.device)
        self.device = self.dist.device
        self.progress = progress and self.dist.is_main
        self.run_dir = Path(config.output_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        t = config.train
        on_gpu = self.device.type == "cuda"
        self.amp_dtype = torch.bfloat16 if (t.amp == "bf16" or (t.amp == "auto" and on_gpu)) else None
        self.memory_format = (torch.channels_last if (t.channels_last == "on" or (t.channels_last == "auto" and on_gpu))
                              else torch.contiguous_format)
        if on_gpu:
            torch.backends.cudnn.benchmark = True
        seed_everything(config.seed)
        self.effective_batch = t.batch_size * t.grad_accum * self.dist.world_size
        self.step = 0
        #: set when early stopping ended the run; checkpointed, so that a rerun does not train on
        self.stopped_early = False
        self.log: MetricsLog | None = None
        self._fingerprints: dict | None = None  # see _model_folder_fingerprints

    def _finish_setup(self, resume: bool | None) -> None:
        self._resume(resume)
        if self.dist.is_main:
            self._model_folder_fingerprints()  # of the folders as loaded, not as found at the first save
            write_json_atomic(to_dict(self.config), self.run_dir / "config.json")
        self.log = MetricsLog(self.run_dir / "metrics.jsonl", resume_step=self.step) if self.dist.is_main else None

    # ---- what a stage supplies --------------------------------------------------------------

    def _modules(self) -> dict[str, nn.Module]:
        raise NotImplementedError

    def _optimizers(self) -> dict[str, torch.optim.Optimizer]:
        raise NotImplementedError

    def train_step(self, batches) -> dict:
        raise NotImplementedError

    def validate(self) -> dict:
        raise NotImplementedError

    def export(self) -> None:
        """Write the model in its `from_pretrained` form (main process only)."""
        raise NotImplementedError

    def _extra_state(self) -> dict:
        """JSON-able state beyond modules and optimizers to carry through a checkpoint."""
        return {}

    def _load_extra_state(self, state: dict) -> None:
        pass

    def _after_validation(self, metrics: dict) -> bool:
        return False

    def _postfix(self, losses: dict) -> dict:
        return {}

    def _describe_validation(self, metrics: dict) -> str:
        return ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, float))

    def batch_iterator(self):
        raise NotImplementedError

    # ---- checkpoints ------------------------------------------------------------------------

    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def _resume(self, resume: bool | None) -> None:
        latest = latest_checkpoint(self.checkpoint_dir)
        if latest is None:
            if resume:
                raise ConfigError("output_dir", f"--resume: no checkpoint in {self.checkpoint_dir}")
            return
        if resume is False:
            raise ConfigError("output_dir", f"{self.run_dir} already holds checkpoints; resume it or choose a new "
                                            "output_dir")
        self._check_resumable(json.loads(latest.read_text())["meta"], latest)
        info = load_checkpoint(latest, modules=self._modules(), optimizers=self._optimizers())
        self.step = info["step"]
        self.stopped_early = bool(info["meta"].get("stopped_early", False))
        self._load_extra_state(info["meta"].get("extra", {}))
        # The optimizer state brings the saved learning rate, betas and weight decay; the configured
        # ones win, so that a resumed run can change them and config.json tells what is in force
        # (unchanged, this is a no-op and resuming stays bit-identical).
        self._apply_optimizer_settings()
        self._apply_lr()
        if info["meta"]["world_size"] != self.dist.world_size and self.dist.is_main:
            tqdm.write(f"note: resuming a {info['meta']['world_size']}-process run with {self.dist.world_size} "
                       "processes: the batch order differs from an uninterrupted run")
        if self.progress:
            tqdm.write(f"resumed from {latest} at step {self.step}")

    def _check_resumable(self, meta: dict, latest: Path) -> None:
        """Refuse (naming the key) a configuration whose checkpoint-shaping settings differ from
        the checkpoint's: loading it would fail, or continue a different run."""
        saved, mine = meta["config"], to_dict(self.config)
        for section in self.resume_sections:
            theirs, ours = saved.get(section) or {}, mine.get(section) or {}
            if not isinstance(ours, dict):
                theirs, ours = {"": theirs}, {"": ours}
            for key in sorted(set(theirs) | set(ours)):
                dotted = f"{section}.{key}" if key else section
                if dotted in self.resume_model_folders:
                    self._check_model_folder(dotted, ours.get(key), theirs.get(key), meta, latest)
                    continue
                if theirs.get(key) == ours.get(key) or dotted in self.resume_exempt:
                    continue
                raise ConfigError(dotted, f"{ours.get(key)!r} differs from the checkpoint's {theirs.get(key)!r} "
                                          f"in {latest}")
        for dotted, what in self.resume_settings.items():
            theirs, ours = _dotted_get(saved, dotted), _dotted_get(mine, dotted)
            if what is None and theirs != ours:
                raise ConfigError(dotted, f"{ours!r} differs from the checkpoint's {theirs!r} in {latest}, whose "
                                          "tensors it shapes")
            if what is not None and what(theirs) != what(ours):
                raise ConfigError(dotted, f"{ours!r} ({what(ours)}) differs from the checkpoint's {theirs!r} "
                                          f"({what(theirs)}) in {latest}, whose tensors it shapes")

    def _check_model_folder(self, key: str, ours: str, theirs: str, meta: dict, latest: Path) -> None:
        """Accept model folder `ours` where it holds the model of the checkpoint's `theirs`: at the
        same path (unless since replaced) or at another (moved or copied there)."""
        recorded = (meta.get("model_folders") or {}).get(key)
        if recorded is None:  # checkpoints before ldmfast 2026-11-29: the path alone
            if ours != theirs:
                raise ConfigError(key, f"{ours!r} differs from the checkpoint's {theirs!r} in {latest}, which records "
                                       f"no fingerprint of that folder (an older ldmfast): point {key} at {theirs!r} "
                                       "again to resume")
            return
        if self._model_folder_fingerprints()[key] != recorded:  # of `ours`: the configured folder
            where = "now holds" if ours == theirs else f"holds, unlike the checkpoint's {theirs!r},"
            raise ConfigError(key, f"{ours!r} {where} another model (other weights or config.json) than the one "
                                   f"{latest} was trained with: point {key} at that model, or start a new run")
        if ours != theirs and self.progress:
            tqdm.write(f"note: {key} {ours} holds the same model as the checkpoint's {theirs}: resuming with it")

    def _model_folder_fingerprints(self) -> dict:
        """resume_model_folders' fingerprints, as the checkpoints keep them: computed once, when the
        resume check first needs them or at the end of setup (the folders are inputs of the run,
        loaded before either)."""
        if self._fingerprints is None:
            config = to_dict(self.config)
            self._fingerprints = {key: folder_fingerprint(config[key]) for key in self.resume_model_folders}
        return self._fingerprints

    def save(self) -> None:
        if self.dist.is_main:
            # The model folder first: a run killed while exporting has no checkpoint of this step
            # yet, so its rerun trains to it again and exports again.
            self.export()
            meta = {"config": to_dict(self.config), "world_size": self.dist.world_size,
                    "stopped_early": self.stopped_early, "extra": self._extra_state(),
                    "model_folders": self._model_folder_fingerprints()}
            save_checkpoint(self.checkpoint_dir, self.step, modules=self._modules(), optimizers=self._optimizers(),
                            meta=meta, keep_last=self.config.train.keep_checkpoints)
        barrier()

    # ---- shared step machinery ----------------------------------------------------------------

    def _autocast(self):
        return training_autocast(self.device.type, self.amp_dtype)

    def current_lr(self) -> float:
        o = self.config.optim
        return lr_at(self.step, self.lr, self.config.train.steps, o.schedule, o.warmup_steps, o.min_lr_ratio)

    def _apply_optimizer_settings(self) -> None:
        o = self.config.optim
        settings = {k: getattr(o, k) for k in OPTIMIZER_SETTINGS if getattr(o, k, None) is not None}
        if "betas" in settings:
            settings["betas"] = tuple(settings["betas"])
        for optimizer in self._optimizers().values():
            for group in optimizer.param_groups:
                group.update({k: v for k, v in settings.items() if k in group})

    def _apply_lr(self) -> None:
        self.last_lr = self.current_lr()
        for optimizer in self._optimizers().values():
            for group in optimizer.param_groups:
                group["lr"] = self.last_lr

    def _reduce_for_log(self, values: dict) -> dict:
        if not self.dist.distributed:
            return values
        keys = sorted(values)
        vec = all_reduce_sum(torch.tensor([values[k] for k in keys], dtype=torch.float64, device=self.device))
        return dict(zip(keys, (vec / self.dist.world_size).tolist()))

    # ---- the run ----------------------------------------------------------------------------

    def run(self) -> dict:
        try:
            if self.stopped_early or self.step >= self.config.train.steps:
                val_metrics = self._rerun_finished()
            else:
                val_metrics = self._train()
        finally:
            if self.log:
                self.log.close()
        return {"step": self.step, "run_dir": str(self.run_dir), "stopped_early": self.stopped_early,
                **{f"val_{k}": v for k, v in val_metrics.items()}}

    def _rerun_finished(self) -> dict:
        """A run whose checkpoint already reached train.steps or stopped early trains nothing; it
        exports again, which mends a model folder left behind by a kill during the last export."""
        if self.progress:
            done = (f"stopped early at step {self.step}" if self.stopped_early
                    else f"is at step {self.step} of train.steps = {self.config.train.steps}")
            tqdm.write(f"{self.stage}: the run in {self.run_dir} {done}: nothing to train")
        if self.dist.is_main:
            self.export()
        barrier()
        return self.log.last("val") if self.log else {}  # what the run's last validation measured

    def _train(self) -> dict:
        """Train to train.steps (or an early stop); returns the last validation's metrics."""
        t = self.config.train
        batches = self.batch_iterator()
        val_metrics: dict = {}
        bar = tqdm(total=t.steps, initial=self.step, desc=self.stage, unit="step", disable=not self.progress,
                   dynamic_ncols=True)
        clock = _StepClock()
        try:
            while self.step < t.steps and not self.stopped_early:
                losses = self.train_step(batches)
                clock.tick()
                bar.update(1)
                last = self.step == t.steps
                if t.log_every and (self.step % t.log_every == 0 or last):
                    losses = self._reduce_for_log(losses)
                    elapsed = clock.seconds()
                    losses["sec_per_step"] = elapsed / clock.steps
                    losses["samples_per_sec"] = clock.steps * self.effective_batch / elapsed
                    losses["lr"] = self.last_lr
                    clock.restart()
                    if self.log:
                        self.log.write(self.step, "train", losses)
                    bar.set_postfix(**self._postfix(losses))
                with clock.paused():
                    if (t.val_every and self.step % t.val_every == 0) or last:
                        val_metrics = self.validate()
                        if self.log:
                            self.log.write(self.step, "val", val_metrics)
                        if self.progress:
                            bar.write(f"step {self.step}: validation {self._describe_validation(val_metrics)}")
                        self.stopped_early = self._after_validation(val_metrics)
                    if (t.ckpt_every and self.step % t.ckpt_every == 0) or last or self.stopped_early:
                        self.save()
        finally:
            bar.close()
        return val_metrics
