"""VQGAN model: shapes, straight-through gradients, the quantizer against brute force, EMA and
dead-code restarts, discriminator and losses, save/load, and the reference vs fused backends."""
import json

import pytest
import torch

import ldmfast.ops as ops
from ldmfast.models import (VQGAN, ModelConfigError, PatchDiscriminator, PerceptualLoss, VectorQuantizer,
                            VQGANConfig, adaptive_gan_weight, hinge_d_loss, hinge_g_loss, nearest_codes, norm_act)
from numerics import FP32_TOL, rel_err


def tiny(**overrides) -> VQGANConfig:
    base = dict(base_channels=16, channel_mult=[1, 2], num_res_blocks=1, norm_groups=8, num_codes=64)
    return VQGANConfig(**{**base, **overrides})


# ---- shapes -------------------------------------------------------------------------------

def test_release_config_is_the_paper_one():
    c = VQGANConfig.release()
    assert (c.base_channels, c.channel_mult, c.num_res_blocks, c.attn_resolutions) == (128, [1, 2, 4], 2, [])
    assert (c.latent_channels, c.num_codes, c.downsampling) == (3, 8192, 4)
    assert c.latent_shape((192, 224)) == (3, 48, 56)
    model = VQGAN(c)
    # One head of 512 channels in the middle blocks, nowhere else.
    attn = [m for m in model.modules() if type(m).__name__ == "AttnBlock"]
    assert len(attn) == 2 and all(a.qkv.in_channels == 512 and a.num_heads == 1 for a in attn)


@torch.no_grad()
def test_release_config_shapes_on_a_small_slice():
    model = VQGAN(VQGANConfig.release()).eval()
    x = torch.randn(2, 2, 24, 32)
    z = model.encode(x)
    assert z.shape == (2, 3, 6, 8)
    q = model.quantize(z)
    assert q.z_q.shape == z.shape and q.indices.shape == (2, 6, 8)
    assert q.indices.max() < 8192
    assert model.decode(q.z_q).shape == x.shape


@pytest.mark.slow
@torch.no_grad()
def test_release_config_shapes_at_release_size():
    model = VQGAN(VQGANConfig.release()).eval()
    recon, q = model(torch.randn(1, 2, 192, 224))
    assert recon.shape == (1, 2, 192, 224) and q.z_q.shape == (1, 3, 48, 56)


@pytest.mark.parametrize("overrides, size, latent", [
    ({}, (16, 24), (8, 12)),
    (dict(channel_mult=[1, 2, 2], attn_resolutions=[2], attn_heads=2), (16, 20), (4, 5)),
    (dict(channel_mult=[1], mid_attention=False, latent_channels=4), (9, 7), (9, 7)),
    (dict(num_res_blocks=2, attn_resolutions=[1, 2], ema=True, dead_code_threshold=0.5), (8, 8), (4, 4)),
])
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_small_config_shapes_and_layout(overrides, size, latent, channels_last):
    torch.manual_seed(0)
    c = tiny(**overrides)
    model = VQGAN(c)
    x = torch.randn(3, 2, *size)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    recon, q = model(x)
    assert q.z_q.shape == (3, c.latent_channels, *latent)
    assert recon.shape == x.shape
    if channels_last:
        assert recon.is_contiguous(memory_format=torch.channels_last)
        assert q.z_q.is_contiguous(memory_format=torch.channels_last)
    (recon.square().mean() + q.loss).backward()


def test_encode_refuses_sizes_the_model_cannot_downsample():
    with pytest.raises(ValueError, match="divisible by 2"):
        VQGAN(tiny()).encode(torch.randn(1, 2, 15, 16))


@pytest.mark.parametrize("overrides, key", [
    (dict(norm_groups=12), "norm_groups"),
    (dict(attn_resolutions=[4]), "attn_resolutions"),
    (dict(attn_heads=3), "attn_heads"),
    (dict(channel_mult=[]), "channel_mult"),
    (dict(latent_channels=0), "latent_channels"),
    (dict(ema_decay=1.0), "ema_decay"),
])
def test_impossible_configs_name_the_key(overrides, key):
    with pytest.raises(ModelConfigError) as info:
        VQGAN(tiny(**overrides))
    assert info.value.key == key


def test_head_dim_over_the_kernel_limit_is_refused():
    with pytest.raises(ModelConfigError, match="head dim"):
        tiny(base_channels=64, channel_mult=[1, 16], norm_groups=32).validate()


def test_norm_act_is_state_dict_compatible_with_group_norm():
    fused = norm_act(64, groups=32)
    plain = torch.nn.GroupNorm(32, 64, eps=1e-6)
    assert set(fused.state_dict()) == {"weight", "bias"}
    plain.load_state_dict(fused.state_dict())
    x = torch.randn(2, 64, 5, 5)
    torch.testing.assert_close(fused(x), torch.nn.functional.silu(plain(x)))


# ---- straight-through estimator -------------------------------------------------------------

def test_gradients_reach_the_encoder_through_the_quantizer():
    torch.manual_seed(0)
    model = VQGAN(tiny())
    x = torch.randn(2, 2, 16, 16)
    recon, q = model(x)
    (recon - x).abs().mean().backward()  # reconstruction only: no quantizer loss term
    for name in ("encoder.conv_in.weight", "encoder.conv_out.weight", "quant_conv.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_straight_through_is_identity_in_the_backward():
    vq = VectorQuantizer(16, 3)
    z = torch.randn(2, 3, 4, 5, requires_grad=True)
    out = vq(z)
    torch.testing.assert_close(out.z_q, vq.codebook[out.indices].permute(0, 3, 1, 2))
    upstream = torch.randn_like(z)
    (out.z_q * upstream).sum().backward()
    torch.testing.assert_close(z.grad, upstream)


def test_losses_codebook_and_commitment():
    vq = VectorQuantizer(16, 3, beta=0.25)
    z = torch.randn(2, 3, 4, 4, requires_grad=True)
    out = vq(z)
    expected = torch.nn.functional.mse_loss(z, vq.codebook[out.indices].permute(0, 3, 1, 2))
    torch.testing.assert_close(out.commitment_loss, expected)
    torch.testing.assert_close(out.codebook_loss, expected)
    torch.testing.assert_close(out.loss, 1.25 * expected)
    out.loss.backward()
    assert vq.codebook.grad.abs().sum() > 0  # the codebook loss trains the codebook


# ---- nearest codes ----------------------------------------------------------------------------

@pytest.mark.parametrize("chunk_elements", [8192 * 7, 1 << 24], ids=["7-rows-a-chunk", "default"])
def test_nearest_codes_match_brute_force(chunk_elements):
    torch.manual_seed(0)
    codebook = torch.randn(8192, 3, dtype=torch.float64)
    z = torch.randn(1000, 3, dtype=torch.float64) * 1.5
    brute = torch.cdist(z, codebook).argmin(1)
    assert torch.equal(nearest_codes(z, codebook, chunk_elements), brute)


def test_nearest_codes_float32_pick_a_nearest_code():
    torch.manual_seed(1)
    codebook = torch.randn(8192, 3)
    z = torch.randn(4096, 3)
    picked = nearest_codes(z, codebook, chunk_elements=8192 * 100)
    d64 = torch.cdist(z.double(), codebook.double())
    chosen = d64.gather(1, picked[:, None]).squeeze(1)
    # float32 may break near-ties differently, never by more than rounding.
    assert (chosen - d64.min(1).values).max() < 1e-5
    assert (picked == d64.argmin(1)).float().mean() > 0.99


def test_quantizer_agrees_with_brute_force_on_a_latent_map():
    torch.manual_seed(2)
    vq = VectorQuantizer(512, 3).double()
    with torch.no_grad():
        vq.codebook.normal_()
    z = torch.randn(3, 3, 7, 9, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    out = vq(z)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 3)
    assert torch.equal(out.indices.flatten(), torch.cdist(flat, vq.codebook).argmin(1))


def test_usage_and_perplexity():
    vq = VectorQuantizer(8, 2)
    with torch.no_grad():
        vq.codebook.copy_(torch.tensor([[i, 0.0] for i in range(8)]))
    one_code = vq(torch.zeros(1, 2, 4, 4))
    assert one_code.perplexity.item() == pytest.approx(1.0) and one_code.usage.item() == pytest.approx(1 / 8)
    grid = torch.arange(8.0).view(1, 1, 2, 4)
    even = vq(torch.cat([grid, torch.zeros_like(grid)], 1))
    assert even.perplexity.item() == pytest.approx(8.0) and even.usage.item() == 1.0


# ---- EMA and dead codes -----------------------------------------------------------------------

def test_ema_codebook_moves_to_the_cluster_means():
    torch.manual_seed(0)
    vq = VectorQuantizer(2, 2, ema=True, ema_decay=0.5)
    with torch.no_grad():
        vq.codebook.copy_(torch.tensor([[-1.0, 0.0], [1.0, 0.0]]))
        vq.ema_code_sum.copy_(vq.codebook)
    assert not vq.codebook.requires_grad
    left = torch.tensor([-2.0, 0.5]).view(1, 2, 1, 1).expand(1, 2, 2, 2)
    right = torch.tensor([3.0, -0.5]).view(1, 2, 1, 1).expand(1, 2, 2, 2)
    z = torch.cat([left, right], dim=3)
    for _ in range(40):
        out = vq(z)
    assert out.codebook_loss.item() == 0.0
    torch.testing.assert_close(vq.codebook, torch.tensor([[-2.0, 0.5], [3.0, -0.5]]), atol=1e-3, rtol=0)
    vq.eval()
    before = vq.codebook.clone()
    vq(z * 5)
    assert torch.equal(vq.codebook, before)  # no updates outside training


@pytest.mark.parametrize("ema", [False, True])
def test_dead_codes_restart_at_batch_vectors(ema):
    torch.manual_seed(0)
    vq = VectorQuantizer(16, 3, dead_code_threshold=1.0, ema=ema)
    with torch.no_grad():
        vq.codebook.fill_(100.0)  # far from the data: all but one code unused
        vq.codebook[0] = 0.0
    z = torch.randn(2, 3, 4, 4)
    vq(z)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 3)
    for code in vq.codebook[1:]:
        assert (flat - code).abs().sum(1).min() < 1e-6  # every restarted code is a batch vector
    assert vq(z).usage.item() > 1 / 16


# ---- discriminator and losses -------------------------------------------------------------

def test_patch_discriminator_and_hinge_losses():
    disc = PatchDiscriminator(2, channels=8, num_layers=3)
    logits = disc(torch.randn(2, 2, 64, 64))
    assert logits.shape == (2, 1, 6, 6)
    assert hinge_d_loss(torch.full((4,), 2.0), torch.full((4,), -2.0)).item() == 0.0
    assert hinge_d_loss(torch.zeros(4), torch.zeros(4)).item() == 1.0
    assert hinge_g_loss(torch.full((4,), 3.0)).item() == -3.0


def test_adaptive_weight_balances_gradient_norms():
    w = torch.randn(4, 4, requires_grad=True)
    rec = (w * 2.0).sum()
    gan = (w * 0.5).sum()
    weight = adaptive_gan_weight(rec, gan, w)
    assert weight.item() == pytest.approx(4.0, rel=1e-3)
    (rec + weight * gan).backward()  # the graphs survive for the total loss


def test_perceptual_loss_from_a_user_weights_file(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        PerceptualLoss(tmp_path / "missing.safetensors")
    # Random VGG16 weights under torchvision's names stand in for the real file.
    shapes = {}
    width = 3
    index = 0
    for v in [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]:
        if v == "M":
            index += 1
            continue
        shapes[f"features.{index}.weight"] = (v, width, 3, 3)
        shapes[f"features.{index}.bias"] = (v,)
        width, index = v, index + 2
    path = tmp_path / "vgg16.safetensors"
    save_file({k: torch.randn(s) * 0.05 for k, s in shapes.items()}, str(path))
    loss = PerceptualLoss(path)
    x = torch.rand(2, 2, 32, 32) * 2 - 1
    y = (x + 0.3 * torch.randn_like(x)).requires_grad_()
    assert loss(x, x).item() == pytest.approx(0.0, abs=1e-6)
    d = loss(x, y)
    d.backward()
    assert d.item() > 0 and y.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in loss.parameters())


# ---- save / load ----------------------------------------------------------------------------

def test_save_and_load_pretrained_round_trip(tmp_path):
    torch.manual_seed(0)
    model = VQGAN(tiny(dead_code_threshold=1.0)).to(memory_format=torch.channels_last).eval()
    model.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    loaded = VQGAN.from_pretrained(tmp_path / "m").eval()
    assert loaded.config == model.config
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    loaded = loaded.to(memory_format=torch.channels_last)  # the same convolution algorithms
    x = torch.randn(1, 2, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(x)[0], loaded(x)[0])
        z = loaded.quantize(loaded.encode(x))
        assert torch.equal(loaded.decode_indices(z.indices), loaded.decode(z.z_q))


def test_from_pretrained_refuses_unknown_config_keys(tmp_path):
    VQGAN(tiny()).save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    data["base_width"] = 64
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ModelConfigError, match="base_width"):
        VQGAN.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        VQGAN.from_pretrained(tmp_path / "nothing")


# ---- backends -----------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_backend_switch_stays_within_the_numerics_contract(backend):
    """The whole model with fused attention against the float64 reference model: no worse than
    the fp32 torch reference itself and under the fp32 tolerance, output and encoder gradient."""
    torch.manual_seed(0)
    config = tiny(attn_resolutions=[2], attn_heads=2)
    model = VQGAN(config)
    model64 = VQGAN(config).double()
    model64.load_state_dict(model.state_dict())
    x = torch.randn(2, 2, 16, 16)

    def run(m, inp, name):
        with ops.use_backend(name):
            m.zero_grad()
            recon, q = m(inp)
            recon.square().mean().backward()
        return recon.detach(), m.encoder.conv_in.weight.grad.clone()

    out64, grad64 = run(model64, x.double(), "reference")
    out_ref, grad_ref = run(model, x, "reference")
    out, grad = run(model, x, backend)
    for what, fused, ref32, ref64 in (("output", out, out_ref, out64), ("encoder gradient", grad, grad_ref, grad64)):
        err, torch_err = rel_err(fused, ref64), rel_err(ref32, ref64)
        assert err < FP32_TOL and err <= 2 * torch_err + 1e-7, f"{what}: {err:.3g} vs torch fp32 {torch_err:.3g}"
