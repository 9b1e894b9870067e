"""The cLDM denoiser (UNet), the CTP condition module and the ConditionalLDM wrapper."""
import pytest
import torch

from ldmfast.diffusion import DDIMSampler, NoiseSchedule, diffusion_loss
from ldmfast.models import ConditionalLDM, CTPCondition, ModelConfigError, UNet, UNetConfig, timestep_embedding


def test_release_config_shapes_on_the_meta_device():
    """PAPER.md's UNet (base 224, [1, 4, 8], attention at 24x28, 12x14 and the middle, 32 channels a
    head) on a 3 x 48 x 56 latent + 15 CTP channels, without allocating its ~740M parameters."""
    with torch.device("meta"):
        model = UNet(UNetConfig())
        out = model(torch.empty(2, 18, 48, 56), torch.zeros(2, dtype=torch.long))
    assert out.shape == (2, 3, 48, 56)
    heads = [m.num_heads for m in model.modules() if hasattr(m, "num_heads")]
    assert set(heads) == {896 // 32, 1792 // 32}  # 28 heads at 24x28, 56 at 12x14 and the middle


def test_demo_unet_runs_forward_and_backward_in_both_memory_formats():
    torch.manual_seed(0)
    model = UNet(UNetConfig.demo())
    x = torch.randn(2, 18, 16, 20)
    t = torch.tensor([3, 700])
    out = model(x, t)
    assert out.shape == (2, 3, 16, 20)
    out.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())
    model_cl = model.to(memory_format=torch.channels_last)
    out_cl = model_cl(x.to(memory_format=torch.channels_last), t)
    torch.testing.assert_close(out_cl, out, rtol=1e-4, atol=1e-5)


def test_samples_do_not_interact_in_a_batch():
    torch.manual_seed(0)
    model = UNet(UNetConfig.demo()).eval()
    x, t = torch.randn(3, 18, 8, 8), torch.tensor([10, 500, 990])
    with torch.no_grad():
        batch = model(x, t)
        for i in range(3):
            # Convolution kernels pick their blocking by batch size: fp32 rounding differs at ~1e-6.
            torch.testing.assert_close(model(x[i:i + 1], t[i:i + 1]), batch[i:i + 1], rtol=1e-4, atol=1e-5)


def test_timestep_embedding():
    emb = timestep_embedding(torch.tensor([0, 10]), 8)
    assert emb.shape == (2, 8)
    torch.testing.assert_close(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))


@pytest.mark.parametrize("change,key", [
    (dict(norm_groups=7), "norm_groups"), (dict(head_channels=24), "head_channels"),
    (dict(attention_levels=(5,)), "attention_levels"), (dict(channel_mult=()), "base_channels")])
def test_bad_config_names_the_key(change, key):
    config = UNetConfig.demo()
    for name, value in change.items():
        setattr(config, name, value)
    with pytest.raises(ModelConfigError, match=key):
        UNet(config)


def test_condition_resizes_ctp_to_the_latent():
    cond = CTPCondition(frames=15, halvings=2)
    assert cond(torch.randn(2, 15, 192, 224)).shape == (2, 15, 48, 56)


def test_conditional_ldm_trains_and_samples():
    torch.manual_seed(0)
    unet = UNetConfig.demo()
    unet.in_channels, unet.out_channels = 3 + 15, 3
    model = ConditionalLDM(unet)
    schedule = NoiseSchedule()
    z0 = torch.randn(4, 3, 8, 8) * 0.5
    ctp = torch.randn(4, 15, 32, 32)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(1)
    t_fixed = torch.randint(0, 1000, (4,), generator=g)
    noise_fixed = torch.randn(z0.shape, generator=g)
    losses = []
    for _ in range(30):
        loss = diffusion_loss(lambda z, t: model(z, t, ctp), z0, schedule, t=t_fixed, noise=noise_fixed)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    with torch.no_grad():
        sample = DDIMSampler(schedule, steps=3).sample(model.denoiser(ctp), (3, 8, 8), seeds=[0, 1, 2, 3])
    assert sample.shape == (4, 3, 8, 8) and torch.isfinite(sample).all()
    with pytest.raises(ValueError, match="ctp"):
        model(z0, t_fixed, torch.randn(4, 15, 16, 16))
