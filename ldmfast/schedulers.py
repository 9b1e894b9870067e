"""The DDIM step of MONAI's and diffusers' DDIMScheduler on ldmfast's fused `ops.ddim_step`.

    prev, x0 = ldmfast.schedulers.ddim_step(scheduler, model_output, t, sample)   # one step
    ldmfast.schedulers.accelerate(scheduler)    # scheduler.step runs fused from now on, in place
    ldmfast.schedulers.restore(scheduler)

The fused step computes what the scheduler's own `step` computes (prediction type epsilon, sample
or v_prediction; clip_sample; eta with the noise drawn exactly as the scheduler draws it) in one
pass over the tensors. Calls it cannot take go to the scheduler's own step unchanged: diffusers'
thresholding, use_clipped_model_output with clipping, MONAI's asymmetric clip range, a
model_output whose dtype or shape differs from the sample's, or a timestep holding several values.
"""
from __future__ import annotations

import weakref

import numpy as np
import torch

from . import ops
from .acceleration.patcher import override_method
from .acceleration.report import AccelerationReport, Change
from .acceleration.rules import peer_class

_DIFFUSERS = ("diffusers.schedulers.scheduling_ddim", "DDIMScheduler")
_MONAI = ("monai.networks.schedulers.ddim", "DDIMScheduler")
_PARAMETERIZATION = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}


def _family(scheduler) -> str:
    for family, (module_name, class_name) in (("diffusers", _DIFFUSERS), ("monai", _MONAI)):
        cls = peer_class(module_name, class_name)
        if cls is not None and isinstance(scheduler, cls):
            if type(scheduler).step is not cls.step:
                raise ValueError(f"scheduler: {type(scheduler).__name__} overrides {family}'s DDIMScheduler.step, "
                                 "which the fused step replicates")
            return family
    raise ValueError(f"scheduler: must be a MONAI or diffusers DDIMScheduler, got {type(scheduler).__module__}."
                     f"{type(scheduler).__name__}")


# ---- the scheduler's settings as the fused op's arguments -------------------------------------

def _config(scheduler, family: str):
    """(num_train_timesteps, prediction_type, clip or None, fused-ready) of the scheduler now."""
    if family == "diffusers":
        cfg = scheduler.config
        clip = float(cfg.clip_sample_range) if cfg.clip_sample else None
        return cfg.num_train_timesteps, str(cfg.prediction_type), clip, not cfg.thresholding
    low, high = scheduler.clip_sample_values
    clip = float(high) if scheduler.clip_sample else None
    symmetric = not scheduler.clip_sample or (float(low) == -float(high) and float(high) > 0)
    return scheduler.num_train_timesteps, str(scheduler.prediction_type), clip, symmetric


# Host float64 copies of alphas_cumprod, refreshed when the tensor changes: MONAI's add_noise moves
# it to the sample's device, and reading a GPU value each step would synchronize the stream.
_HOST: dict[int, tuple[weakref.ref, int, np.ndarray]] = {}  # by id: tensors' == is elementwise


def _host(t: torch.Tensor) -> np.ndarray:
    cached = _HOST.get(id(t))
    if cached is None or cached[0]() is not t or cached[1] != t._version:
        key = id(t)
        ref = weakref.ref(t, lambda _, key=key: _HOST.pop(key, None))
        cached = (ref, t._version, t.detach().to("cpu", torch.float64).numpy().reshape(-1))
        _HOST[key] = cached
    return cached[2]


def _alphas(scheduler, timestep: int, num_train: int) -> tuple[float, float]:
    """abar_t and abar_prev as the scheduler's step indexes them."""
    if scheduler.num_inference_steps is None:
        raise ValueError("scheduler: number of inference steps is None; call set_timesteps first")
    prev = timestep - num_train // scheduler.num_inference_steps
    alphas = _host(scheduler.alphas_cumprod)
    final = scheduler.final_alpha_cumprod
    final = float(_host(final)[0]) if isinstance(final, torch.Tensor) else float(final)
    return float(alphas[timestep]), (float(alphas[prev]) if prev >= 0 else final)


def _scalar_timestep(timestep):
    if isinstance(timestep, torch.Tensor):
        return int(timestep.item()) if timestep.numel() == 1 else None
    return int(timestep)


# ---- the step ---------------------------------------------------------------------------------

def _noise(family: str, model_output: torch.Tensor, generator, variance_noise):
    if variance_noise is not None:
        return variance_noise
    if family == "diffusers":
        from diffusers.utils.torch_utils import randn_tensor
        return randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                            dtype=model_output.dtype)
    return torch.randn(model_output.shape, dtype=model_output.dtype, generator=generator, device=model_output.device)


def _fused(scheduler, family: str, model_output, timestep, sample, eta, generator, variance_noise,
           use_clipped_model_output: bool = False):
    """(prev_sample, pred_original_sample) by the fused op, or None where it cannot replicate."""
    num_train, prediction_type, clip, ready = _config(scheduler, family)
    t = _scalar_timestep(timestep)
    if (not ready or prediction_type not in _PARAMETERIZATION or t is None
            or (use_clipped_model_output and clip is not None)
            or not isinstance(model_output, torch.Tensor) or not isinstance(sample, torch.Tensor)
            or model_output.dtype != sample.dtype or model_output.shape != sample.shape
            or model_output.device != sample.device or not sample.is_floating_point()):
        return None
    a_t, a_prev = _alphas(scheduler, t, num_train)
    noise = None
    if eta > 0:
        if variance_noise is not None and generator is not None:
            raise ValueError("variance_noise: pass either generator or variance_noise, not both")
        noise = _noise(family, model_output, generator, variance_noise)
        if noise.dtype != sample.dtype or noise.shape != sample.shape:
            return None
    return ops.ddim_step(sample, model_output, a_t, a_prev, eta=float(eta), noise=noise,
                         parameterization=_PARAMETERIZATION[prediction_type], clip_x0=clip, return_x0=True)


def ddim_step(scheduler, model_output: torch.Tensor, timestep, sample: torch.Tensor, eta: float = 0.0,
              generator: torch.Generator | None = None, variance_noise: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM step of `scheduler` (MONAI's or diffusers' DDIMScheduler, after set_timesteps):
    (prev_sample, pred_original_sample), as scheduler.step computes them, on the fused op.
    variance_noise (diffusers' name): the noise for eta > 0 instead of drawing it with generator."""
    family = _family(scheduler)
    out = _fused(scheduler, family, model_output, timestep, sample, eta, generator, variance_noise)
    if out is not None:
        return out
    if family == "diffusers":
        return scheduler.step(model_output, timestep, sample, eta=eta, generator=generator,
                              variance_noise=variance_noise, return_dict=False)
    if variance_noise is not None:
        raise ValueError("variance_noise: MONAI's DDIMScheduler.step draws its own noise; this call "
                         "cannot run fused, so pass generator instead")
    return scheduler.step(model_output, timestep, sample, eta=eta, generator=generator)


def _diffusers_step(self, model_output, timestep, sample, eta=0.0, use_clipped_model_output=False, generator=None,
                    variance_noise=None, return_dict=True):
    """diffusers' DDIMScheduler.step on ldmfast's fused op (same signature and result)."""
    out = _fused(self, "diffusers", model_output, timestep, sample, eta, generator, variance_noise,
                 use_clipped_model_output)
    if out is None:
        return type(self).step(self, model_output, timestep, sample, eta, use_clipped_model_output, generator,
                               variance_noise, return_dict)
    if not return_dict:
        return out
    from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput
    return DDIMSchedulerOutput(prev_sample=out[0], pred_original_sample=out[1])


def _monai_step(self, model_output, timestep, sample, eta=0.0, generator=None):
    """MONAI's DDIMScheduler.step on ldmfast's fused op (same signature and result)."""
    out = _fused(self, "monai", model_output, timestep, sample, eta, generator, None)
    return out if out is not None else type(self).step(self, model_output, timestep, sample, eta, generator)


_REPORTS: "weakref.WeakKeyDictionary[object, AccelerationReport]" = weakref.WeakKeyDictionary()


def accelerate(scheduler) -> AccelerationReport:
    """Make `scheduler.step` (this instance only) run the fused DDIM step; reversible with
    `restore(scheduler)` or the returned report's undo()."""
    family = _family(scheduler)
    previous = _REPORTS.get(scheduler)
    if previous is not None and previous.active:
        raise ValueError(f"scheduler: this {type(scheduler).__name__} is already accelerated")
    if "step" in scheduler.__dict__:
        raise ValueError("scheduler: its step is already patched by someone else")
    report = AccelerationReport(type(scheduler).__name__)
    # Bound as a functools.partial (patcher.bind), which pickles; inspect.signature of it is the
    # step's (diffusers' pipelines read it).
    override_method(report, scheduler, "step", _diffusers_step if family == "diffusers" else _monai_step,
                    Change("", "ddim_step", f"{family} DDIMScheduler.step -> ldmfast fused ddim_step"))
    _, prediction_type, _, ready = _config(scheduler, family)
    if not ready or prediction_type not in _PARAMETERIZATION:
        report.leave("", scheduler, "its settings (thresholding, an asymmetric clip or an unknown prediction "
                                    "type) make every step fall back to the scheduler's own")
    _REPORTS[scheduler] = report
    return report


def restore(scheduler) -> AccelerationReport:
    report = _REPORTS.get(scheduler)
    if report is None or not report.active:
        raise ValueError(f"scheduler: this {type(scheduler).__name__} is not accelerated by "
                         "ldmfast.schedulers.accelerate")
    report.undo()
    return report
