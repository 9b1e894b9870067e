"""A KL-regularized autoencoder (the latent-diffusion release's "AutoencoderKL") for the same
2-channel DWI/ADC images: the VQGAN's encoder and decoder, a diagonal Gaussian posterior instead
of the vector quantizer. It exists so that post-training can be shown to work with a second kind
of latent diffusion model (PAPER.md, stage 3); only the model is here, no training loop."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ldmfast._values import is_number

from .model_folder import read_model_config, read_model_weights, write_model_folder
from .vqgan import ConfigDict, Decoder, Encoder, ModelConfigError, VQGANConfig

#: The "model" value of config.json that `save_pretrained` writes.
MODEL_NAME = "AutoencoderKL"


@dataclass
class AutoencoderKLConfig(ConfigDict):
    """Hyper-parameters of the KL autoencoder. The architecture fields mean what they mean in
    VQGANConfig (and default to its release values: downsampling 4, latent 3 x 48 x 56 for a
    192 x 224 slice); `kl_weight` is the weight a training loop would give `posterior.kl()`."""

    kind = "AutoencoderKL"  # (a class attribute: no annotation, so not a field)
    in_channels: int = 2
    out_channels: int = 2
    base_channels: int = 128
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 4])
    num_res_blocks: int = 2
    attn_resolutions: list[int] = field(default_factory=list)
    mid_attention: bool = True
    attn_heads: int = 1
    dropout: float = 0.0
    norm_groups: int = 32
    latent_channels: int = 3
    kl_weight: float = 1e-6

    @classmethod
    def demo(cls) -> "AutoencoderKLConfig":
        """The size of VQGANConfig.demo(): trains on 64 x 64 phantom slices on a CPU."""
        return cls(base_channels=32, channel_mult=[1, 2, 2], num_res_blocks=1)

    @property
    def downsampling(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    def latent_shape(self, size: tuple[int, int]) -> tuple[int, int, int]:
        """(channels, H, W) of the latent of an H x W slice."""
        return (self.latent_channels, size[0] // self.downsampling, size[1] // self.downsampling)

    def backbone(self, latent_channels: int | None = None) -> VQGANConfig:
        """The VQGANConfig that builds this model's Encoder (latent_channels = 2 x latent: mean and
        log-variance) or Decoder; the codebook fields are unused."""
        shared = {f.name: getattr(self, f.name) for f in dataclasses.fields(VQGANConfig)
                  if hasattr(self, f.name)}
        if latent_channels is not None:
            shared["latent_channels"] = latent_channels
        return VQGANConfig(**shared)

    def validate(self) -> "AutoencoderKLConfig":
        """Raise ModelConfigError naming the first field that cannot build a model."""
        self.backbone().validate()  # the architecture fields, with VQGANConfig's rules and messages
        if not is_number(self.kl_weight) or self.kl_weight < 0:
            raise ModelConfigError("kl_weight", f"must be a number >= 0, got {self.kl_weight!r}")
        return self


class DiagonalGaussian:
    """The posterior q(z | x) = N(mean, exp(logvar)), per latent element."""

    def __init__(self, moments: torch.Tensor):
        mean, logvar = moments.chunk(2, dim=1)
        # The release's clamp: keeps exp() finite early in training.
        self.mean, self.logvar = mean, logvar.clamp(-30.0, 20.0)

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    def mode(self) -> torch.Tensor:
        return self.mean

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """mean + std * eps, differentiable in mean and logvar (reparameterization)."""
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * eps

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per sample, summed over the latent's elements: shape (N,)."""
        return 0.5 * (self.mean.square() + self.logvar.exp() - 1.0 - self.logvar).flatten(1).sum(1)


class AutoencoderKL(nn.Module):
    """Encoder -> 1x1 conv -> Gaussian posterior -> 1x1 conv -> decoder.

    `encode(x)` returns the posterior (a DiagonalGaussian), `decode(z)` images of latents, and
    `forward(x)` (reconstruction, posterior), decoding a posterior sample in training mode and the
    mean in eval mode unless `sample` says otherwise.
    """

    def __init__(self, config: AutoencoderKLConfig | None = None):
        super().__init__()
        self.config = (config or AutoencoderKLConfig()).validate()
        z = self.config.latent_channels
        self.encoder = Encoder(self.config.backbone(latent_channels=2 * z))
        self.quant_conv = nn.Conv2d(2 * z, 2 * z, 1)
        self.post_quant_conv = nn.Conv2d(z, z, 1)
        self.decoder = Decoder(self.config.backbone())

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """Posterior of images x (N, in_channels, H, W), H and W divisible by the downsampling."""
        f, c = self.config.downsampling, self.config.in_channels
        if x.dim() != 4 or x.shape[1] != c or x.shape[2] % f or x.shape[3] % f:
            raise ValueError(f"x: expected (N, {c}, H, W) with H and W divisible by {f}, got {tuple(x.shape)}")
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images of latents z (N, latent_channels, h, w)."""
        if z.dim() != 4 or z.shape[1] != self.config.latent_channels:
            raise ValueError(f"z: expected (N, {self.config.latent_channels}, h, w), got {tuple(z.shape)}")
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: torch.Tensor, sample: bool | None = None,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, DiagonalGaussian]:
        posterior = self.encode(x)
        sample = self.training if sample is None else sample
        z = posterior.sample(generator) if sample else posterior.mode()
        return self.decode(z), posterior

    @property
    def last_layer_weight(self) -> torch.Tensor:
        return self.decoder.conv_out.weight

    def save_pretrained(self, path: str | os.PathLike) -> Path:
        """Write `path/config.json` (with "model": "AutoencoderKL") and `path/model.safetensors`,
        each atomically."""
        return write_model_folder(path, self.state_dict(), self.config.to_dict(), MODEL_NAME)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> "AutoencoderKL":
        """An AutoencoderKL from a folder written by `save_pretrained`, in eval mode."""
        model = cls(AutoencoderKLConfig.from_dict(read_model_config(path, MODEL_NAME)))
        model.load_state_dict(read_model_weights(path, device))
        # In eval mode, as loaded models are (Hugging Face's too): in training mode a VQGAN's
        # dead-code restarts rewrite its codebook during inference. `.train()` to train it.
        return model.to(device).eval()
