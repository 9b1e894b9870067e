"""ldmfast.accelerate on diffusers' UNet2DModel, VQModel and AutoencoderKL."""
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import ldmfast  # noqa: E402
from accelerate_checks import check_accelerate, check_low_precision_on_cuda, fresh_seed  # noqa: E402
from ldmfast.acceleration import LdmfastAttnProcessor  # noqa: E402

_AE = dict(in_channels=2, out_channels=2, block_out_channels=(16, 32), norm_num_groups=8,
           down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)


def _image(shape):
    return lambda dtype: [torch.randn(*shape, dtype=dtype)]


def _processors(model):
    return [type(m.processor) for m in model.modules() if hasattr(m, "set_processor")]


@pytest.mark.parametrize("time_scale_shift,channels_last", [("default", False), ("scale_shift", False),
                                                            ("default", True)])
def test_unet2d(time_scale_shift, channels_last, monkeypatch):
    fresh_seed()
    model = diffusers.UNet2DModel(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(16, 32),
                                  layers_per_block=1, norm_num_groups=8, attention_head_dim=8,
                                  down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                  up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                                  resnet_time_scale_shift=time_scale_shift)
    processors = _processors(model)

    def forward(m, x, t):
        return m(x, t).sample

    def inputs(dtype):
        return [torch.randn(2, 3, 12, 8, dtype=dtype), torch.randint(0, 1000, (2,))]

    report = check_accelerate(model, inputs, forward, monkeypatch=monkeypatch, channels_last=channels_last)
    counts = report.counts()
    assert counts["attention"] == 4
    n_resnets = sum(type(m).__name__ == "ResnetBlock2D" for m in model.modules())
    # The residual blocks, conv_norm_out and conv_act.
    assert counts["group_norm+silu"] == n_resnets + 2
    assert report.left_alone == []
    assert _processors(model) == processors


def test_vq_model(monkeypatch):
    """Encoder, then the decoder without the (discrete) quantization, whose argmin may differ in
    float32 on near ties; the quantizer has nothing to accelerate."""
    fresh_seed()
    model = diffusers.VQModel(**_AE, latent_channels=3, num_vq_embeddings=32, vq_embed_dim=3)

    def forward(m, x):
        return m.decode(m.encode(x).latents, force_not_quantize=True).sample

    report = check_accelerate(model, _image((2, 2, 16, 12)), forward, monkeypatch=monkeypatch)
    assert report.counts()["attention"] == 2  # encoder and decoder mid blocks


def test_autoencoder_kl(monkeypatch):
    fresh_seed()
    model = diffusers.AutoencoderKL(**_AE, latent_channels=4)
    report = check_accelerate(model, _image((1, 2, 16, 16)), lambda m, x: m(x).sample, monkeypatch=monkeypatch)
    assert report.counts()["attention"] == 2


def test_cross_attention_with_group_norm_and_rescale():
    """An Attention with every option the processor replicates: cross-attention on a context of
    another width and length, group_norm, residual_connection, rescale_output_factor, a 3-D input."""
    from diffusers.models.attention_processor import Attention
    fresh_seed()
    attn = Attention(query_dim=16, cross_attention_dim=12, heads=2, dim_head=6, norm_num_groups=4,
                     residual_connection=True, rescale_output_factor=2.0, bias=True).double()
    x, context = torch.randn(3, 7, 16, dtype=torch.float64), torch.randn(3, 5, 12, dtype=torch.float64)
    want = attn(x, encoder_hidden_states=context)
    report = ldmfast.accelerate(attn)
    assert isinstance(attn.processor, LdmfastAttnProcessor) and report.counts()["attention"] == 1
    torch.testing.assert_close(attn(x, encoder_hidden_states=context), want, rtol=1e-12, atol=1e-12)
    mask = torch.ones(3, 5, dtype=torch.float64)  # a mask goes to the original processor
    torch.testing.assert_close(attn(x, encoder_hidden_states=context, attention_mask=mask),
                               attn.processor.fallback(attn, x, context, mask), rtol=0, atol=0)


def test_cross_attention_norm_stays_a_group_norm():
    """diffusers asserts that norm_cross is an nn.GroupNorm (or LayerNorm) before running it."""
    from diffusers.models.attention_processor import Attention
    fresh_seed()
    attn = Attention(query_dim=8, cross_attention_dim=6, heads=2, dim_head=4, cross_attention_norm="group_norm",
                     cross_attention_norm_num_groups=2)
    x, context = torch.randn(2, 5, 8), torch.randn(2, 3, 6)
    want = attn(x, context)
    report = ldmfast.accelerate(attn)
    assert report.counts() == {"attention": 1, "group_norm": 1}
    torch.testing.assert_close(attn(x, context), want, rtol=1e-5, atol=1e-5)


def test_an_accelerated_attention_is_freed():
    """The processor's undo (the root's set_processor) must not hold the module the report is kept for."""
    import gc
    import weakref

    from diffusers.models.attention_processor import Attention
    attn = Attention(16, heads=2, dim_head=8)
    ldmfast.accelerate(attn)
    ref = weakref.ref(attn)
    del attn
    gc.collect()
    assert ref() is None


def test_unknown_processor_left_alone_and_processors_restored():
    from diffusers.models.attention_processor import Attention, AttnProcessor

    class CustomProcessor(AttnProcessor):
        pass

    blocks = torch.nn.ModuleList([Attention(16, heads=2, dim_head=8), Attention(16, heads=2, dim_head=8,
                                                                                processor=CustomProcessor())])
    before = [b.processor for b in blocks]
    report = ldmfast.accelerate(blocks)
    assert [c.path for c in report.replaced] == ["0"]
    assert [(s.path, s.type_name) for s in report.left_alone] == [("1", "Attention")]
    assert "CustomProcessor" in report.left_alone[0].reason
    ldmfast.restore(blocks)
    assert [b.processor for b in blocks] == before


@pytest.mark.cuda
def test_unet2d_and_autoencoder_bf16_on_cuda():
    fresh_seed()
    unet = diffusers.UNet2DModel(in_channels=18, out_channels=3, block_out_channels=(32, 64, 128), layers_per_block=2,
                                 down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
                                 attention_head_dim=32, norm_num_groups=32)
    check_low_precision_on_cuda(unet, lambda dtype: [torch.randn(4, 18, 48, 56, dtype=dtype),
                                                     torch.randint(0, 1000, (4,))],
                                lambda m, x, t: m(x, t.to(x.device)).sample)
    vae = diffusers.AutoencoderKL(**{**_AE, "norm_num_groups": 16}, latent_channels=3)
    check_low_precision_on_cuda(vae, _image((2, 2, 96, 112)), lambda m, x: m(x).sample)


def test_attention_switched_off_lists_each_attention_once():
    fresh_seed()
    model = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                                  layers_per_block=1, norm_num_groups=4, attention_head_dim=8,
                                  down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                  up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    report = ldmfast.accelerate(model, attention=False)
    assert "attention" not in report.counts()
    assert sorted(s.path for s in report.left_alone) == sorted(
        path for path, m in model.named_modules() if type(m).__name__ == "Attention")
    assert {s.reason for s in report.left_alone} == {"attention=False"}
