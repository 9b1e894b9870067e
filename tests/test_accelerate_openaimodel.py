"""ldmfast.accelerate on a UNet in the style of the reference release (tests/openaimodel_style.py)."""
import math

import pytest
import torch
from torch import nn

import ldmfast
from accelerate_checks import check_accelerate, check_low_precision_on_cuda, fresh_seed
from openaimodel_style import UNetModel


@pytest.mark.parametrize("options,channels_last", [
    (dict(), False),
    (dict(use_scale_shift_norm=True, resblock_updown=True, use_new_attention_order=True), False),
    (dict(), True),
], ids=["legacy-attention", "scale-shift-updown-new-attention", "legacy-attention-channels-last"])
def test_unet(options, channels_last, monkeypatch):
    fresh_seed()
    model = UNetModel(in_channels=5, out_channels=3, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                      attention_resolutions=(2,), num_head_channels=8, groups=8, **options)

    def inputs(dtype):
        return [torch.randn(2, 5, 8, 12, dtype=dtype), torch.randint(0, 1000, (2,))]

    report = check_accelerate(model, inputs, monkeypatch=monkeypatch, channels_last=channels_last)
    counts = report.counts()
    assert counts["attention"] == sum(type(m).__name__.startswith("QKVAttention") for m in model.modules()) == 4
    assert counts["group_norm"] == sum(type(m).__name__ == "GroupNorm32" for m in model.modules())
    # Each ResBlock's in_layers and out_layers Sequentials, and the output Sequential: all of them
    # fuse, even where the block slices them (there the slice runs unfused, and exact).
    n_resblocks = sum(type(m).__name__ == "ResBlock" for m in model.modules())
    assert counts["group_norm+silu"] == 2 * n_resblocks + 1
    assert report.left_alone == []


@pytest.mark.cuda
@pytest.mark.parametrize("new_order", [False, True])
def test_unet_bf16_on_cuda(new_order):
    fresh_seed()
    model = UNetModel(in_channels=18, out_channels=3, model_channels=32, channel_mult=(1, 2, 4), num_res_blocks=2,
                      attention_resolutions=(2, 4), num_head_channels=32, use_new_attention_order=new_order)
    check_low_precision_on_cuda(model, lambda dtype: [torch.randn(4, 18, 48, 56, dtype=dtype),
                                                      torch.randint(0, 1000, (4,))],
                                lambda m, x, t: m(x, t.to(x.device)), autocast=True)


def _legacy_attention(qkv, n_heads, encoder_kv=None):
    """GLIDE's QKVAttention.forward (glide_text2im/unet.py): the legacy q,k,v layout, and keys and
    values of an encoder prepended where encoder_kv is given."""
    bs, width, length = qkv.shape
    ch = width // (3 * n_heads)
    q, k, v = qkv.reshape(bs * n_heads, ch * 3, length).split(ch, dim=1)
    if encoder_kv is not None:
        ek, ev = encoder_kv.reshape(bs * n_heads, ch * 2, -1).split(ch, dim=1)
        k, v = torch.cat([ek, k], dim=-1), torch.cat([ev, v], dim=-1)
    scale = 1 / math.sqrt(math.sqrt(ch))
    weight = torch.softmax(torch.einsum("bct,bcs->bts", q * scale, k * scale), dim=-1)
    return torch.einsum("bts,bcs->bct", weight, v).reshape(bs, -1, length)


class GlideQKVAttention(nn.Module):
    def __init__(self, n_heads):
        super().__init__()
        self.n_heads = n_heads

    def forward(self, qkv, encoder_kv=None):
        return _legacy_attention(qkv, self.n_heads, encoder_kv)


class LegacyUnderTheNewName(nn.Module):
    def __init__(self, n_heads):
        super().__init__()
        self.n_heads = n_heads

    def forward(self, qkv):
        return _legacy_attention(qkv, self.n_heads)


@pytest.mark.parametrize("cls, reason", [
    (GlideQKVAttention, "its forward takes more than (self, qkv) (e.g. GLIDE's encoder_kv)"),
    (LegacyUnderTheNewName, "its forward differs from the new-order q,k,v layout its class name implies "
                            "(checked on a probe input)"),
], ids=["glide-encoder-kv", "legacy-layout"])
def test_qkv_attention_of_another_project_under_the_same_name_is_left_alone(cls, reason):
    fresh_seed()
    named = type("QKVAttention", (cls,), {})  # the name the rule looks for, as GLIDE's class is named
    block = nn.ModuleDict({"attention": named(2)})
    qkv = torch.randn(2, 3 * 2 * 4, 5)
    want = block["attention"](qkv)
    report = ldmfast.accelerate(block)
    assert {s.path: s.reason for s in report.left_alone} == {"attention": reason}
    assert report.replaced == [] and "forward" not in block["attention"].__dict__
    torch.testing.assert_close(block["attention"](qkv), want, rtol=0, atol=0)
