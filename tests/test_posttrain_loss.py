"""The lesion-aware post-training loss against an independent float64 computation of PAPER.md's
formulas, its edge cases (no lesion, no brain), gradient checkpointing, and the frozen decoder."""
import dataclasses

import pytest
import torch

from ldmfast.diffusion import NoiseSchedule
from ldmfast.models import VQGAN, AutoencoderKL, AutoencoderKLConfig, ConditionalLDM, UNetConfig, VQGANConfig, to_latent
from ldmfast.train import ConfigError, PostTrainLossConfig, posttrain_loss
from ldmfast.train.config import from_dict
from ldmfast.train.posttrain_loss import timestep_weights
from numerics import FP32_TOL, assert_matches, rel_err

SIZE = (32, 48)  # image; latent 8 x 12 (the demo UNet halves it twice)


def make_autoencoder(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    if kind == "kl":
        return AutoencoderKL(AutoencoderKLConfig.demo()).eval()
    model = VQGAN(VQGANConfig.demo()).eval()
    with torch.no_grad():
        model.quantizer.codebook.normal_()  # codes spread over the latents' range
    return model


def make_ldm(seed: int = 1) -> ConditionalLDM:
    torch.manual_seed(seed)
    return ConditionalLDM(UNetConfig(**{**dataclasses.asdict(UNetConfig.demo()), "in_channels": 18}))


def make_batch(n: int, seed: int, lesion: bool = True):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(n, 2, *SIZE, generator=g) * 2 - 1
    ctp = torch.rand(n, 15, *SIZE, generator=g) * 2 - 1
    brain = (torch.rand(n, 1, *SIZE, generator=g) < 0.7).float()
    lesions = (torch.rand(n, 1, *SIZE, generator=g) < 0.1).float() * brain * float(lesion)
    t = torch.randint(0, 1000, (n,), generator=g)
    return image, ctp, brain, lesions, t, g


# ---- the independent computation -------------------------------------------------------------

def reference_abar(t: torch.Tensor) -> torch.Tensor:
    """PAPER.md's schedule: 1000 steps, beta linear in sqrt from 0.0015 to 0.0195, float64."""
    betas = torch.linspace(0.0015 ** 0.5, 0.0195 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)[t]


def reference_decode(autoencoder, z: torch.Tensor) -> torch.Tensor:
    """D(z): nearest code by float64 distance to every code for a VQGAN, then the decoder."""
    if isinstance(autoencoder, VQGAN):
        codebook = autoencoder.quantizer.codebook.detach()
        n, d, h, w = z.shape
        flat = z.double().permute(0, 2, 3, 1).reshape(-1, d)
        z = codebook[torch.cdist(flat, codebook.double()).argmin(1)].view(n, h, w, d).permute(0, 3, 1, 2)
    with torch.no_grad():
        return autoencoder.decode(z.float()).double()


def reference_loss(denoise, autoencoder, z0, image, brain, lesion, t, noise, config, parameterization):
    """PAPER.md stage 3, step by step, in float64 (the networks run in float32)."""
    a = reference_abar(t).view(-1, 1, 1, 1)
    z0, noise = z0.double(), noise.double()
    x_t = a.sqrt() * z0 + (1 - a).sqrt() * noise
    with torch.no_grad():
        out = denoise(x_t.float(), t).double()
    if parameterization == "eps":
        target, x0_hat = noise, (x_t - (1 - a).sqrt() * out) / a.sqrt()
    elif parameterization == "v":
        target, x0_hat = a.sqrt() * noise - (1 - a).sqrt() * z0, a.sqrt() * x_t - (1 - a).sqrt() * out
    else:
        target, x0_hat = z0, out
    latent = ((out - target) ** 2).mean()
    y = reference_decode(autoencoder, z0) if config.image_target == "decoded" else image.double()
    diff = reference_decode(autoencoder, x0_hat) - y
    e = (diff ** 2 if config.image_loss == "l2" else diff.abs()).sum(1, keepdim=True)
    snr = a / (1 - a)
    w = {"none": torch.ones_like(a), "abar": a,
         "min_snr": torch.minimum(snr, torch.full_like(a, config.min_snr_gamma)) / config.min_snr_gamma
         }[config.timestep_weighting]
    image_term = (w * e).sum() / brain.double().sum()
    n_lesion = lesion.double().sum()
    lesion_term = (w * e * lesion.double()).sum() / n_lesion if n_lesion > 0 else torch.zeros((), dtype=torch.float64)
    total = latent + config.lambda_img * image_term + config.lambda_les * lesion_term
    return total, latent, image_term, lesion_term


# ---- the loss against it ---------------------------------------------------------------------

CASES = [
    ("vqgan", PostTrainLossConfig(), "eps"),
    ("vqgan", PostTrainLossConfig(image_loss="l1", image_target="ground_truth", timestep_weighting="abar",
                                  lambda_img=0.3, lambda_les=0.7), "v"),
    ("vqgan", PostTrainLossConfig(timestep_weighting="min_snr", min_snr_gamma=2.0, decoder_checkpoint=3), "x0"),
    ("kl", PostTrainLossConfig(), "eps"),
    ("kl", PostTrainLossConfig(image_loss="l1", timestep_weighting="min_snr"), "v"),
]


@pytest.mark.parametrize("kind,config,parameterization", CASES)
def test_loss_equals_an_independent_computation_of_the_formulas(kind, config, parameterization):
    seed = int(torch.randint(0, 2**31 - 1, ()).item())  # fresh inputs each run
    ae, ldm, schedule = make_autoencoder(kind, seed), make_ldm(seed + 1), NoiseSchedule()
    image, ctp, brain, lesion, t, g = make_batch(3, seed)
    with torch.no_grad():
        z0 = to_latent(ae, image)
    noise = torch.randn(z0.shape, generator=g)
    denoise = ldm.denoiser(ctp)
    out = posttrain_loss(denoise, ae, schedule, z0, image, brain, lesion, config=config,
                         parameterization=parameterization, t=t, noise=noise)
    ref = reference_loss(denoise, ae, z0, image, brain, lesion, t, noise, config, parameterization)
    for name, value, expected in zip(("total", "latent", "image", "lesion"),
                                     (out.total, out.latent, out.image, out.lesion), ref):
        assert_matches(value, expected, torch.float32, f"{name} (seed {seed})")
    assert out.brain_pixels.item() == brain.sum().item() and out.lesion_pixels.item() == lesion.sum().item()
    assert out.total.requires_grad and not out.image.requires_grad
    assert out.lesion.item() > 0 and torch.equal(out.t, t)


@pytest.mark.parametrize("kind", ["vqgan", "kl"])
def test_a_batch_without_lesion_gives_the_latent_and_image_part(kind):
    ae, ldm, schedule = make_autoencoder(kind), make_ldm(), NoiseSchedule()
    image, ctp, brain, lesion, t, g = make_batch(2, seed=4, lesion=False)
    z0 = to_latent(ae, image).detach()
    noise = torch.randn(z0.shape, generator=g)
    config = PostTrainLossConfig()
    out = posttrain_loss(ldm.denoiser(ctp), ae, schedule, z0, image, brain, lesion, config=config, t=t, noise=noise)
    assert torch.isfinite(out.total) and out.lesion.item() == 0 and out.lesion_pixels.item() == 0
    torch.testing.assert_close(out.total.detach(), out.latent + config.lambda_img * out.image, rtol=1e-6, atol=0)
    ref = reference_loss(ldm.denoiser(ctp), ae, z0, image, brain, lesion, t, noise, config, "eps")
    assert_matches(out.total, ref[0], torch.float32, "total")
    out.total.backward()
    assert all(torch.isfinite(p.grad).all() for p in ldm.parameters() if p.grad is not None)


def test_a_batch_without_brain_is_skipped_with_a_warning():
    ae, ldm = make_autoencoder("vqgan"), make_ldm()
    image, ctp, brain, lesion, _, _ = make_batch(2, seed=5)
    with pytest.warns(RuntimeWarning, match="brain"):
        out = posttrain_loss(ldm.denoiser(ctp), ae, NoiseSchedule(), to_latent(ae, image).detach(), image,
                             torch.zeros_like(brain), lesion)
    assert out is None


def test_drawn_timesteps_and_noise_follow_the_generator():
    ae, ldm = make_autoencoder("kl"), make_ldm()
    image, ctp, brain, lesion, _, _ = make_batch(4, seed=6)
    z0 = to_latent(ae, image).detach()

    def run(seed):
        return posttrain_loss(ldm.denoiser(ctp), ae, NoiseSchedule(), z0, image, brain, lesion,
                              generator=torch.Generator().manual_seed(seed))

    first, again, other = run(1), run(1), run(2)
    assert torch.equal(first.t, again.t) and first.total.item() == again.total.item()
    assert first.t.min() >= 0 and first.t.max() < 1000 and first.t.dtype == torch.long
    assert first.total.item() != other.total.item()


# ---- gradients: checkpointing, frozen decoder ------------------------------------------------

def _grads(ldm, ae, batch, z0, noise, config):
    image, ctp, brain, lesion, t, _ = batch
    ldm.zero_grad(set_to_none=True)
    out = posttrain_loss(ldm.denoiser(ctp), ae, NoiseSchedule(), z0, image, brain, lesion, config=config,
                         t=t, noise=noise)
    out.total.backward()
    return out.total.detach(), {name: p.grad.clone() for name, p in ldm.named_parameters()}


@pytest.mark.parametrize("kind", ["vqgan", "kl"])
def test_checkpointing_gives_the_gradients_of_no_checkpointing(kind):
    ae, ldm = make_autoencoder(kind, seed=7), make_ldm(seed=8).train()
    batch = make_batch(2, seed=9)
    z0 = to_latent(ae, batch[0]).detach()
    noise = torch.randn(z0.shape, generator=batch[-1])
    base_total, base = _grads(ldm, ae, batch, z0, noise, PostTrainLossConfig(decoder_checkpoint=False))
    for decoder_checkpoint, unet_checkpoint in ((True, False), (2, True), (True, True)):
        ldm.unet.gradient_checkpointing = unet_checkpoint
        total, grads = _grads(ldm, ae, batch, z0, noise, PostTrainLossConfig(decoder_checkpoint=decoder_checkpoint))
        assert rel_err(total, base_total) < FP32_TOL
        for name, grad in grads.items():
            assert rel_err(grad, base[name]) < FP32_TOL, (name, decoder_checkpoint, unet_checkpoint)


def test_unet_checkpointing_recomputes_blocks_only_in_training():
    ldm = make_ldm()
    calls = []
    ldm.unet.up[0][0].register_forward_pre_hook(lambda *_: calls.append(1))
    ldm.unet.gradient_checkpointing = True
    x, ctp, t = torch.randn(2, 3, 8, 8), torch.randn(2, 15, 32, 32), torch.tensor([5, 900])
    ldm.train()(x, t, ctp).square().sum().backward()
    assert len(calls) == 2  # forward, then again in the backward
    calls.clear()
    ldm.eval()(x, t, ctp).square().sum().backward()
    assert len(calls) == 1


@pytest.mark.parametrize("kind", ["vqgan", "kl"])
def test_a_step_updates_the_denoiser_and_leaves_the_autoencoder_untouched(kind):
    """The autoencoder left in training mode with parameters requiring gradients, the worst case:
    still no .grad on it, and no parameter or buffer (e.g. the VQGAN's code usage) changes."""
    ae, ldm = make_autoencoder(kind).train(), make_ldm().train()
    ae_before = {k: v.clone() for k, v in ae.state_dict().items()}
    ldm_before = {k: v.clone() for k, v in ldm.state_dict().items()}
    opt = torch.optim.AdamW(ldm.parameters(), lr=1e-3)
    image, ctp, brain, lesion, _, g = make_batch(2, seed=10)
    with torch.no_grad():
        z0 = to_latent(ae, image)
    out = posttrain_loss(ldm.denoiser(ctp), ae, NoiseSchedule(), z0, image, brain, lesion, generator=g)
    out.total.backward()
    opt.step()
    assert all(p.grad is None for p in ae.parameters())
    assert all(torch.equal(v, ae_before[k]) for k, v in ae.state_dict().items())
    changed = [k for k, v in ldm.state_dict().items() if not torch.equal(v, ldm_before[k])]
    assert "condition.proj.weight" in changed and "unet.conv_out.weight" in changed


# ---- configuration and inputs ----------------------------------------------------------------

def test_timestep_weights_are_within_0_and_1_and_fade_with_noise():
    schedule, t = NoiseSchedule(), torch.arange(0, 1000, 37)
    assert torch.equal(timestep_weights(schedule, t, "none"), torch.ones(len(t)))
    for weighting in ("abar", "min_snr"):
        w = timestep_weights(schedule, t, weighting)
        assert (w > 0).all() and (w <= 1).all() and (w[1:] <= w[:-1]).all()
    with pytest.raises(ValueError, match="weighting"):
        timestep_weights(schedule, t, "snr2")


def test_config_from_a_toml_table():
    config = from_dict(PostTrainLossConfig, {"lambda_img": 1, "decoder_checkpoint": 4, "image_loss": "l1"},
                       prefix="posttrain")
    assert config.lambda_img == 1.0 and config.decoder_checkpoint == 4 and config.image_loss == "l1"
    assert from_dict(PostTrainLossConfig, {"decoder_checkpoint": False}).decoder_checkpoint is False


@pytest.mark.parametrize("key,value", [("lambda_img", -0.1), ("lambda_les", float("nan")), ("image_loss", "l3"),
                                       ("image_target", "raw"), ("timestep_weighting", "snr2"),
                                       ("min_snr_gamma", 0.0), ("decoder_checkpoint", -2)])
def test_bad_config_names_the_dotted_key(key, value):
    with pytest.raises(ConfigError, match=f"posttrain.{key}"):
        from_dict(PostTrainLossConfig, {key: value}, prefix="posttrain")


@pytest.mark.parametrize("argument", ["image", "brain_mask", "lesion", "t", "noise"])
def test_inputs_of_the_wrong_shape_are_named(argument):
    ae, ldm = make_autoencoder("kl"), make_ldm()
    image, ctp, brain, lesion, t, _ = make_batch(2, seed=11)
    z0 = to_latent(ae, image).detach()
    args = dict(image=image, brain_mask=brain, lesion=lesion, t=t, noise=torch.randn_like(z0))
    args[argument] = args[argument][:1]
    with pytest.raises(ValueError, match=argument):
        posttrain_loss(ldm.denoiser(ctp), ae, NoiseSchedule(), z0, args["image"], args["brain_mask"], args["lesion"],
                       t=args["t"], noise=args["noise"])
