"""The conditional latent diffusion model of PAPER.md: the CTP condition resized to the latent
size (bilinear x0.5 per autoencoder downsampling) through a trainable 1x1 convolution,
concatenated to the noisy latent and denoised by the UNet. The autoencoder (the VQGAN) is held
beside it, frozen, for encoding targets and decoding samples.

A trained model is a folder (`save_pretrained`): config.json (UNet, condition, diffusion),
model.safetensors (condition + UNet) and autoencoder/ (the autoencoder's own folder)."""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ldmfast._values import is_integer, is_number
from ldmfast.diffusion import PARAMETERIZATIONS, SCHEDULES, SPACINGS, DDIMSampler, NoiseSchedule

from .latent_codec import decode_latent, load_autoencoder, to_latent
from .model_folder import WEIGHTS_NAME, read_model_config, read_model_weights, write_model_folder
from .unet import UNet, UNetConfig
from .vqgan import ModelConfigError

AUTOENCODER_DIR = "autoencoder"


@dataclass
class DiffusionConfig:
    """The noise schedule and what the UNet predicts; defaults are PAPER.md's release."""

    schedule: str = "linear"
    num_train_steps: int = 1000
    beta_start: float = 0.0015
    beta_end: float = 0.0195
    parameterization: str = "eps"
    latent_scale: float = 1.0   # z fed to the UNet = latent_scale x autoencoder latent

    def validate(self) -> "DiffusionConfig":
        if self.schedule not in SCHEDULES:
            raise ModelConfigError("schedule", f"must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.parameterization not in PARAMETERIZATIONS:
            raise ModelConfigError("parameterization", f"must be one of {', '.join(PARAMETERIZATIONS)}, "
                                                       f"got {self.parameterization!r}")
        if not is_integer(self.num_train_steps):
            raise ModelConfigError("num_train_steps", f"must be an integer, got {self.num_train_steps!r}")
        if self.num_train_steps < 2:
            raise ModelConfigError("num_train_steps", f"must be >= 2, got {self.num_train_steps}")
        if not 0 < self.beta_start <= self.beta_end < 1:
            raise ModelConfigError("beta_start", f"need 0 < beta_start <= beta_end < 1, got {self.beta_start} and "
                                                 f"{self.beta_end}")
        if not 0 < self.latent_scale < math.inf:  # (false for NaN too)
            raise ModelConfigError("latent_scale", f"must be a finite number > 0, got {self.latent_scale}")
        return self

    def make_schedule(self) -> NoiseSchedule:
        return NoiseSchedule(self.schedule, self.num_train_steps, self.beta_start, self.beta_end)


def _settings(config_class, data, section: str) -> dict:
    """A config.json table as keyword arguments of `config_class` (lists as tuples); an unknown key
    is a ModelConfigError naming it, not a TypeError from the constructor."""
    if not isinstance(data, dict):
        raise ModelConfigError(section, f"must be a table of settings, got {data!r}")
    names = {f.name for f in dataclasses.fields(config_class)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ModelConfigError(f"{section}.{unknown[0]}", f"unknown setting; known: {', '.join(sorted(names))}")
    return {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}


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
    """denoiser(z_t, t, ctp) = UNet(concat(z_t, condition(ctp)), t), with the autoencoder to go
    between images and latents and the diffusion configuration to sample with."""

    def __init__(self, unet_config: UNetConfig | None = None, frames: int = 15, latent_channels: int = 3,
                 halvings: int = 2, vqgan: nn.Module | None = None, *, autoencoder: nn.Module | None = None,
                 diffusion: DiffusionConfig | None = None):
        super().__init__()
        unet_config = unet_config or UNetConfig(in_channels=latent_channels + frames, out_channels=latent_channels)
        if unet_config.in_channels != latent_channels + frames or unet_config.out_channels != latent_channels:
            raise ModelConfigError("unet", f"in/out channels: need {latent_channels + frames} in (latent + CTP "
                                           f"frames) and {latent_channels} out, got {unet_config.in_channels} and "
                                           f"{unet_config.out_channels}")
        if vqgan is not None and autoencoder is not None:
            raise ValueError("autoencoder: give autoencoder or vqgan (its old name), not both")
        self.frames, self.latent_channels, self.halvings = frames, latent_channels, halvings
        self.diffusion = (diffusion or DiffusionConfig()).validate()
        self.schedule = self.diffusion.make_schedule()
        self.condition = CTPCondition(frames, halvings)
        self.unet = UNet(unet_config)
        self.autoencoder = autoencoder if autoencoder is not None else vqgan
        config = getattr(self.autoencoder, "config", None)
        if config is not None and hasattr(config, "downsampling"):
            # The CTP condition halves `halvings` times to meet the latent, and the UNet works on
            # `latent_channels`: an autoencoder of another factor or width would meet neither.
            if config.downsampling != 2 ** halvings:
                raise ModelConfigError("halvings", f"{halvings} (factor {2 ** halvings}) differs from the autoencoder's "
                                                   f"downsampling factor {config.downsampling}")
            if config.latent_channels != latent_channels:
                raise ModelConfigError("latent_channels", f"{latent_channels} differs from the autoencoder's "
                                                          f"{config.latent_channels}")
        # One persistent callable: the sampler keys its CUDA graphs by the denoiser's identity.
        self._denoise_fn = self._denoise_with_condition
        if self.autoencoder is not None:
            self.autoencoder.requires_grad_(False).eval()

    @property
    def vqgan(self) -> nn.Module | None:
        return self.autoencoder

    def train(self, mode: bool = True) -> "ConditionalLDM":
        super().train(mode)
        if self.autoencoder is not None:
            self.autoencoder.eval()  # frozen: its dropout and codebook updates stay off
        return self

    def forward(self, z_t: torch.Tensor, t: torch.Tensor, ctp: torch.Tensor) -> torch.Tensor:
        return self.denoiser(ctp)(z_t, t)

    def denoiser(self, ctp: torch.Tensor):
        """The (z_t, t) -> output closure the DDIM sampler calls, with the condition computed once."""
        if ctp.dim() != 4 or ctp.shape[1] != self.frames:
            raise ValueError(f"ctp: expected (N, {self.frames}, H, W), got {tuple(ctp.shape)}")
        cond = self.condition(ctp)

        def denoise(z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            if cond.shape[-2:] != z_t.shape[-2:]:
                raise ValueError(f"ctp: resized to {tuple(cond.shape[-2:])}, which is not the latent size "
                                 f"{tuple(z_t.shape[-2:])}")
            return self.unet(torch.cat([z_t, cond.to(z_t.dtype)], dim=1), t)

        return denoise

    # ---- images <-> latents ---------------------------------------------------------------------

    def _need_autoencoder(self) -> nn.Module:
        if self.autoencoder is None:
            raise ValueError("autoencoder: this ConditionalLDM was built without one; pass autoencoder=...")
        return self.autoencoder

    def latent_size(self, image_size: Sequence[int]) -> tuple[int, int, int]:
        f = 2 ** self.halvings
        return (self.latent_channels, image_size[0] // f, image_size[1] // f)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """The diffusion latents z0 of (N, 2, H, W) DWI/ADC images (`latent_codec.to_latent`: the
        VQGAN's continuous latent before quantization, as the latent-diffusion release trains;
        a KL autoencoder's posterior mean), scaled."""
        return to_latent(self._need_autoencoder(), images) * self.diffusion.latent_scale

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images of diffusion latents (quantized first where the autoencoder quantizes)."""
        return decode_latent(self._need_autoencoder(), z / self.diffusion.latent_scale, straight_through=True)

    def _denoise_with_condition(self, z_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.unet(torch.cat([z_t, cond.to(z_t.dtype)], dim=1), t)

    def sampler(self, *, steps: int = 50, eta: float = 0.0, spacing: str = "uniform", samples_per_input: int = 1,
                autocast: torch.dtype | None = None, channels_last: bool = False,
                cuda_graph: bool = False) -> DDIMSampler:
        """The DDIM sampler of these settings, kept per setting so that its CUDA graphs are
        reused from batch to batch (call `clear_samplers()` after moving the model)."""
        if spacing not in SPACINGS:
            raise ValueError(f"spacing: must be one of {', '.join(SPACINGS)}, got {spacing!r}")
        # Checked before they key the kept samplers: 2.0 would find the sampler of steps=2, True that of 1.
        if not is_integer(steps):
            raise ValueError(f"steps: must be an integer, got {steps!r}")
        if not is_number(eta):
            raise ValueError(f"eta: must be a finite number >= 0, got {eta!r}")
        key = (steps, float(eta), spacing, samples_per_input, autocast, channels_last, cuda_graph)
        cache = self.__dict__.setdefault("_samplers", {})
        if key not in cache:
            cache[key] = DDIMSampler(self.schedule, steps=steps, eta=eta, spacing=spacing,
                                     parameterization=self.diffusion.parameterization,
                                     samples_per_input=samples_per_input, autocast=autocast,
                                     channels_last=channels_last, cuda_graph=cuda_graph)
        return cache[key]

    def clear_samplers(self) -> None:
        """Drop the kept samplers and their CUDA graphs (which read the weights where they were)."""
        self.__dict__.pop("_samplers", None)

    @torch.no_grad()
    def generate(self, ctp: torch.Tensor, seeds: Sequence[int], *, steps: int = 50, eta: float = 0.0,
                 spacing: str = "uniform", samples_per_input: int = 1, autocast: torch.dtype | None = None,
                 channels_last: bool = False, cuda_graph: bool = False, progress: bool = False) -> torch.Tensor:
        """Synthesized images in [-1, 1] for N CTP slices, slice i drawn from seeds[i] (DDIM; the
        result of a slice depends on its CTP and seed only): (N * samples_per_input, 2, H, W),
        the samples of an input next to each other. autocast (e.g. torch.bfloat16), channels_last
        and cuda_graph (CUDA only) are the sampler's speed options."""
        if len(seeds) != ctp.shape[0]:
            raise ValueError(f"seeds: need one per CTP slice ({ctp.shape[0]}), got {len(seeds)}")
        sampler = self.sampler(steps=steps, eta=eta, spacing=spacing, samples_per_input=samples_per_input,
                               autocast=autocast, channels_last=channels_last, cuda_graph=cuda_graph)
        if ctp.dim() != 4 or ctp.shape[1] != self.frames:
            raise ValueError(f"ctp: expected (N, {self.frames}, H, W), got {tuple(ctp.shape)}")
        multiple = self.size_multiple()
        if ctp.shape[-2] % multiple or ctp.shape[-1] % multiple:
            raise ValueError(f"ctp: H and W must be multiples of {multiple} (the autoencoder's and the UNet's "
                             f"halvings), got {ctp.shape[-2]} x {ctp.shape[-1]}: crop or pad the slices (ldmfast "
                             "synthesize --size)")
        # In eval mode whatever the caller's (dropout would make the result depend on more than the
        # CTP and seed), each module's own mode restored after.
        modes = [(m, m.training) for m in self.modules()]
        self.eval()
        try:
            cond = self.condition(ctp)
            z = sampler.sample(self._denoise_fn, self.latent_size(ctp.shape[-2:]), seeds, device=ctp.device,
                               dtype=ctp.dtype, progress=progress, condition=cond)
            return self.decode(z).clamp(-1, 1)
        finally:
            for m, training in modes:
                m.training = training

    def size_multiple(self) -> int:
        """What slice heights and widths must be multiples of: the latent's halvings times the
        UNet's (its levels but the last halve)."""
        return 2 ** self.halvings * 2 ** (len(self.unet.config.channel_mult) - 1)

    # ---- files ----------------------------------------------------------------------------------

    def config_dict(self) -> dict:
        return {"model": "ConditionalLDM", "frames": self.frames, "latent_channels": self.latent_channels,
                "halvings": self.halvings, "unet": dataclasses.asdict(self.unet.config),
                "diffusion": dataclasses.asdict(self.diffusion)}

    def denoiser_state_dict(self) -> dict[str, torch.Tensor]:
        """The trained part: condition and UNet (the autoencoder has its own folder)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("autoencoder.")}

    def save_pretrained(self, path: str | os.PathLike, *, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
        """Write the model folder, each file atomically; `state_dict` (e.g. EMA weights of the
        condition and UNet) replaces the live weights in the file."""
        path = Path(path)
        if self.autoencoder is not None:
            self.autoencoder.save_pretrained(path / AUTOENCODER_DIR)
        weights = state_dict if state_dict is not None else self.denoiser_state_dict()
        return write_model_folder(path, weights, self.config_dict(), "ConditionalLDM")

    @classmethod
    def from_config_dict(cls, data: dict, autoencoder: nn.Module | None = None) -> "ConditionalLDM":
        missing = [k for k in ("unet", "frames", "latent_channels", "halvings", "diffusion") if k not in data]
        if missing:
            raise ModelConfigError(missing[0], "missing from the model's configuration")
        unet = UNetConfig(**_settings(UNetConfig, data["unet"], "unet"))
        return cls(unet, data["frames"], data["latent_channels"], data["halvings"], autoencoder=autoencoder,
                   diffusion=DiffusionConfig(**_settings(DiffusionConfig, data["diffusion"], "diffusion")))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> "ConditionalLDM":
        """A model folder written by `save_pretrained` (or a training run's export), in eval mode."""
        path = Path(path)
        data = read_model_config(path, "ConditionalLDM", unnamed_ok=False)
        ae_dir = path / AUTOENCODER_DIR
        autoencoder = load_autoencoder(ae_dir, device) if ae_dir.exists() else None
        try:
            model = cls.from_config_dict(data, autoencoder)
        except ModelConfigError as err:
            raise ModelConfigError(err.key, f"{str(err)[len(err.key) + 2:]} (in {path / 'config.json'})") from None
        missing, unexpected = model.load_state_dict(read_model_weights(path, device), strict=False)
        missing = [k for k in missing if not k.startswith("autoencoder.")]
        if missing or unexpected:
            raise ValueError(f"{path / WEIGHTS_NAME}: weights do not match the config (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]})")
        return model.to(device).eval()  # as loaded models are; `.train()` to train it
