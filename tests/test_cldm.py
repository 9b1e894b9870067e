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
    # H, W not multiples of 8 (factor 4 autoencoder, 2-level UNet): a 35 x 33 CTP came out 32 x 32.
    for size in ((35, 33), (34, 36)):
        with pytest.raises(ValueError, match="ctp: H and W must be multiples of 8"):
            model.generate(torch.randn(1, 15, *size), [1], steps=2)
    for bad in ({"steps": 2.0}, {"steps": True}, {"eta": "x"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            model.generate(torch.randn(1, 15, 32, 32), [1], **{"steps": 2, **bad})
    # An autoencoder of another factor or latent width than the model's settings.
    eight = VQGAN(VQGANConfig(base_channels=16, channel_mult=[1, 2, 2, 2], num_res_blocks=1, norm_groups=8,
                              num_codes=32))
    with pytest.raises(ValueError, match="halvings"):
        ConditionalLDM(UNET, autoencoder=eight)
    wide = VQGAN(VQGANConfig(base_channels=16, channel_mult=[1, 2, 2], num_res_blocks=1, norm_groups=8, num_codes=32,
                             latent_channels=4))
    with pytest.raises(ValueError, match="latent_channels"):
        ConditionalLDM(UNET, autoencoder=wide)
    with pytest.raises(ValueError, match="latent_scale"):
        DiffusionConfig(latent_scale=float("nan")).validate()


def test_loaded_models_are_in_eval_mode_and_generation_ignores_the_mode(tmp_path):
    # A loaded VQGAN in training mode rewrote its codebook on quantize (dead-code restarts); a
    # UNet with dropout made generate depend on more than the CTP and seed.
    torch.manual_seed(0)
    unet = UNetConfig(**{**UNET.__dict__, "dropout": 0.5})
    model = ConditionalLDM(unet, autoencoder=tiny_vqgan())
    model.save_pretrained(tmp_path / "m")
    loaded = ConditionalLDM.from_pretrained(tmp_path / "m")
    assert not any(m.training for m in loaded.modules())
    assert not VQGAN.from_pretrained(tmp_path / "m" / "autoencoder").training
    loaded.train()
    loaded.autoencoder.eval()  # as post-training holds it: each module's mode comes back
    ctp = torch.randn(1, 15, 32, 32)
    first, second = loaded.generate(ctp, [3], steps=2), loaded.generate(ctp, [3], steps=2)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    assert loaded.unet.training and not loaded.autoencoder.training


def test_config_files_name_their_faults(tmp_path, model):
    import json

    model.save_pretrained(tmp_path / "m")
    path = tmp_path / "m" / "config.json"
    data = json.loads(path.read_text())
    for change, key in (({"unet": {**data["unet"], "width": 3}}, "unet.width"),
                        ({"diffusion": {**data["diffusion"], "steps": 3}}, "diffusion.steps"),
                        ({"halvings": None}, "halvings")):
        broken = {k: v for k, v in {**data, **change}.items() if v is not None}
        path.write_text(json.dumps(broken))
        with pytest.raises(ValueError, match=rf"{key}: .*config.json"):
            ConditionalLDM.from_pretrained(tmp_path / "m")


def test_unet_config_checks_the_middle_block_and_types():
    from ldmfast.models.vqgan import ModelConfigError

    for change, key in (({"channel_mult": (2, 3), "attention_levels": (0,), "head_channels": 64, "base_channels": 32},
                         "head_channels"),
                        ({"base_channels": 8.0}, "base_channels"),
                        ({"channel_mult": (1.5, 2)}, "channel_mult"),
                        ({"attention_levels": 1}, "attention_levels")):
        with pytest.raises(ModelConfigError) as err:
            UNetConfig(**{**UNET.__dict__, **change}).validate()
        assert err.value.key == key
