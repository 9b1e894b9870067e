"""ldmfast.accelerate on a UNet in the style of the reference release (tests/openaimodel_style.py)."""
import pytest
import torch

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
