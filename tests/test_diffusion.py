"""Schedules, the DDPM loss and the DDIM sampler."""
import math

import pytest
import torch

from ldmfast.diffusion import DDIMSampler, NoiseSchedule, ddim_timesteps, diffusion_loss, make_betas


def test_linear_schedule_is_linear_in_sqrt_beta():
    betas = make_betas("linear", 1000, 0.0015, 0.0195)
    i = torch.arange(1000, dtype=torch.float64)
    expected = (math.sqrt(0.0015) + i / 999 * (math.sqrt(0.0195) - math.sqrt(0.0015))) ** 2
    assert torch.allclose(betas, expected, rtol=1e-12, atol=0)
    abar = NoiseSchedule("linear").alphas_cumprod
    assert torch.allclose(abar, torch.exp(torch.cumsum(torch.log1p(-expected), 0)), rtol=1e-10)
    assert 0 < abar[-1] < 0.01 < abar[0] < 1


def test_cosine_schedule_follows_its_closed_form():
    abar = NoiseSchedule("cosine", 100).alphas_cumprod
    t = torch.arange(1, 101, dtype=torch.float64) / 100
    f = lambda u: torch.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    expected = f(t) / f(torch.zeros(1, dtype=torch.float64))
    # betas are clipped at 0.999 only at the very end
    assert torch.allclose(abar[:-1], expected[:-1], rtol=1e-9)


@pytest.mark.parametrize("parameterization", ["eps", "v", "x0"])
def test_target_and_x0_prediction_are_inverse(parameterization):
    s = NoiseSchedule()
    x0, noise = torch.randn(2, 4, 3, 3, 5, dtype=torch.float64)
    t = torch.tensor([0, 123, 500, 999])
    x_t = s.add_noise(x0, noise, t)
    target = s.target(x0, noise, t, parameterization)
    assert torch.allclose(s.predict_x0(x_t, t, target, parameterization), x0, atol=1e-9)


def test_loss_is_zero_for_a_perfect_denoiser():
    s = NoiseSchedule()
    x0 = torch.randn(6, 3, 4, 4, dtype=torch.float64)
    noise = torch.randn_like(x0)
    t = torch.randint(0, 1000, (6,))
    assert diffusion_loss(lambda x, tt: noise, x0, s, "eps", t=t, noise=noise).item() == 0
    zero = diffusion_loss(lambda x, tt: torch.zeros_like(x), x0, s, "eps", t=t, noise=noise)
    assert torch.isclose(zero, (noise ** 2).mean().float())


@pytest.mark.parametrize("steps,spacing,expected", [
    (50, "uniform", list(range(980, -1, -20))), (2, "trailing", [999, 499]), (1, "trailing", [999])])
def test_timesteps(steps, spacing, expected):
    assert ddim_timesteps(1000, steps, spacing) == expected


@pytest.mark.parametrize("steps,spacing", [(0, "uniform"), (1001, "uniform"), (10, "leading")])
def test_bad_timesteps_name_the_argument(steps, spacing):
    with pytest.raises(ValueError, match="steps" if spacing != "leading" else "spacing"):
        ddim_timesteps(1000, steps, spacing)


@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_one_step_with_a_perfect_predictor_gives_x0(dtype, atol):
    """At t = 999 x0 = (x - sqrt(1 - abar) eps) / sqrt(abar) amplifies rounding by 1/sqrt(abar) ~ 15."""
    s = NoiseSchedule()
    x0 = torch.randn(3, 3, 6, 7, dtype=dtype)

    def perfect_eps(x, t):  # the noise that makes x a noisy version of x0 at t
        a = s.abar(t, x)
        return (x - a.sqrt() * x0) / (1 - a).sqrt()

    out = DDIMSampler(s, steps=1, spacing="trailing").sample(perfect_eps, (3, 6, 7), seeds=[0, 1, 2], dtype=dtype)
    assert torch.allclose(out, x0, atol=atol)


def toy_denoiser(x, t):
    """Per-sample and deterministic, so that batching cannot change a slice's result."""
    return torch.tanh(x) * (t.float().view(-1, 1, 1, 1) / 1000)


@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_same_seed_same_output_and_batch_independence(eta):
    sampler = DDIMSampler(NoiseSchedule(), steps=5, eta=eta)
    seeds = list(range(100, 108))
    batch = sampler.sample(toy_denoiser, (2, 5, 4), seeds)
    assert torch.equal(batch, sampler.sample(toy_denoiser, (2, 5, 4), seeds))
    for i, seed in enumerate(seeds):
        alone = sampler.sample(toy_denoiser, (2, 5, 4), [seed])
        assert torch.equal(alone[0], batch[i]), f"slice {i} depends on its batch"
    assert not torch.equal(batch[0], batch[1])
