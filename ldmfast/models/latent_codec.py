"""The (encoder, decoder) view of an autoencoder that latent diffusion and post-training use, so
that neither needs to know whether it holds a VQGAN or a KL autoencoder.

- `to_latent`: what the diffusion model is trained on (the VQGAN's continuous, pre-quantization
  latent, as the latent-diffusion release trains; the KL posterior's mean, or a sample).
- `decode_latent`: images of latents, differentiable in the latent but never in the decoder's
  parameters (post-training's frozen decoder), optionally with gradient checkpointing per
  decoder block, which is what makes decoding at full resolution with gradients affordable.
- `load_autoencoder`: either kind from a `save_pretrained` folder.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Union

import torch
from torch import nn
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint as torch_checkpoint

from .autoencoder_kl import AutoencoderKL
from .model_folder import CONFIG_NAME
from .quantizer import nearest_codes
from .vqgan import VQGAN

Autoencoder = Union[VQGAN, AutoencoderKL]
#: load_autoencoder's reading of config.json's "model" field.
AUTOENCODERS: dict[str, Callable[..., nn.Module]] = {"VQGAN": VQGAN.from_pretrained,
                                                    "AutoencoderKL": AutoencoderKL.from_pretrained}


def _check_autoencoder(autoencoder) -> None:
    if not isinstance(autoencoder, (VQGAN, AutoencoderKL)):
        raise ValueError(f"autoencoder: expected a VQGAN or an AutoencoderKL, got {type(autoencoder).__name__}")


def to_latent(autoencoder: Autoencoder, x: torch.Tensor, *, sample: bool = False,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """z0 of images x (N, in_channels, H, W): the VQGAN's `encode(x)` (continuous, before
    quantization; `sample` does not apply), the KL posterior's mean, or with `sample=True` a draw
    from the posterior. Runs with gradients if the caller has them enabled."""
    _check_autoencoder(autoencoder)
    if isinstance(autoencoder, VQGAN):
        return autoencoder.encode(x)
    posterior = autoencoder.encode(x)
    return posterior.sample(generator) if sample else posterior.mode()


def straight_through_quantize(autoencoder: VQGAN, z: torch.Tensor) -> torch.Tensor:
    """The nearest codebook vectors of z with an identity gradient to z (straight-through).

    Looks the codes up directly rather than calling the quantizer module: in training mode the
    module would update (restart) codes, and its codebook and commitment losses are not needed."""
    codebook = autoencoder.quantizer.codebook.detach()
    n, d, h, w = z.shape
    indices = nearest_codes(z.detach().permute(0, 2, 3, 1).reshape(-1, d), codebook)
    z_q = codebook[indices].view(n, h, w, d).permute(0, 3, 1, 2).to(z.dtype)
    return z + (z_q - z).detach() if z.requires_grad and torch.is_grad_enabled() else z_q


def decoder_units(autoencoder: Autoencoder) -> list[tuple[nn.Module, ...]]:
    """The decoder (from post_quant_conv to conv_out) as the sequence of units that gradient
    checkpointing segments: the latent-resolution stem (post_quant_conv, conv_in), then each
    residual block, attention block and upsampling of the middle and the up path, then the head
    (norm_out, conv_out). Running the units in order is `autoencoder.decode` (a test checks it),
    so this mirrors `Decoder.forward` and must change with it."""
    dec = autoencoder.decoder
    units: list[tuple[nn.Module, ...]] = [(autoencoder.post_quant_conv, dec.conv_in)]
    units += [(m,) for m in (dec.mid.block1, dec.mid.attn, dec.mid.block2) if not isinstance(m, nn.Identity)]
    for stage in dec.up:
        for i, block in enumerate(stage.blocks):
            units.append((block,))
            if len(stage.attn):
                units.append((stage.attn[i],))
        if not isinstance(stage.upsample, nn.Identity):
            units.append((stage.upsample,))
    units.append((dec.norm_out, dec.conv_out))
    return units


def _segment_size(checkpoint: bool | int) -> int:
    """0 (no checkpointing) or the number of decoder units per checkpointed segment."""
    if isinstance(checkpoint, bool):
        return int(checkpoint)
    if not isinstance(checkpoint, int) or checkpoint < 0:
        raise ValueError(f"checkpoint: expected a bool or an int >= 0 (units per checkpointed segment), "
                         f"got {checkpoint!r}")
    return checkpoint


def decode_latent(autoencoder: Autoencoder, z: torch.Tensor, *, straight_through: bool = True,
                  checkpoint: bool | int = False) -> torch.Tensor:
    """Images (N, out_channels, H, W) of latents z (N, latent_channels, h, w).

    VQGAN: with `straight_through` (the default) z is first quantized to its nearest codes with
    a straight-through gradient, as D(x0_hat) in post-training; with `straight_through=False`
    the continuous z is decoded as it is. KL autoencoder: z is decoded (nothing to quantize).

    Gradients flow to z, never to the decoder's parameters: they enter the computation detached,
    so no `.grad` is ever written on them and no time is spent on their gradients, whether or not
    the caller froze the autoencoder. Train/eval mode is the caller's (post-training wants eval).

    checkpoint: False/0 keeps every activation for the backward; True (= 1) recomputes each
    decoder unit (see `decoder_units`) in the backward, keeping only the unit boundaries; an int n
    checkpoints segments of n consecutive units (fewer boundaries kept, more recomputed at once).
    Uses torch.utils.checkpoint with use_reentrant=False, so the gradients with respect to z are
    those without checkpointing. Ignored when no gradient is being recorded.
    """
    _check_autoencoder(autoencoder)
    segment = _segment_size(checkpoint)
    c = autoencoder.config.latent_channels
    if z.dim() != 4 or z.shape[1] != c:
        raise ValueError(f"z: expected (N, {c}, h, w), got {tuple(z.shape)}")
    if isinstance(autoencoder, VQGAN) and straight_through:
        z = straight_through_quantize(autoencoder, z)
    units = decoder_units(autoencoder)
    recording = torch.is_grad_enabled() and z.requires_grad
    if not recording:
        segment = 0
    # Parameters that autograd would record get swapped for detached copies (functional_call);
    # where none would (a frozen autoencoder, or no grad mode) the modules run as they are:
    # functional_call's swapping cost ~0.1 ms of host time per decoder unit and call on a CPU core,
    # paid again by every checkpointed recomputation.
    frozen = None
    if torch.is_grad_enabled() and any(p.requires_grad for unit in units for m in unit for p in m.parameters()):
        frozen = {m: {name: p.detach() for name, p in m.named_parameters()} for unit in units for m in unit}

    def run(modules: tuple[nn.Module, ...], h: torch.Tensor) -> torch.Tensor:
        for m in modules:
            h = m(h) if frozen is None else functional_call(m, frozen[m], (h,))
        return h

    h = z
    if segment == 0:
        for unit in units:
            h = run(unit, h)
        return h
    for start in range(0, len(units), segment):
        modules = tuple(m for unit in units[start:start + segment] for m in unit)
        h = torch_checkpoint(run, modules, h, use_reentrant=False)
    return h


def freeze_autoencoder(autoencoder: Autoencoder) -> Autoencoder:
    """Eval mode and no parameter gradients: the frozen autoencoder of stages 2 and 3."""
    _check_autoencoder(autoencoder)
    return autoencoder.eval().requires_grad_(False)


def load_autoencoder(path: str | os.PathLike, device: str | torch.device = "cpu", *,
                     frozen: bool = True) -> Autoencoder:
    """The VQGAN or AutoencoderKL of a `save_pretrained` folder, by config.json's "model" field;
    frozen (eval mode, no parameter gradients) unless `frozen=False` (training mode, to train it)."""
    path = Path(path)
    config = path / CONFIG_NAME
    if not config.is_file():
        raise FileNotFoundError(f"{config}: not found; expected a folder written by save_pretrained "
                                f"of one of {', '.join(AUTOENCODERS)}")
    try:
        kind = json.loads(config.read_text()).get("model")
    except (json.JSONDecodeError, AttributeError) as err:
        raise ValueError(f"{config}: not a JSON object: {err}") from None
    if kind not in AUTOENCODERS:
        raise ValueError(f"{config}: \"model\" is {kind!r}; expected one of {', '.join(AUTOENCODERS)}")
    model = AUTOENCODERS[kind](path, device)
    return freeze_autoencoder(model) if frozen else model.train()
