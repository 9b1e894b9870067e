"""The conditional latent diffusion model of PAPER.md: the CTP condition resized to the latent
size (bilinear x0.5 per VQGAN downsampling) through a trainable 1x1 convolution, concatenated to the
noisy latent and denoised by the UNet. The VQGAN is held beside it, frozen, for encoding targets
and decoding samples."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .unet import UNet, UNetConfig


class CTPCondition(nn.Module):
    """(N, frames, H, W) CTP slice -> (N, frames, H / 2^halvings, W / 2^halvings)."""

    def __init__(self, frames: int = 15, halvings: int = 2):
        super().__init__()
        self.halvings = halvings
        self.proj = nn.Conv2d(frames, frames, 1)

    def forward(self, ctp: torch.Tensor) -> torch.Tensor:
        for _ in range(self.halvings):
            ctp = F.interpolate(ctp, scale_factor=0.5, mode="bilinear", align_corners=False, antialias=False)
        return self.proj(ctp)


class ConditionalLDM(nn.Module):
    """denoiser(z_t, t, ctp) = UNet(concat(z_t, condition(ctp)), t)."""

    def __init__(self, unet_config: UNetConfig | None = None, frames: int = 15, latent_channels: int = 3,
                 halvings: int = 2, vqgan: nn.Module | None = None):
        super().__init__()
        unet_config = unet_config or UNetConfig(in_channels=latent_channels + frames, out_channels=latent_channels)
        if unet_config.in_channels != latent_channels + frames or unet_config.out_channels != latent_channels:
            raise ValueError(f"unet in/out channels: need {latent_channels + frames} in (latent + CTP frames) and "
                             f"{latent_channels} out, got {unet_config.in_channels} and {unet_config.out_channels}")
        self.condition = CTPCondition(frames, halvings)
        self.unet = UNet(unet_config)
        self.vqgan = vqgan
        if vqgan is not None:
            vqgan.requires_grad_(False).eval()

    def forward(self, z_t: torch.Tensor, t: torch.Tensor, ctp: torch.Tensor) -> torch.Tensor:
        return self.denoiser(ctp)(z_t, t)

    def denoiser(self, ctp: torch.Tensor):
        """The (z_t, t) -> output closure the DDIM sampler calls, with the condition computed once."""
        cond = self.condition(ctp)

        def denoise(z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            if cond.shape[-2:] != z_t.shape[-2:]:
                raise ValueError(f"ctp: resized to {tuple(cond.shape[-2:])}, which is not the latent size "
                                 f"{tuple(z_t.shape[-2:])}")
            return self.unet(torch.cat([z_t, cond.to(z_t.dtype)], dim=1), t)

        return denoise
