"""ldmfast.accelerate on MONAI's generative networks: same outputs and gradients, fused ops used."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import ldmfast

pytest.importorskip("einops")  # MONAI's attention blocks need it
monai_nets = pytest.importorskip("monai.networks.nets")

from accelerate_checks import check_accelerate, check_low_precision_on_cuda, fresh_seed  # noqa: E402


def _unet_inputs(shape, context=None):
    def make(dtype):
        inputs = [torch.randn(*shape, dtype=dtype), torch.randint(0, 1000, (shape[0],))]
        if context is not None:
            inputs.append(torch.randn(shape[0], *context, dtype=dtype))
        return inputs
    return make


@pytest.mark.parametrize("channels_last", [False, True])
def test_diffusion_unet_2d(channels_last, monkeypatch):
    fresh_seed()
    model = monai_nets.DiffusionModelUNet(spatial_dims=2, in_channels=3, out_channels=3, channels=(16, 32),
                                          attention_levels=(False, True), num_res_blocks=1, num_head_channels=8,
                                          norm_num_groups=8)
    report = check_accelerate(model, _unet_inputs((2, 3, 12, 10)), monkeypatch=monkeypatch,
                              channels_last=channels_last)
    counts = report.counts()
    n_resnets = sum(type(m).__name__ == "DiffusionUNetResnetBlock" for m in model.modules())
    n_attention = sum(type(m).__name__ == "SABlock" for m in model.modules())
    assert n_attention == counts["attention"] == 4
    # Every residual block, plus the output Sequential (GroupNorm, SiLU, conv).
    assert counts["group_norm+silu"] == n_resnets + 1
    # Every SpatialAttentionBlock and the down/mid/up blocks that hold them keep the format.
    layout_blocks = ("SpatialAttentionBlock", "AttnDownBlock", "AttnMidBlock", "AttnUpBlock")
    assert counts["layout"] == sum(type(m).__name__ in layout_blocks for m in model.modules()) == 7
    assert report.left_alone == []


class _CopyCounter(TorchDispatchMode):
    """Counts copies of activations (clone, copy_, contiguous) made inside a forward."""

    def __init__(self):
        super().__init__()
        self.copies = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.clone, torch.ops.aten.copy_) and args[0].dim() >= 3:
            self.copies.append((str(func), tuple(args[0].shape), args[0].stride()))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("channels_last, per_block", [(True, 0), (False, 1)])
def test_diffusion_unet_makes_no_layout_copies(channels_last, per_block):
    """Channels-last activations stay channels-last through attention (MONAI's `.contiguous()`
    after each attention block copied them back); contiguous ones are copied once per attention
    block (the tokens for the q, k, v projections), not four times."""
    fresh_seed()
    model = monai_nets.DiffusionModelUNet(spatial_dims=2, in_channels=3, out_channels=3, channels=(16, 32),
                                          attention_levels=(False, True), num_res_blocks=1, num_head_channels=8,
                                          norm_num_groups=8).eval()
    ldmfast.accelerate(model, channels_last=channels_last)
    x = torch.randn(2, 3, 12, 10)
    with torch.no_grad(), _CopyCounter() as counter:
        model(x, torch.randint(0, 1000, (2,)))
    n_attention = sum(type(m).__name__ == "SpatialAttentionBlock" for m in model.modules())
    assert len(counter.copies) == per_block * n_attention, counter.copies


def test_diffusion_unet_2d_cross_attention_updown_combined_qkv(monkeypatch):
    """SpatialTransformer blocks (SABlock with a combined qkv linear, CrossAttentionBlock on a
    context of another width and length), residual down/upsampling; LayerNorms are listed as
    left alone."""
    fresh_seed()
    model = monai_nets.DiffusionModelUNet(spatial_dims=2, in_channels=2, out_channels=2, channels=(16, 32),
                                          attention_levels=(False, True), num_res_blocks=1, num_head_channels=8,
                                          norm_num_groups=8, resblock_updown=True, with_conditioning=True,
                                          cross_attention_dim=12, use_combined_linear=True)
    forward = (lambda m, x, t, c: m(x, t, context=c))
    report = check_accelerate(model, _unet_inputs((2, 2, 8, 12), context=(5, 12)), forward, monkeypatch=monkeypatch)
    kinds = {c.detail.split(":")[0] for c in report.replaced if c.kind == "attention"}
    assert kinds == {"SABlock", "CrossAttentionBlock"}
    left = {(s.type_name, s.reason) for s in report.left_alone}
    assert left == {("LayerNorm", "ldmfast has no fused LayerNorm")}


def test_diffusion_unet_3d(monkeypatch):
    fresh_seed()
    model = monai_nets.DiffusionModelUNet(spatial_dims=3, in_channels=1, out_channels=1, channels=(8, 16),
                                          attention_levels=(False, True), num_res_blocks=1, num_head_channels=8,
                                          norm_num_groups=4)
    report = check_accelerate(model, _unet_inputs((1, 1, 6, 4, 8)), monkeypatch=monkeypatch)
    assert report.counts()["attention"] == 4


def test_autoencoder_kl(monkeypatch):
    fresh_seed()
    model = monai_nets.AutoencoderKL(spatial_dims=2, in_channels=2, out_channels=2, channels=(16, 32),
                                     attention_levels=(False, True), latent_channels=3, num_res_blocks=(1, 1),
                                     norm_num_groups=8)
    report = check_accelerate(model, lambda dtype: [torch.randn(2, 2, 12, 8, dtype=dtype)],
                              lambda m, x: m.reconstruct(x), monkeypatch=monkeypatch)
    counts = report.counts()
    assert counts["group_norm+silu"] == sum(type(m).__name__ == "AEKLResBlock" for m in model.modules())
    assert counts["attention"] == sum(type(m).__name__ == "SABlock" for m in model.modules()) > 0


def test_vqvae_has_nothing_to_accelerate_and_stays_exact():
    """MONAI's VQVAE has no GroupNorm and no attention (ReLU residual units): nothing changes."""
    import ldmfast
    fresh_seed()
    model = monai_nets.VQVAE(spatial_dims=2, in_channels=1, out_channels=1, channels=(8, 16), num_res_channels=8,
                             num_res_layers=1, downsample_parameters=((2, 4, 1, 1),) * 2,
                             upsample_parameters=((2, 4, 1, 1, 0),) * 2, num_embeddings=16, embedding_dim=4).eval()
    x = torch.randn(2, 1, 16, 16)
    want = model(x)[0]
    report = ldmfast.accelerate(model)
    assert report.replaced == [] and report.left_alone == []
    torch.testing.assert_close(model(x)[0], want, rtol=0, atol=0)


def test_attention_options_left_alone_with_reasons():
    import ldmfast
    from monai.networks.blocks import SABlock
    model = torch.nn.ModuleDict({
        "causal": SABlock(16, 2, causal=True, sequence_length=8),
        "saved": SABlock(16, 2, save_attn=True),
        "plain": SABlock(16, 2),
    })
    report = ldmfast.accelerate(model)
    assert [c.path for c in report.replaced] == ["plain"]
    reasons = {s.path: s.reason for s in report.left_alone}
    assert "causal" in reasons["causal"] and "save_attn" in reasons["saved"]


def test_attention_mask_and_training_dropout_fall_back_to_monai():
    """Calls the fused forward cannot take (a mask; dropout while training) run MONAI's own forward."""
    import ldmfast
    from monai.networks.blocks import SABlock
    fresh_seed()
    block = SABlock(16, 2, dropout_rate=0.5, qkv_bias=True).double().eval()
    x = torch.randn(2, 7, 16, dtype=torch.float64)
    mask = (torch.rand(2, 7) > 0.3).double()
    mask[:, 0] = 1
    want = block(x, attn_mask=mask)
    report = ldmfast.accelerate(block)
    assert report.counts() == {"attention": 1}
    torch.testing.assert_close(block(x, attn_mask=mask), want, rtol=0, atol=0)
    block.train()
    torch.manual_seed(3)
    got = block(x)
    torch.manual_seed(3)
    torch.testing.assert_close(got, SABlock.forward(block, x), rtol=0, atol=0)


@pytest.mark.cuda
@pytest.mark.parametrize("channels_last", [False, True])
def test_diffusion_unet_bf16_on_cuda(channels_last):
    fresh_seed()
    model = monai_nets.DiffusionModelUNet(spatial_dims=2, in_channels=18, out_channels=3, channels=(32, 64, 128),
                                          attention_levels=(False, True, True), num_res_blocks=2,
                                          num_head_channels=32, norm_num_groups=32)
    check_low_precision_on_cuda(model, _unet_inputs((4, 18, 48, 56)), channels_last=channels_last)
