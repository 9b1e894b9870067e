"""Noise schedules, the DDPM training loss and the DDIM sampler."""
from .loss import diffusion_loss, sample_timesteps
from .sampler import SPACINGS, DDIMSampler, ddim_timesteps
from .schedule import PARAMETERIZATIONS, SCHEDULES, NoiseSchedule, make_betas

__all__ = ["DDIMSampler", "NoiseSchedule", "PARAMETERIZATIONS", "SCHEDULES", "SPACINGS", "ddim_timesteps",
           "diffusion_loss", "make_betas", "sample_timesteps"]
