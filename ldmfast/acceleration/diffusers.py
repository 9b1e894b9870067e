"""diffusers' UNet2DModel, VQModel and AutoencoderKL: a fused forward for ResnetBlock2D (GroupNorm
then SiLU, twice), the output norm + SiLU pair of UNet2DModel and the VAE encoder/decoder, and an
attention processor for `Attention` that runs ldmfast's fused attention, replicating the
AttnProcessor2_0 / AttnProcessor it replaces."""
from __future__ import annotations

import math

import torch
from torch import nn

from ..ops import MAX_HEAD_DIM
from .fused import accelerated_group_norm, is_plain_silu, norm_act, token_attention, why_not_group_norm
from .patcher import fused_forward, override_forward, set_attribute, swap_child
from .report import AccelerationReport, Change
from .rules import Rule, class_rule, peer_class

_RESNET = "diffusers.models.resnet"
_ATTENTION = "diffusers.models.attention_processor"


# ---- ResnetBlock2D ----------------------------------------------------------------------------

@fused_forward
def _resnet_forward(self, input_tensor: torch.Tensor, temb: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """ResnetBlock2D.forward with norm1+SiLU and norm2+SiLU fused (not norm2 under scale_shift,
    where the time embedding's scale and shift come between the norm and the SiLU)."""
    if args or kwargs.get("scale") is not None:  # the deprecated `scale` argument: diffusers warns
        return type(self).forward(self, input_tensor, temb, *args, **kwargs)
    hidden = norm_act(self.norm1, self.nonlinearity, input_tensor)
    if self.upsample is not None:
        if hidden.shape[0] >= 64:  # as diffusers: upsample_nearest_nhwc fails on large batches
            input_tensor = input_tensor.contiguous()
            hidden = hidden.contiguous()
        input_tensor = self.upsample(input_tensor)
        hidden = self.upsample(hidden)
    elif self.downsample is not None:
        input_tensor = self.downsample(input_tensor)
        hidden = self.downsample(hidden)
    hidden = self.conv1(hidden)
    if self.time_emb_proj is not None:
        if not self.skip_time_act:
            temb = self.nonlinearity(temb)
        temb = self.time_emb_proj(temb)[:, :, None, None]
    if self.time_embedding_norm == "scale_shift":
        if temb is None:
            raise ValueError(f" `temb` should not be None when `time_embedding_norm` is {self.time_embedding_norm}")
        time_scale, time_shift = torch.chunk(temb, 2, dim=1)
        hidden = self.nonlinearity(self.norm2(hidden) * (1 + time_scale) + time_shift)
    else:
        if self.time_embedding_norm == "default" and temb is not None:
            hidden = hidden + temb
        hidden = norm_act(self.norm2, self.nonlinearity, hidden)
    hidden = self.conv2(self.dropout(hidden))
    if self.conv_shortcut is not None:
        if self.training:  # as diffusers: avoids DDP's gradient stride mismatch warning
            input_tensor = input_tensor.contiguous()
        input_tensor = self.conv_shortcut(input_tensor)
    return (input_tensor + hidden) / self.output_scale_factor


def _resnet_rule(cls) -> Rule:
    def why_not(block):
        if not is_plain_silu(block.nonlinearity):
            return f"nonlinearity is {type(block.nonlinearity).__name__}, not SiLU"
        return None

    def apply(path: str, block: nn.Module, report: AccelerationReport) -> None:
        fused = "norm1+SiLU" if block.time_embedding_norm == "scale_shift" else "norm1+SiLU and norm2+SiLU"
        override_forward(report, block, _resnet_forward, Change(path, "group_norm+silu", f"ResnetBlock2D: {fused} fused"))

    return class_rule(cls, "diffusers ResnetBlock2D", "group_norm+silu", why_not, apply)


# ---- output norm + SiLU of UNet2DModel and the VAE Encoder/Decoder ----------------------------

def _output_pair_rule(cls) -> Rule:
    """These forwards call conv_act exactly once, right after conv_norm_out: the pair becomes one
    fused GroupNorm+SiLU module and an Identity (neither holds parameters of its own)."""

    def why_not(model):
        reason = why_not_group_norm(model.conv_norm_out)
        if reason is not None:
            return f"conv_norm_out: {reason}"
        if not is_plain_silu(model.conv_act):
            return f"conv_act is {type(model.conv_act).__name__}, not SiLU"
        return None

    def apply(path: str, model: nn.Module, report: AccelerationReport) -> None:
        prefix = f"{path}." if path else ""
        swap_child(report, model, "conv_norm_out", accelerated_group_norm(model.conv_norm_out, "silu"),
                   Change(f"{prefix}conv_norm_out", "group_norm+silu",
                          f"{cls.__name__}: conv_norm_out + conv_act fused (conv_act becomes Identity)"))
        swap_child(report, model, "conv_act", nn.Identity(),
                   Change(f"{prefix}conv_act", "group_norm+silu", "SiLU folded into conv_norm_out"))

    return class_rule(cls, f"diffusers {cls.__name__}", "group_norm+silu", why_not, apply)


# ---- Attention --------------------------------------------------------------------------------

class LdmfastAttnProcessor:
    """An `Attention` processor computing what `fallback` (AttnProcessor2_0 or AttnProcessor)
    computes with ldmfast's fused attention: group_norm / spatial_norm, self- or cross-attention,
    residual_connection and rescale_output_factor. Calls it cannot take (an attention mask, q/k
    norms, extra arguments, head dims over MAX_HEAD_DIM) go to `fallback` unchanged."""

    def __init__(self, fallback):
        self.fallback = fallback
        # AttnProcessor2_0 calls SDPA with its default scale, 1/sqrt(head dim); AttnProcessor uses
        # attn.scale. diffusers picks the former only where the two agree (scale_qk=True).
        self.sdpa_scale = type(fallback).__name__ == "AttnProcessor2_0"

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args, **kwargs
                 ) -> torch.Tensor:
        heads = attn.heads
        if (attention_mask is not None or args or kwargs or attn.norm_q is not None or attn.norm_k is not None
                or attn.to_k.out_features // heads > MAX_HEAD_DIM or hidden_states.ndim not in (3, 4)):
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        four_d = hidden_states.ndim == 4
        if four_d:
            shape = hidden_states.shape
            if attn.group_norm is not None:  # the same statistics on (B, C, H, W) as on (B, C, H*W)
                hidden_states = attn.group_norm(hidden_states)
            tokens = hidden_states.flatten(2).transpose(1, 2)
        else:
            tokens = hidden_states
            if attn.group_norm is not None:
                tokens = attn.group_norm(tokens.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(tokens)
        if encoder_hidden_states is None:
            context = tokens
        elif attn.norm_cross:
            context = attn.norm_encoder_hidden_states(encoder_hidden_states)
        else:
            context = encoder_hidden_states
        key, value = attn.to_k(context), attn.to_v(context)
        scale = 1.0 / math.sqrt(key.shape[-1] // heads) if self.sdpa_scale else attn.scale
        out = token_attention(query, key, value, heads, scale).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))  # linear, dropout
        if four_d:
            out = out.transpose(-1, -2).reshape(shape)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def _attention_rule(cls) -> Rule:
    def why_not(attn):
        processor = attn.processor
        if isinstance(processor, LdmfastAttnProcessor):
            return "already runs ldmfast's attention processor"
        if type(processor).__name__ not in ("AttnProcessor2_0", "AttnProcessor") or \
                type(processor).__module__ != _ATTENTION:
            return (f"processor {type(processor).__name__}: ldmfast replicates only diffusers' "
                    "AttnProcessor2_0 and AttnProcessor")
        if attn.norm_q is not None or attn.norm_k is not None:
            return "q/k normalization (qk_norm)"
        head_dim = attn.to_k.out_features // attn.heads
        if head_dim > MAX_HEAD_DIM:
            return f"head dim {head_dim} exceeds ldmfast's {MAX_HEAD_DIM}"
        return None

    def apply(path: str, attn: nn.Module, report: AccelerationReport) -> None:
        old = attn.processor
        head_dim = attn.to_k.out_features // attn.heads
        detail = (f"Attention: {type(old).__name__} -> LdmfastAttnProcessor ({attn.heads} heads of {head_dim}"
                  f"{', cross-attention' if attn.is_cross_attention else ''})")
        set_attribute(report, attn, "processor", LdmfastAttnProcessor(old), Change(path, "attention", detail),
                      setter=lambda module, processor: module.set_processor(processor))

    return class_rule(cls, "diffusers Attention", "attention", why_not, apply)


def rules() -> list[Rule]:
    found = []
    cls = peer_class(_RESNET, "ResnetBlock2D")
    if cls is not None:
        found.append(_resnet_rule(cls))
    for module_name, class_name in (("diffusers.models.unets.unet_2d", "UNet2DModel"),
                                    ("diffusers.models.autoencoders.vae", "Encoder"),
                                    ("diffusers.models.autoencoders.vae", "Decoder")):
        cls = peer_class(module_name, class_name)
        if cls is not None:
            found.append(_output_pair_rule(cls))
    cls = peer_class(_ATTENTION, "Attention")
    if cls is not None:
        found.append(_attention_rule(cls))
    return found
