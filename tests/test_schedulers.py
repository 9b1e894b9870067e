"""ldmfast.schedulers: the fused DDIM step against MONAI's and diffusers' own DDIMScheduler.step."""
import pytest
import torch

import ldmfast.schedulers as fused
from numerics import FP32_TOL, rel_err

PREDICTIONS = ["epsilon", "sample", "v_prediction"]


def _make(family, prediction, clip, **extra):
    """The paper's schedule: 1000 steps, betas linear from 0.0015 to 0.0195."""
    if family == "diffusers":
        sched = pytest.importorskip("diffusers").DDIMScheduler(
            num_train_timesteps=1000, beta_schedule="linear", beta_start=0.0015, beta_end=0.0195,
            clip_sample=clip, prediction_type=prediction, set_alpha_to_one=False, **extra)
    else:
        ddim = pytest.importorskip("monai.networks.schedulers")
        sched = ddim.DDIMScheduler(num_train_timesteps=1000, schedule="linear_beta", beta_start=0.0015,
                                   beta_end=0.0195, clip_sample=clip, prediction_type=prediction, **extra)
    sched.set_timesteps(10)
    return sched


def _reference_step(family, sched, out, t, x, eta, noise, monkeypatch):
    """The scheduler's own step in float64, with `noise` as its draw for eta > 0."""
    if family == "diffusers":
        return sched.step(out, t, x, eta=eta, variance_noise=noise if eta > 0 else None, return_dict=False)
    with monkeypatch.context() as m:  # MONAI draws with torch.randn and takes no noise argument
        m.setattr(torch, "randn", lambda *a, **k: noise)
        return sched.step(out, t, x, eta=eta)


@pytest.mark.parametrize("family", ["diffusers", "monai"])
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("eta", [0.0, 0.6])
def test_step_matches_the_scheduler_in_float64(family, prediction, clip, eta, monkeypatch):
    sched = _make(family, prediction, clip)
    seed = torch.seed() % 2**31
    x = torch.randn(3, 2, 5, 7)
    out = torch.randn(3, 2, 5, 7) * 1.5
    for t in (sched.timesteps[0], int(sched.timesteps[4]), sched.timesteps[-1]):  # the last has no previous step
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
        want_prev, want_x0 = _reference_step(family, sched, out.double(), t, x.double(), eta, noise.double(),
                                             monkeypatch)
        prev, x0 = fused.ddim_step(sched, out, t, x, eta=eta, generator=torch.Generator().manual_seed(seed))
        assert rel_err(prev, want_prev) < FP32_TOL, (t, rel_err(prev, want_prev))
        assert rel_err(x0, want_x0) < FP32_TOL, (t, rel_err(x0, want_x0))


@pytest.mark.parametrize("family", ["diffusers", "monai"])
def test_accelerated_sampling_loop_and_restore(family):
    sched = _make(family, "epsilon", True)
    torch.manual_seed(torch.seed() % 2**31)
    weight = torch.randn(4, 4) / 2

    def model(x, t):  # a stand-in denoiser: smooth in x and t
        return torch.tanh(torch.einsum("ij,bjhw->bihw", weight.to(x.dtype), x) * (1 + t / 1000))

    def sample(x):
        for t in sched.timesteps:
            step = sched.step(model(x, t), t, x)
            x = step[0] if isinstance(step, tuple) else step.prev_sample
        return x

    x_T = torch.randn(2, 4, 6, 6)
    want = sample(x_T.double())
    report = fused.accelerate(sched)
    assert "step" in sched.__dict__ and report.counts() == {"ddim_step": 1}
    assert rel_err(sample(x_T), want) < FP32_TOL
    with pytest.raises(ValueError, match="already accelerated"):
        fused.accelerate(sched)
    fused.restore(sched)
    assert "step" not in sched.__dict__


@pytest.mark.parametrize("family", ["diffusers", "monai"])
def test_accelerated_scheduler_pickles_keeps_its_signature_and_is_freed(family):
    """scheduler.step pickles (a bound method pickled as getattr(scheduler, "_diffusers_step"), which
    failed to load), keeps the signature diffusers' pipelines inspect (eta, generator), and the
    report kept per scheduler does not keep it alive."""
    import gc
    import inspect
    import pickle
    import weakref
    sched = _make(family, "epsilon", False)
    fused.accelerate(sched)
    assert {"eta", "generator"} <= set(inspect.signature(sched.step).parameters)
    x, out = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    want = sched.step(out, sched.timesteps[1], x)
    twin = pickle.loads(pickle.dumps(sched))
    assert "step" in twin.__dict__
    got = twin.step(out, sched.timesteps[1], x)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    ref = weakref.ref(sched)
    del sched
    gc.collect()
    assert ref() is None


def test_diffusers_step_keeps_its_return_types():
    diffusers = pytest.importorskip("diffusers")
    sched = _make("diffusers", "epsilon", False)
    fused.accelerate(sched)
    x, out = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    result = sched.step(out, sched.timesteps[1], x)
    assert isinstance(result, diffusers.schedulers.scheduling_ddim.DDIMSchedulerOutput)
    prev, x0 = sched.step(out, sched.timesteps[1], x, return_dict=False)
    torch.testing.assert_close(prev, result.prev_sample, rtol=0, atol=0)


@pytest.mark.parametrize("family, extra", [
    ("diffusers", dict(thresholding=True)),
    ("monai", dict(clip_sample_min=-1.0, clip_sample_max=2.0)),
], ids=["diffusers-thresholding", "monai-asymmetric-clip"])
def test_settings_the_op_cannot_take_run_the_schedulers_own_step(family, extra):
    sched = _make(family, "epsilon", True, **extra)
    x, out = torch.randn(2, 3, 4, 4) * 3, torch.randn(2, 3, 4, 4)
    t = sched.timesteps[2]
    want = sched.step(out, t, x)
    report = fused.accelerate(sched)
    assert report.left_alone and "fall back" in report.left_alone[0].reason
    got = sched.step(out, t, x)
    for g, w in zip(got if isinstance(got, tuple) else (got.prev_sample, got.pred_original_sample),
                    want if isinstance(want, tuple) else (want.prev_sample, want.pred_original_sample)):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_not_a_ddim_scheduler_is_refused():
    with pytest.raises(ValueError, match="scheduler: must be a MONAI or diffusers DDIMScheduler"):
        fused.ddim_step(object(), torch.zeros(1), 0, torch.zeros(1))
