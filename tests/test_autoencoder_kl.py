"""The KL-regularized autoencoder: shapes, posterior, configuration errors, files, and that it fits."""
import json

import pytest
import torch

from ldmfast.models import VQGAN, AutoencoderKL, AutoencoderKLConfig, ModelConfigError, VQGANConfig
from ldmfast.models.autoencoder_kl import DiagonalGaussian
from numerics import assert_matches


def _model(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(AutoencoderKLConfig.demo())


def test_shapes_and_latent_size():
    model = _model()
    x = torch.rand(3, 2, 32, 24) * 2 - 1
    posterior = model.encode(x)
    assert posterior.mean.shape == posterior.logvar.shape == (3, 3, 8, 6)
    assert AutoencoderKLConfig.demo().latent_shape((32, 24)) == (3, 8, 6)
    assert AutoencoderKLConfig().latent_shape((192, 224)) == (3, 48, 56)  # PAPER.md's latent
    assert model.decode(posterior.mode()).shape == x.shape
    recon, post = model.eval()(x)
    torch.testing.assert_close(recon, model.decode(post.mean))


def test_decoder_is_the_vqgan_decoder_architecture():
    """Built from the same blocks: the decoder's state dict loads into a VQGAN's of the same sizes."""
    kl = _model()
    vq = VQGAN(VQGANConfig.demo())
    vq.decoder.load_state_dict(kl.decoder.state_dict())
    z = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(vq.decoder(z), kl.decoder(z))


def test_posterior_kl_and_sample_against_independent_formulas():
    moments = torch.randn(4, 6, 5, 7, dtype=torch.float64) * 2
    posterior = DiagonalGaussian(moments)
    mean, logvar = moments[:, :3], moments[:, 3:]
    q = torch.distributions.Normal(mean, torch.exp(0.5 * logvar))
    p = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    assert_matches(posterior.kl(), torch.distributions.kl_divergence(q, p).flatten(1).sum(1), torch.float64, "kl")
    g = torch.Generator().manual_seed(7)
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    assert_matches(posterior.sample(g), mean + torch.exp(0.5 * logvar) * eps, torch.float64, "sample")


def test_logvar_is_clamped_so_std_stays_finite():
    moments = torch.cat([torch.zeros(1, 3, 2, 2), torch.full((1, 3, 2, 2), 500.0)], dim=1)
    posterior = DiagonalGaussian(moments)
    assert torch.isfinite(posterior.std).all() and torch.isfinite(posterior.kl()).all()


def test_gradients_reach_the_encoder_through_a_sample():
    model = _model().train()
    x = torch.rand(2, 2, 16, 16) * 2 - 1
    recon, posterior = model(x)
    ((recon - x).square().mean() + model.config.kl_weight * posterior.kl().mean()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_fits_a_batch_in_a_few_steps():
    model = _model(1)
    g = torch.Generator().manual_seed(3)
    x = torch.rand(4, 2, 16, 16, generator=g) * 2 - 1
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(25):
        recon, posterior = model(x, generator=g)
        loss = (recon - x).abs().mean() + model.config.kl_weight * posterior.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.parametrize("change,key", [
    (dict(kl_weight=-1.0), "kl_weight"), (dict(norm_groups=7), "norm_groups"), (dict(channel_mult=[]), "channel_mult"),
    (dict(latent_channels=0), "latent_channels")])
def test_bad_config_names_the_key(change, key):
    with pytest.raises(ModelConfigError, match=key):
        AutoencoderKL(AutoencoderKLConfig(**{**AutoencoderKLConfig.demo().to_dict(), **change}))


def test_encode_and_decode_refuse_wrong_shapes():
    model = _model()
    with pytest.raises(ValueError, match="x: expected"):
        model.encode(torch.zeros(1, 2, 30, 32))
    with pytest.raises(ValueError, match="z: expected"):
        model.decode(torch.zeros(1, 4, 8, 8))


def test_save_and_load_round_trip(tmp_path):
    model = _model().eval()
    model.save_pretrained(tmp_path / "kl")
    assert json.loads((tmp_path / "kl" / "config.json").read_text())["model"] == "AutoencoderKL"
    loaded = AutoencoderKL.from_pretrained(tmp_path / "kl").eval()
    assert loaded.config == model.config
    x = torch.rand(1, 2, 16, 16)
    torch.testing.assert_close(loaded(x)[0], model(x)[0], rtol=0, atol=0)


def test_from_pretrained_refuses_other_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        AutoencoderKL.from_pretrained(tmp_path)
    VQGAN(VQGANConfig.demo()).save_pretrained(tmp_path / "vq")
    with pytest.raises(ValueError, match="VQGAN"):
        AutoencoderKL.from_pretrained(tmp_path / "vq")
    _model().save_pretrained(tmp_path / "kl")
    with pytest.raises(ValueError, match="config.json: the folder of a 'AutoencoderKL' model, expected a VQGAN"):
        VQGAN.from_pretrained(tmp_path / "kl")
    data = {"model": "AutoencoderKL", **AutoencoderKLConfig.demo().to_dict(), "codebook": 3}
    (tmp_path / "kl" / "config.json").write_text(json.dumps(data))
    with pytest.raises(ModelConfigError, match="codebook"):
        AutoencoderKL.from_pretrained(tmp_path / "kl")
