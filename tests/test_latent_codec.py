"""The latent codec: to_latent / decode_latent / load_autoencoder for the VQGAN and the KL autoencoder,
straight-through quantization, and gradient checkpointing through the decoder."""
import json

import pytest
import torch

from ldmfast.models import (VQGAN, AutoencoderKL, AutoencoderKLConfig, UNet, UNetConfig, VQGANConfig, decode_latent,
                            load_autoencoder, to_latent)
from ldmfast.models.latent_codec import decoder_units
from numerics import assert_matches, rel_err

KINDS = ["vqgan", "kl"]


def make_autoencoder(kind: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    if kind == "vqgan":
        return VQGAN(VQGANConfig(**{**VQGANConfig.demo().to_dict(), **overrides}))
    return AutoencoderKL(AutoencoderKLConfig(**{**AutoencoderKLConfig.demo().to_dict(), **overrides}))


def brute_force_quantize(codebook: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Nearest code per latent position by float64 distances to every code."""
    flat = z.detach().double().permute(0, 2, 3, 1).reshape(-1, z.shape[1])
    nearest = torch.cdist(flat, codebook.detach().double()).argmin(1)
    n, d, h, w = z.shape
    return codebook.detach()[nearest].view(n, h, w, d).permute(0, 3, 1, 2).to(z.dtype)


def spread_codebook(model: VQGAN) -> None:
    """Codes spread over the latents' range, so that quantization is not to one code."""
    with torch.no_grad():
        model.quantizer.codebook.normal_()


def test_to_latent_is_the_vqgan_encoding_and_the_kl_posterior_mean():
    x = torch.rand(2, 2, 16, 24) * 2 - 1
    vq, kl = make_autoencoder("vqgan"), make_autoencoder("kl")
    torch.testing.assert_close(to_latent(vq, x), vq.encode(x), rtol=0, atol=0)
    posterior = kl.encode(x)
    torch.testing.assert_close(to_latent(kl, x), posterior.mean, rtol=0, atol=0)
    eps = torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(5))
    sampled = to_latent(kl, x, sample=True, generator=torch.Generator().manual_seed(5))
    assert_matches(sampled, (posterior.mean + torch.exp(0.5 * posterior.logvar) * eps).double(), torch.float32)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("overrides", [{}, dict(attn_resolutions=[2], mid_attention=False, num_res_blocks=2)])
def test_decoder_units_in_order_are_the_decoder(kind, overrides):
    model = make_autoencoder(kind, **overrides).eval()
    z = torch.randn(2, 3, 6, 5)
    h = z
    for unit in decoder_units(model):
        for m in unit:
            h = m(h)
    torch.testing.assert_close(h, model.decode(z), rtol=0, atol=0)


def test_vqgan_decode_quantizes_with_a_straight_through_gradient():
    model = make_autoencoder("vqgan").eval()
    spread_codebook(model)
    z = torch.randn(3, 3, 5, 7, requires_grad=True)
    out = decode_latent(model, z)
    z_q = brute_force_quantize(model.quantizer.codebook, z).requires_grad_()
    ref = model.decode(z_q)
    assert_matches(out, ref.detach().double(), torch.float32, "decoded")
    g = torch.randn_like(out)
    out.backward(g)
    # Straight-through: d out / d z is d decode / d z_q at the codes.
    (ref_grad,) = torch.autograd.grad(ref, z_q, g)
    assert_matches(z.grad, ref_grad.double(), torch.float32, "grad z")


def test_without_straight_through_the_continuous_latent_is_decoded():
    model = make_autoencoder("vqgan").eval()
    spread_codebook(model)
    z = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(decode_latent(model, z, straight_through=False), model.decode(z))
    assert rel_err(decode_latent(model, z), model.decode(z)) > 1e-3  # quantization does change it


@pytest.mark.parametrize("kind", KINDS)
def test_decoding_never_touches_the_autoencoder(kind):
    """Training mode, parameters requiring gradients: no .grad written, quantizer state unchanged
    (the VQGAN demo restarts unused codes when its quantizer runs in training mode)."""
    model = make_autoencoder(kind).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    z = torch.randn(2, 3, 4, 6, requires_grad=True)
    decode_latent(model, z, checkpoint=True).square().sum().backward()
    decode_latent(model, z).square().sum().backward()
    assert z.grad is not None and torch.isfinite(z.grad).all()
    assert all(p.grad is None for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("checkpoint", [False, True])
def test_frozen_and_trainable_autoencoders_decode_alike(kind, checkpoint):
    """A frozen autoencoder runs its modules as they are, a trainable one through detached copies of
    its parameters (functional_call): the same output and gradient, bit for bit, and no parameter
    gradient either way."""
    model = make_autoencoder(kind, seed=5).eval()
    z0, g = torch.randn(2, 3, 4, 5), torch.randn(2, 2, 16, 20)
    results = []
    for trainable in (True, False):
        model.requires_grad_(trainable)
        z = z0.clone().requires_grad_()
        out = decode_latent(model, z, checkpoint=checkpoint)
        out.backward(g)
        results.append((out.detach(), z.grad))
        assert all(p.grad is None for p in model.parameters())
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_trainable_parameters_get_no_graph_when_z_needs_none():
    """Grad mode on, z without gradient, parameters requiring it: the output records nothing."""
    model = make_autoencoder("kl").train()
    out = decode_latent(model, torch.randn(1, 3, 4, 4))
    assert out.grad_fn is None and not out.requires_grad


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("checkpoint", [True, 2, 5, 100])
def test_checkpointing_gives_the_same_output_and_gradient(kind, checkpoint):
    model = make_autoencoder(kind, seed=3, attn_resolutions=[4]).eval()
    if kind == "vqgan":
        spread_codebook(model)
    z0 = torch.randn(2, 3, 5, 6)
    g = torch.randn(2, 2, 20, 24)
    calls = []
    model.decoder.up[-1].blocks[0].register_forward_pre_hook(lambda *_: calls.append(1))
    results = []
    for ckpt in (False, checkpoint):
        calls.clear()
        z = z0.clone().requires_grad_()
        out = decode_latent(model, z, checkpoint=ckpt)
        out.backward(g)
        results.append((out.detach(), z.grad))
    assert len(calls) == 2  # a full-resolution block ran again in the backward: it was checkpointed
    assert_matches(results[1][0], results[0][0].double(), torch.float32, "output")
    assert_matches(results[1][1], results[0][1].double(), torch.float32, "grad z")


def test_no_graph_without_gradients():
    model = make_autoencoder("vqgan")
    z = torch.randn(1, 3, 4, 4, requires_grad=True)
    with torch.no_grad():
        out = decode_latent(model, z, checkpoint=True)
    assert out.grad_fn is None and not out.requires_grad


def test_bad_arguments_are_named():
    model = make_autoencoder("kl")
    with pytest.raises(ValueError, match="checkpoint"):
        decode_latent(model, torch.zeros(1, 3, 4, 4), checkpoint=-1)
    with pytest.raises(ValueError, match="checkpoint"):
        decode_latent(model, torch.zeros(1, 3, 4, 4), checkpoint=1.5)
    with pytest.raises(ValueError, match="z: expected"):
        decode_latent(model, torch.zeros(1, 4, 4, 4))
    with pytest.raises(ValueError, match="autoencoder"):
        decode_latent(UNet(UNetConfig.demo()), torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="autoencoder"):
        to_latent(torch.nn.Identity(), torch.zeros(1, 2, 4, 4))


@pytest.mark.parametrize("kind", KINDS)
def test_load_autoencoder_reads_either_kind_frozen(kind, tmp_path):
    model = make_autoencoder(kind).eval()
    model.save_pretrained(tmp_path / kind)
    loaded = load_autoencoder(tmp_path / kind)
    assert type(loaded) is type(model) and not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())
    z = torch.randn(1, 3, 4, 4)
    torch.testing.assert_close(decode_latent(loaded, z), decode_latent(model, z), rtol=0, atol=0)
    assert load_autoencoder(tmp_path / kind, frozen=False).training


def test_load_autoencoder_refuses_unknown_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_autoencoder(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model": "UNet"}))
    with pytest.raises(ValueError, match="UNet"):
        load_autoencoder(tmp_path)
