"""Noise schedules, the DDPM training loss and the DDIM sampler."""
from .loss import diffusion_loss, sample_timesteps
from .sampler import AUTOCAST_DTYPES, SPACINGS, DDIMSampler, ddim_timesteps, expand_seeds, sample_seed
from .schedule import PARAMETERIZATIONS, SCHEDULES, NoiseSchedule, make_betas

__all__ = ["AUTOCAST_DTYPES", "DDIMSampler", "NoiseSchedule", "PARAMETERIZATIONS", "SCHEDULES", "SPACINGS",
           "ddim_timesteps", "diffusion_loss", "expand_seeds", "make_betas", "sample_seed", "sample_timesteps"]
