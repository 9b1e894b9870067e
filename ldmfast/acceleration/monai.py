"""MONAI's generative networks (DiffusionModelUNet, ControlNet, AutoencoderKL; VQVAE has no
GroupNorm or attention): fused forwards for their residual blocks (GroupNorm then SiLU) and their
self- and cross-attention blocks (SABlock, CrossAttentionBlock), replicating MONAI 1.4+ exactly;
and the UNet's spatial attention blocks and the down/mid/up blocks around them with the same sums
in the activations' own memory format (MONAI's order and its `.contiguous()` after each attention
make channels-last activations contiguous again, and copy contiguous ones twice)."""
from __future__ import annotations

import torch
from torch import nn

from ..ops import MAX_HEAD_DIM
from .fused import norm_act, norm_silu, token_attention
from .patcher import fused_forward, override_forward
from .report import AccelerationReport, Change
from .rules import Rule, class_rule, peer_class

_UNET = "monai.networks.nets.diffusion_model_unet"
_AEKL = "monai.networks.nets.autoencoderkl"
_SELF_ATTENTION = "monai.networks.blocks.selfattention"
_SPATIAL_ATTENTION = "monai.networks.blocks.spatialattention"
_CROSS_ATTENTION = "monai.networks.blocks.crossattention"


# ---- residual blocks --------------------------------------------------------------------------

@fused_forward
def _unet_resnet_forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    """DiffusionUNetResnetBlock.forward with norm1+SiLU and norm2+SiLU fused."""
    h = norm_act(self.norm1, self.nonlinearity, x)
    if self.upsample is not None:
        x = self.upsample(x)
        h = self.upsample(h)
    elif self.downsample is not None:
        x = self.downsample(x)
        h = self.downsample(h)
    h = self.conv1(h)
    temb = self.time_emb_proj(self.nonlinearity(emb))
    # MONAI adds two trailing dims for 2-D and three otherwise.
    temb = temb[:, :, None, None] if self.spatial_dims == 2 else temb[:, :, None, None, None]
    h = norm_act(self.norm2, self.nonlinearity, h + temb)
    h = self.conv2(h)
    return self.skip_connection(x) + h


@fused_forward
def _aekl_resnet_forward(self, x: torch.Tensor) -> torch.Tensor:
    """AEKLResBlock.forward (F.silu after each norm) with both pairs fused."""
    h = self.conv1(norm_silu(self.norm1, x))
    h = self.conv2(norm_silu(self.norm2, h))
    return self.nin_shortcut(x) + h


def _resnet_rule(cls, forward, name: str) -> Rule:
    def why_not(block):
        if hasattr(block, "nonlinearity") and type(block.nonlinearity) is not nn.SiLU:
            return f"nonlinearity is {type(block.nonlinearity).__name__}, not SiLU"
        return None

    def apply(path: str, block: nn.Module, report: AccelerationReport) -> None:
        override_forward(report, block, forward,
                         Change(path, "group_norm+silu", f"{name}: norm1+SiLU and norm2+SiLU fused"))

    return class_rule(cls, f"MONAI {name}", "group_norm+silu", why_not, apply)


# ---- attention --------------------------------------------------------------------------------

def _dropout_active(block) -> bool:
    # With use_flash_attention MONAI passes dropout_p to SDPA even in eval mode.
    return block.dropout_rate > 0 and (block.training or block.use_flash_attention)


def _attend(block, q, k, v) -> torch.Tensor:
    """Fused attention with MONAI's attention_dtype upcast: q, k (and v, which the op needs in the
    same dtype) in that dtype, the result back in v's dtype."""
    out_dtype = v.dtype
    if block.attention_dtype is not None:
        q, k, v = (t.to(block.attention_dtype) for t in (q, k, v))
    return token_attention(q, k, v, block.num_heads, block.scale).to(out_dtype)


@fused_forward
def _sablock_forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """SABlock.forward (no mask, causal, relative positions or saved weights) on ldmfast attention."""
    if attn_mask is not None or _dropout_active(self):
        return type(self).forward(self, x, attn_mask)
    if self.use_combined_linear:
        # "b h (qkv l d) -> qkv b l h d": the features are ordered (q/k/v, head, dim).
        q, k, v = self.qkv(x).chunk(3, dim=-1)
    else:
        if x.stride(-1) != 1:
            x = x.contiguous()  # tokens transposed from (B, C, L): one copy, not one per linear
        q, k, v = self.to_q(x), self.to_k(x), self.to_v(x)
    out = _attend(self, q, k, v)
    if self.include_fc:
        out = self.out_proj(out)
    return self.drop_output(out)


@fused_forward
def _cross_attention_forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
    """CrossAttentionBlock.forward (self-attention where context is None) on ldmfast attention."""
    if _dropout_active(self):
        return type(self).forward(self, x, context)
    kv = context if context is not None else x
    out = _attend(self, self.to_q(x), self.to_k(kv), self.to_v(kv))
    return self.drop_output(self.out_proj(out))


def _attention_rule(cls, forward, name: str, head_dim_attr: str) -> Rule:
    def why_not(block):
        if block.causal:
            return "causal attention (ldmfast's attention is non-causal)"
        if block.rel_positional_embedding is not None:
            return "relative positional embedding inside the softmax"
        if block.save_attn:
            return "save_attn keeps the attention matrix, which the fused op never forms"
        head_dim = getattr(block, head_dim_attr)
        if head_dim > MAX_HEAD_DIM:
            return f"head dim {head_dim} exceeds ldmfast's {MAX_HEAD_DIM}"
        return None

    def apply(path: str, block: nn.Module, report: AccelerationReport) -> None:
        detail = (f"{name}: ldmfast attention ({block.num_heads} heads of {getattr(block, head_dim_attr)}, "
                  f"scale {block.scale:.4g})")
        override_forward(report, block, forward, Change(path, "attention", detail))

    return class_rule(cls, f"MONAI {name}", "attention", why_not, apply)


# ---- memory format around the UNet's attention ------------------------------------------------

@fused_forward
def _spatial_attention_forward(self, x: torch.Tensor) -> torch.Tensor:
    """SpatialAttentionBlock.forward with the residual sum as `x + attention`: the same sums, in x's
    memory format (MONAI's `attention + x` takes the channels-last strides of the transposed tokens,
    which its callers' `.contiguous()` then copies back)."""
    shape = x.shape
    h = self.norm(x).reshape(*shape[:2], -1).transpose(1, 2)  # "b c h w d -> b (h w d) c"
    h = self.attn(h).transpose(1, 2).reshape(shape)  # "b (h w d) c -> b c h w d"
    return x + h


def _dense(t: torch.Tensor) -> torch.Tensor:
    """MONAI's `.contiguous()` after an attention block, but keeping a dense channels-last tensor
    as it is (t itself when already dense in either format)."""
    if t.is_contiguous():
        return t
    cl = {4: torch.channels_last, 5: torch.channels_last_3d}.get(t.dim())
    return t if cl is not None and t.is_contiguous(memory_format=cl) else t.contiguous()


@fused_forward
def _attn_down_forward(self, hidden_states, temb, context=None):
    """AttnDownBlock.forward with `_dense` for `.contiguous()`."""
    del context
    output_states = []
    for resnet, attn in zip(self.resnets, self.attentions):
        hidden_states = _dense(attn(resnet(hidden_states, temb)))
        output_states.append(hidden_states)
    if self.downsampler is not None:
        hidden_states = self.downsampler(hidden_states, temb)
        output_states.append(hidden_states)
    return hidden_states, output_states


@fused_forward
def _attn_mid_forward(self, hidden_states, temb, context=None):
    """AttnMidBlock.forward with `_dense` for `.contiguous()`."""
    del context
    hidden_states = _dense(self.attention(self.resnet_1(hidden_states, temb)))
    return self.resnet_2(hidden_states, temb)


@fused_forward
def _attn_up_forward(self, hidden_states, res_hidden_states_list, temb, context=None):
    """AttnUpBlock.forward with `_dense` for `.contiguous()`."""
    del context
    for resnet, attn in zip(self.resnets, self.attentions):
        res_hidden_states = res_hidden_states_list[-1]
        res_hidden_states_list = res_hidden_states_list[:-1]
        hidden_states = torch.cat([hidden_states, res_hidden_states], dim=1)
        hidden_states = _dense(attn(resnet(hidden_states, temb)))
    if self.upsampler is not None:
        hidden_states = self.upsampler(hidden_states, temb)
    return hidden_states


def _layout_rule(cls, forward, name: str, detail: str) -> Rule:
    def apply(path: str, block: nn.Module, report: AccelerationReport) -> None:
        override_forward(report, block, forward, Change(path, "layout", f"{name}: {detail}"))

    return class_rule(cls, f"MONAI {name}", "attention", lambda block: None, apply)


def rules() -> list[Rule]:
    found = []
    for module_name, class_name, make in (
            (_UNET, "DiffusionUNetResnetBlock", lambda c: _resnet_rule(c, _unet_resnet_forward, c.__name__)),
            (_AEKL, "AEKLResBlock", lambda c: _resnet_rule(c, _aekl_resnet_forward, c.__name__)),
            (_SELF_ATTENTION, "SABlock", lambda c: _attention_rule(c, _sablock_forward, c.__name__, "dim_head")),
            (_CROSS_ATTENTION, "CrossAttentionBlock",
             lambda c: _attention_rule(c, _cross_attention_forward, c.__name__, "head_dim")),
            (_SPATIAL_ATTENTION, "SpatialAttentionBlock",
             lambda c: _layout_rule(c, _spatial_attention_forward, c.__name__, "residual sum in the input's format")),
            *((_UNET, name, lambda c, f=forward: _layout_rule(c, f, c.__name__, "no contiguous copy of channels-last "
                                                                                 "activations after attention"))
              for name, forward in (("AttnDownBlock", _attn_down_forward), ("AttnMidBlock", _attn_mid_forward),
                                    ("AttnUpBlock", _attn_up_forward)))):
        cls = peer_class(module_name, class_name)
        if cls is not None:
            found.append(make(cls))
    return found
