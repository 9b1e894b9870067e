"""The loss of lesion-aware post-training (cLDM-PT, stage 3 of PAPER.md).

    L = L_latent + lambda_img * L_image + lambda_les * L_lesion

with t uniform in [0, T), x_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps, the denoiser's output at
(x_t, t), x0_hat recovered from it, and

    L_latent = mean over elements of (output - target)^2     (target = eps for eps-prediction)
    E        = sum over the image channels (DWI, ADC) of (D(x0_hat) - Y)^2    (|.| with l1)
    L_image  = sum(w_t * E) / number of brain-mask pixels in the batch
    L_lesion = sum(w_t * E * lesion) / number of lesion pixels in the batch (0 without any)

where D decodes with straight-through quantization (for a VQGAN), Y = D(z0) decoded without
gradient (or the ground-truth image), and w_t = 1 (or a per-timestep weight, see TIMESTEP_WEIGHTS).
The sum in L_image runs over all pixels, as PAPER.md writes it; only the normalizer is the brain.
The autoencoder is frozen by construction: `decode_latent` never gives its parameters gradients.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from ldmfast._values import is_number
from ldmfast.diffusion import NoiseSchedule, sample_timesteps
from ldmfast.diffusion.loss import Denoiser
from ldmfast.models.latent_codec import Autoencoder, decode_latent

from .config import ConfigError

IMAGE_LOSSES = ("l2", "l1")
IMAGE_TARGETS = ("decoded", "ground_truth")
#: Per-timestep weights w_t of the image and lesion terms, all within [0, 1]:
#: "none": 1; "abar": abar_t, the signal fraction of x_t, which fades the terms out where x0_hat
#: is mostly guesswork; "min_snr": min(SNR_t, gamma) / gamma with SNR_t = abar_t / (1 - abar_t),
#: the Min-SNR-gamma weighting of an x0-space loss (Hang et al. 2023) scaled to at most 1.
TIMESTEP_WEIGHTS = ("none", "abar", "min_snr")

NO_BRAIN_WARNING = "post-training batch without any brain-mask pixel: skipped (no loss, no step)"


@dataclass
class PostTrainLossConfig:
    """The `[posttrain]` loss settings; the defaults are PAPER.md's released ones.

    decoder_checkpoint: gradient checkpointing of the decoder for D(x0_hat): false, true (each
        decoder block) or n (segments of n blocks); see `ldmfast.models.latent_codec.decode_latent`.
    """

    lambda_img: float = 0.01
    lambda_les: float = 0.02
    image_loss: str = "l2"
    image_target: str = "decoded"
    timestep_weighting: str = "none"
    min_snr_gamma: float = 5.0
    decoder_checkpoint: bool | int = True

    def check(self, prefix: str = "") -> "PostTrainLossConfig":
        """Raise ConfigError naming the first bad key (dotted with `prefix`, e.g. "posttrain")."""
        def key(name: str) -> str:
            return f"{prefix}.{name}" if prefix else name

        for name in ("lambda_img", "lambda_les"):
            value = getattr(self, name)
            if not is_number(value) or not 0 <= value < math.inf:
                raise ConfigError(key(name), f"must be a finite number >= 0, got {value!r}")
        for name, allowed in (("image_loss", IMAGE_LOSSES), ("image_target", IMAGE_TARGETS),
                              ("timestep_weighting", TIMESTEP_WEIGHTS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(key(name), f"must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        gamma = self.min_snr_gamma
        if not is_number(gamma) or not 0 < gamma < math.inf:
            # inf would make every timestep's weight min(SNR, inf) / inf = 0: no image or lesion term
            raise ConfigError(key("min_snr_gamma"), f"must be a finite number > 0, got {gamma!r}")
        dc = self.decoder_checkpoint
        if not isinstance(dc, (bool, int)) or (not isinstance(dc, bool) and dc < 0):
            raise ConfigError(key("decoder_checkpoint"),
                              f"must be true, false or a number of decoder blocks per segment >= 0, got {dc!r}")
        return self


@dataclass
class PostTrainLoss:
    """total: the differentiable loss; latent, image, lesion: its parts, detached and unweighted
    by the lambdas (lesion is 0 when the batch has no lesion pixel); lesion_pixels, brain_pixels:
    the batch's pixel counts (the normalizers); t: the timesteps used."""

    total: torch.Tensor
    latent: torch.Tensor
    image: torch.Tensor
    lesion: torch.Tensor
    lesion_pixels: torch.Tensor
    brain_pixels: torch.Tensor
    t: torch.Tensor


def timestep_weights(schedule: NoiseSchedule, t: torch.Tensor, weighting: str, gamma: float = 5.0) -> torch.Tensor:
    """w_t (N,) float32 of TIMESTEP_WEIGHTS' `weighting` at timesteps t (N,)."""
    if weighting not in TIMESTEP_WEIGHTS:
        raise ValueError(f"weighting: must be one of {', '.join(TIMESTEP_WEIGHTS)}, got {weighting!r}")
    abar = schedule.abar(t)
    if weighting == "none":
        w = torch.ones_like(abar)
    elif weighting == "abar":
        w = abar
    else:
        w = (abar / (1 - abar)).clamp(max=gamma) / gamma
    return w.float()


def _check_inputs(z0, image, brain_mask, lesion, t, noise) -> None:
    if z0.dim() != 4:
        raise ValueError(f"z0: expected a latent (N, c, h, w), got shape {tuple(z0.shape)}")
    n = z0.shape[0]
    if image.dim() != 4 or image.shape[0] != n:
        raise ValueError(f"image: expected (N={n}, channels, H, W), got {tuple(image.shape)}")
    for name, mask in (("brain_mask", brain_mask), ("lesion", lesion)):
        if tuple(mask.shape) != (n, 1, *image.shape[2:]):
            raise ValueError(f"{name}: expected {(n, 1, *image.shape[2:])} (one channel, the image's size), "
                             f"got {tuple(mask.shape)}")
    if t is not None and tuple(t.shape) != (n,):
        raise ValueError(f"t: expected ({n},) timesteps, got {tuple(t.shape)}")
    if noise is not None and noise.shape != z0.shape:
        raise ValueError(f"noise: expected z0's shape {tuple(z0.shape)}, got {tuple(noise.shape)}")


def posttrain_loss(denoiser: Denoiser, autoencoder: Autoencoder, schedule: NoiseSchedule, z0: torch.Tensor,
                   image: torch.Tensor, brain_mask: torch.Tensor, lesion: torch.Tensor, *,
                   config: PostTrainLossConfig | None = None, parameterization: str = "eps",
                   t: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                   generator: torch.Generator | None = None) -> PostTrainLoss | None:
    """The post-training loss of one batch (module docstring), or None with a warning when the
    batch has no brain-mask pixel.

    denoiser(z_t, t) -> output, e.g. `ConditionalLDM.denoiser(ctp)`; z0 (N, c, h, w) the latent
    of the ground truth (`latent_codec.to_latent`); image (N, 2, H, W) the ground truth in
    [-1, 1]; brain_mask, lesion (N, 1, H, W) with values 0 or 1. t and noise are drawn (with
    `generator`) unless given. The pixel counts are this batch's (this process's, under DDP).
    """
    config = config or PostTrainLossConfig()
    config.check()
    _check_inputs(z0, image, brain_mask, lesion, t, noise)
    brain_pixels = brain_mask.float().sum()
    if brain_pixels.item() == 0:  # one device sync a step: a skipped batch must not reach backward
        warnings.warn(NO_BRAIN_WARNING, RuntimeWarning, stacklevel=2)
        return None
    lesion_pixels = lesion.float().sum()

    if t is None:
        t = sample_timesteps(z0.shape[0], schedule, z0.device, generator)
    if noise is None:
        noise = torch.randn(z0.shape, generator=generator, device=z0.device, dtype=z0.dtype)
    x_t = schedule.add_noise(z0, noise, t)
    output = denoiser(x_t, t)
    latent = torch.mean((output.float() - schedule.target(z0, noise, t, parameterization).float()) ** 2)

    x0_hat = schedule.predict_x0(x_t, t, output, parameterization)
    decoded = decode_latent(autoencoder, x0_hat, straight_through=True, checkpoint=config.decoder_checkpoint)
    if config.image_target == "decoded":
        with torch.no_grad():
            target = decode_latent(autoencoder, z0.detach(), straight_through=True)
    else:
        target = image
    if decoded.shape != target.shape:
        raise ValueError(f"image: the decoder gives {tuple(decoded.shape)} for latents {tuple(z0.shape)}, "
                         f"but the {config.image_target} target is {tuple(target.shape)}")
    diff = decoded.float() - target.float()
    error = (diff.square() if config.image_loss == "l2" else diff.abs()).sum(1, keepdim=True)  # E
    w = timestep_weights(schedule, t, config.timestep_weighting, config.min_snr_gamma)
    error = error * w.view(-1, 1, 1, 1)
    image_term = error.sum() / brain_pixels
    # Without lesion pixels the numerator is exactly 0: dividing by max(count, 1) gives 0, no NaN
    # and no device sync.
    lesion_term = (error * lesion.float()).sum() / lesion_pixels.clamp(min=1.0)

    total = latent + config.lambda_img * image_term + config.lambda_les * lesion_term
    return PostTrainLoss(total=total, latent=latent.detach(), image=image_term.detach(),
                         lesion=lesion_term.detach(), lesion_pixels=lesion_pixels, brain_pixels=brain_pixels, t=t)
