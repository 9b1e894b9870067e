"""ConditionalLDM: the model folder round trip, generation options and refused input."""
import pytest
import torch

from ldmfast.models import (VQGAN, AutoencoderKL, AutoencoderKLConfig, ConditionalLDM, DiffusionConfig, UNetConfig,
                            VQGANConfig)

UNET = UNetConfig(in_channels=18, out_channels=3, base_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                  attention_levels=(1,), head_channels=16, norm_groups=8)


def tiny_vqgan():
    return VQGAN(VQGANConfig(base_channels=16, channel_mult=[1, 2, 2], num_res_blocks=1, norm_groups=8, num_codes=32))


@pytest.fixture
def model():
    torch.manual_seed(0)
    return ConditionalLDM(UNET, autoencoder=tiny_vqgan(), diffusion=DiffusionConfig(schedule="cosine")).eval()


def test_model_folder_round_trip_reproduces_samples(tmp_path, model):
    ctp = torch.randn(2, 15, 32, 32)
    before = model.generate(ctp, [4, 5], steps=3)
    model.save_pretrained(tmp_path / "m")
    loaded = ConditionalLDM.from_pretrained(tmp_path / "m").eval()
    assert loaded.diffusion.schedule == "cosine" and loaded.unet.config == model.unet.config
    torch.testing.assert_close(loaded.generate(ctp, [4, 5], steps=3), before, rtol=0, atol=0)


def test_saved_state_dict_replaces_the_live_weights(tmp_path, model):
    state = {k: torch.zeros_like(v) for k, v in model.denoiser_state_dict().items()}
    model.save_pretrained(tmp_path / "m", state_dict=state)
    loaded = ConditionalLDM.from_pretrained(tmp_path / "m")
    assert all(v.abs().sum() == 0 for v in loaded.denoiser_state_dict().values())
    # the autoencoder keeps its own weights in its own folder
    for a, b in zip(model.autoencoder.state_dict().values(), loaded.autoencoder.state_dict().values()):
        assert torch.equal(a, b)


def test_several_samples_per_input_keep_the_first_sample(model):
    ctp = torch.randn(2, 15, 32, 32)
    one = model.generate(ctp, [7, 8], steps=2)
    three = model.generate(ctp, [7, 8], steps=2, samples_per_input=3)
    assert three.shape == (6, 2, 32, 32)
    torch.testing.assert_close(three[0::3], one, rtol=0, atol=0)
    assert not torch.equal(three[0], three[1])


def test_bf16_channels_last_generation_is_close(model):
    ctp = torch.randn(2, 15, 32, 32)
    ref = model.generate(ctp, [1, 2], steps=2)
    fast = model.generate(ctp, [1, 2], steps=2, autocast=torch.bfloat16, channels_last=True)
    assert (fast - ref).norm() / ref.norm() < 5e-2  # bf16 UNet; a VQ decoder may flip a code


def test_a_kl_autoencoder_works_the_same_way(tmp_path):
    torch.manual_seed(1)
    kl = AutoencoderKL(AutoencoderKLConfig(base_channels=16, channel_mult=[1, 2, 2], num_res_blocks=1, norm_groups=8))
    model = ConditionalLDM(UNET, autoencoder=kl).eval()
    z0 = model.encode(torch.rand(2, 2, 32, 32) * 2 - 1)
    assert z0.shape == (2, 3, 8, 8)
    model.save_pretrained(tmp_path / "kl")
    images = ConditionalLDM.from_pretrained(tmp_path / "kl").generate(torch.randn(1, 15, 32, 32), [0], steps=2)
    assert images.shape == (1, 2, 32, 32)


def test_bad_input_is_refused_by_name(model, tmp_path):
    with pytest.raises(ValueError, match="seeds"):
        model.generate(torch.randn(2, 15, 32, 32), [1], steps=2)
    with pytest.raises(ValueError, match="ctp"):
        model.generate(torch.randn(2, 14, 32, 32), [1, 2], steps=2)
    with pytest.raises(ValueError, match="spacing"):
        model.generate(torch.randn(1, 15, 32, 32), [1], steps=2, spacing="leading")
    with pytest.raises(FileNotFoundError, match="config.json"):
        ConditionalLDM.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="unet"):
        ConditionalLDM(UNetConfig(in_channels=5, out_channels=3))
