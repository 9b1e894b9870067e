"""The fast sampling paths: the capturable DDIM step (abar on the device), and the DDIM sampler's
samples_per_input, bf16 autocast, channels-last and CUDA-graph options."""
import numpy as np
import pytest
import torch

import ldmfast.ops as ops
from ldmfast.diffusion import DDIMSampler, NoiseSchedule, expand_seeds, sample_seed
from ldmfast.models import ConditionalLDM, UNetConfig
from ldmfast.ops.ddim import ddim_coefficients, ddim_coefficients_on_device
from numerics import BACKEND_CASES, assert_matches, split_case
from test_ddim import make_inputs, random_abar, scheduler_chain


def fresh_seed() -> int:
    return torch.seed() % 2**31


# ---- the capturable DDIM step -----------------------------------------------------------------

@pytest.mark.parametrize("parameterization", ["eps", "v", "x0"])
def test_device_coefficients_equal_the_host_ones_in_float64(parameterization):
    g = torch.Generator().manual_seed(fresh_seed())
    a_t, a_prev = random_abar(64, g)
    # The edges the where()s guard: a clean x_t (abar_t = 1) and a last step (abar_prev = 1).
    a_t[:3], a_prev[2:5] = 1.0, 1.0
    eta = float(torch.rand(1, generator=g)) * 1.5
    host = ddim_coefficients(a_t, a_prev, eta, parameterization)
    device = ddim_coefficients_on_device(a_t.float(), a_prev.float(), eta, parameterization)
    assert device.dtype == torch.float64 and device.shape == (64, 8)
    # float32 abar: the table is computed in float64 from the same float32 values.
    expected = ddim_coefficients(a_t.float().double(), a_prev.float().double(), eta, parameterization)
    np.testing.assert_allclose(device.numpy(), expected.numpy(), rtol=1e-12, atol=1e-13)
    exact = ddim_coefficients_on_device(a_t, a_prev, eta, parameterization)
    np.testing.assert_allclose(exact.numpy(), host.numpy(), rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("case", BACKEND_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("parameterization", ["eps", "v", "x0"])
@pytest.mark.parametrize("eta,clip_x0", [(0.0, None), (0.8, 1.5)])
def test_capturable_step_matches_the_float64_reference(case, dtype, parameterization, eta, clip_x0):
    device, backend = split_case(case)
    (x, out, noise), a_t, a_prev = make_inputs((3, 4, 13, 7), dtype, device, fresh_seed())
    with ops.use_backend(backend), ops.poison_outputs():
        prev, x0 = ops.ddim_step_capturable(x, out, a_t.to(device), a_prev.float().to(device), eta=eta, noise=noise,
                                            parameterization=parameterization, clip_x0=clip_x0, return_x0=True)
    torch_prev = scheduler_chain(x, out, a_t, a_prev, eta, noise, parameterization, clip_x0)
    assert prev.dtype == dtype and prev.device == x.device
    # a_prev went in as float32 (the table is computed in float64 from those values): so does the reference.
    ref_prev, ref_x0 = ops.ddim_step_reference(x.double(), out.double(), a_t, a_prev.float().double(), eta,
                                               noise.double(), parameterization, clip_x0)
    assert_matches(prev, ref_prev, dtype, "x_prev", torch_lowp=torch_prev)
    assert_matches(x0, ref_x0, dtype, "x0_hat")


@pytest.mark.parametrize("case", BACKEND_CASES)
def test_capturable_step_broadcasts_one_abar_and_equals_ddim_step(case):
    device, backend = split_case(case)
    (x, out, _), _, _ = make_inputs((5, 3, 6, 8), torch.float32, device, fresh_seed())
    x = x.contiguous(memory_format=torch.channels_last)
    with ops.use_backend(backend):
        expected = ops.ddim_step(x, out, 0.31, 0.77, parameterization="v")
        got = ops.ddim_step_capturable(x, out, torch.tensor([0.31], dtype=torch.float64, device=device),
                                       torch.tensor(0.77, dtype=torch.float64, device=device), parameterization="v")
    assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_capturable_step_opcheck(backend):
    (x, out, noise), a_t, a_prev = make_inputs((2, 3, 4, 5), torch.float32, "cpu", 0)
    for requires_grad in (False, True):
        args = (x.clone().requires_grad_(requires_grad), out, a_t, a_prev, 0.5, noise, "eps", 2.0, True, backend,
                True)  # coefficients_on_device
        torch.library.opcheck(torch.ops.ldmfast.ddim_step.default, args)


@pytest.mark.parametrize("kwargs,argument", [
    (dict(abar_t=0.5), "abar_t"),
    (dict(abar_prev=torch.tensor([1, 1])), "abar_prev"),
    (dict(abar_t=torch.tensor([0.5, 0.6, 0.7])), "abar_t"),
    (dict(eta=-0.1), "eta"),
    (dict(parameterization="score"), "parameterization"),
])
def test_capturable_step_bad_input_names_the_argument(kwargs, argument):
    args = dict(x_t=torch.zeros(2, 3, 4), model_output=torch.zeros(2, 3, 4), abar_t=torch.tensor([0.5, 0.6]),
                abar_prev=torch.tensor([0.9, 0.9]))
    args.update(kwargs)
    with pytest.raises(ValueError, match=argument):
        ops.ddim_step_capturable(**args)


@pytest.mark.cuda
def test_capturable_step_rejects_abar_on_another_device():
    with pytest.raises(ValueError, match="abar_t.*device"):
        ops.ddim_step_capturable(torch.zeros(2, 3, device="cuda"), torch.zeros(2, 3, device="cuda"),
                                 torch.tensor([0.5, 0.6]), torch.tensor([0.9, 0.9], device="cuda"))


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton", "reference"])
def test_capturable_step_replays_in_a_cuda_graph(backend):
    """Captured once, replayed with new abar, x and noise copied into the static inputs."""
    (x, out, noise), _, _ = make_inputs((4, 3, 10, 12), torch.float32, "cuda", fresh_seed())
    a_t, a_prev = torch.full((4,), 0.5, device="cuda"), torch.full((4,), 0.9, device="cuda")
    with ops.use_backend(backend):
        ops.ddim_step_capturable(x, out, a_t, a_prev, eta=0.5, noise=noise)  # warm-up (Triton compiles)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_prev = ops.ddim_step_capturable(x, out, a_t, a_prev, eta=0.5, noise=noise)
        g = torch.Generator().manual_seed(fresh_seed())
        for _ in range(3):
            new_a_t, new_a_prev = random_abar(4, g)
            new = [torch.randn(4, 3, 10, 12, generator=g) for _ in range(3)]
            for static, value in zip((x, out, noise, a_t, a_prev), new + [new_a_t, new_a_prev]):
                static.copy_(value)
            graph.replay()
            expected, _ = ops.ddim_step_reference(*(v.double() for v in new[:2]), new_a_t, new_a_prev, 0.5,
                                                  new[2].double())
            assert_matches(static_prev.cpu(), expected, torch.float32, "replayed x_prev")


# ---- sampler: seeds and samples per input -----------------------------------------------------

def toy_denoiser(x, t):
    """Per-sample and deterministic, so that batching cannot change a slice's result."""
    return torch.tanh(x) * (t.float().view(-1, 1, 1, 1) / 1000)


def test_sample_seeds_keep_sample_zero_and_are_distinct():
    seeds = list(range(200))
    expanded = expand_seeds(seeds, 4)
    assert expanded[::4] == seeds, "sample 0 of each input keeps the input's seed"
    assert len(set(expanded)) == len(expanded)
    assert all(0 <= s < 2**63 for s in expanded)
    assert sample_seed(12345, 3) == sample_seed(12345, 3) != sample_seed(12346, 3)


@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_samples_per_input_are_reproducible_and_batch_independent(eta):
    shape, seeds = (2, 5, 4), [100, 101, 102, 103]
    sampler = DDIMSampler(NoiseSchedule(), steps=4, eta=eta, samples_per_input=3)
    batch = sampler.sample(toy_denoiser, shape, seeds)
    assert batch.shape == (12,) + shape
    assert torch.equal(batch, sampler.sample(toy_denoiser, shape, seeds))
    single = DDIMSampler(NoiseSchedule(), steps=4, eta=eta).sample(toy_denoiser, shape, seeds)
    grouped = batch.view(4, 3, *shape)
    assert torch.equal(grouped[:, 0], single), "sample 0 of an input is its single-sample result"
    for i, seed in enumerate(seeds):
        alone = sampler.sample(toy_denoiser, shape, [seed])
        assert torch.equal(alone, grouped[i]), f"input {i}'s samples depend on its batch"
        assert not torch.equal(grouped[i, 1], grouped[i, 2])


def conditioned_toy(x, t, condition):
    return torch.tanh(x + condition) * (t.float().view(-1, 1, 1, 1) / 1000)


def test_condition_is_repeated_per_sample_like_a_repeated_closure():
    cond = torch.randn(3, 2, 5, 4)
    sampler = DDIMSampler(NoiseSchedule(), steps=3, eta=0.5, samples_per_input=2)
    with_condition = sampler.sample(conditioned_toy, (2, 5, 4), [7, 8, 9], condition=cond)
    repeated = cond.repeat_interleave(2, 0)
    closure = sampler.sample(lambda x, t: conditioned_toy(x, t, repeated), (2, 5, 4), [7, 8, 9])
    assert torch.equal(with_condition, closure)


# ---- sampler: autocast and channels-last ------------------------------------------------------

class Recording:
    """Wraps a denoiser and records the dtype of its output and the memory format of its input."""

    def __init__(self, denoiser):
        self.denoiser, self.out_dtypes, self.channels_last = denoiser, set(), set()

    def __call__(self, x, t, *condition):
        out = self.denoiser(x, t, *condition)
        self.out_dtypes.add(out.dtype)
        self.channels_last.add(x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())
        return out


def demo_cldm(seed: int) -> ConditionalLDM:
    torch.manual_seed(seed)
    return ConditionalLDM(UNetConfig.demo()).eval()


def rel_err(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_bf16_autocast_on_cpu_is_close_to_fp32():
    """The demo cLDM, 3 trailing steps, bf16 autocast against a float64 denoiser. bf16 keeps 8 mantissa
    bits (rounding 2^-9); one UNet forward then errs ~1e-2 in its output, and DDIM's eps-to-x0 map
    carries that error into the sample scaled by sqrt(1 - abar) / sqrt(abar) against x_t; measured
    2-5e-3 over seeds on this model. The bound is the contract's low-precision 1e-2 on the whole
    sample, and fp32 must stay at the contract's 1e-5 (the test cannot pass if autocast is
    ignored: the denoiser's output dtype is checked)."""
    model = demo_cldm(fresh_seed())
    ctp = torch.randn(3, 15, 64, 80)
    seeds = [3, 4, 5]
    # The reference runs the denoiser in float64 (the state stays float32: a float64 state would
    # draw other starting noise from the same seeds).
    denoise64 = model.double().denoiser(ctp.double())
    ref = DDIMSampler(NoiseSchedule(), steps=3, spacing="trailing").sample(
        lambda x, t: denoise64(x.double(), t), (3, 16, 20), seeds)
    model.float()
    fp32 = DDIMSampler(NoiseSchedule(), steps=3, spacing="trailing").sample(model.denoiser(ctp), (3, 16, 20), seeds)
    recording = Recording(model.denoiser(ctp))
    bf16 = DDIMSampler(NoiseSchedule(), steps=3, spacing="trailing", autocast=torch.bfloat16).sample(
        recording, (3, 16, 20), seeds)
    assert recording.out_dtypes == {torch.bfloat16}
    assert bf16.dtype == torch.float32
    assert rel_err(fp32, ref) < 1e-5
    assert rel_err(bf16, ref) < 1e-2


def test_channels_last_gives_the_contiguous_result():
    model = demo_cldm(fresh_seed())
    ctp = torch.randn(2, 15, 64, 80)
    sampler = DDIMSampler(NoiseSchedule(), steps=2, eta=0.5)
    contiguous = sampler.sample(model.denoiser(ctp), (3, 16, 20), [11, 12])
    model.to(memory_format=torch.channels_last)
    recording = Recording(model.denoiser(ctp))
    cl = DDIMSampler(NoiseSchedule(), steps=2, eta=0.5, channels_last=True).sample(recording, (3, 16, 20), [11, 12])
    assert recording.channels_last == {True}
    assert cl.is_contiguous(), "samples are returned contiguous"
    assert rel_err(cl, contiguous) < 1e-5


def test_all_options_together_keep_slices_batch_independent():
    sampler = DDIMSampler(NoiseSchedule(), steps=3, eta=1.0, samples_per_input=2, autocast=torch.bfloat16,
                          channels_last=True)
    cond = torch.randn(5, 2, 6, 4)
    batch = sampler.sample(conditioned_toy, (2, 6, 4), [20, 21, 22, 23, 24], condition=cond)
    for i in (0, 3):
        alone = sampler.sample(conditioned_toy, (2, 6, 4), [20 + i], condition=cond[i:i + 1])
        assert torch.equal(alone, batch[2 * i:2 * i + 2])


@pytest.mark.parametrize("kwargs,argument", [
    (dict(samples_per_input=0), "samples_per_input"),
    (dict(samples_per_input=1.5), "samples_per_input"),
    (dict(autocast=torch.float32), "autocast"),
    (dict(eta=-1.0), "eta"),
    (dict(parameterization="score"), "parameterization"),
    (dict(clip_x0=0), "clip_x0"),
])
def test_bad_sampler_options_name_the_argument(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        DDIMSampler(NoiseSchedule(), steps=2, **kwargs)


@pytest.mark.parametrize("options,call,argument", [
    (dict(cuda_graph=True), dict(), "cuda_graph"),
    (dict(channels_last=True), dict(shape=(3, 8)), "channels_last"),
    (dict(), dict(seeds=[]), "seeds"),
    (dict(), dict(seeds=[1.5]), "seeds"),
    (dict(), dict(condition=torch.zeros(3, 1, 4, 4)), "condition"),
])
def test_bad_sample_calls_name_the_argument(options, call, argument):
    args = dict(denoiser=toy_denoiser, shape=(1, 4, 4), seeds=[1, 2], device="cpu")
    args.update(call)
    with pytest.raises(ValueError, match=argument):
        DDIMSampler(NoiseSchedule(), steps=2, **options).sample(**args)


# ---- sampler: CUDA graphs ---------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("eta,samples_per_input", [(0.0, 1), (0.8, 2)])
def test_cuda_graph_replay_equals_eager(eta, samples_per_input):
    model = demo_cldm(fresh_seed()).cuda()
    ctp = torch.randn(3, 15, 64, 80, device="cuda").repeat_interleave(samples_per_input, 0)
    options = dict(steps=4, eta=eta, samples_per_input=samples_per_input)
    eager = DDIMSampler(NoiseSchedule(), **options).sample(model.denoiser(ctp), (3, 16, 20), [1, 2, 3],
                                                           device="cuda")
    graphed = DDIMSampler(NoiseSchedule(), cuda_graph=True, **options).sample(
        model.denoiser(ctp), (3, 16, 20), [1, 2, 3], device="cuda")
    torch.testing.assert_close(graphed, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
def test_cuda_graph_is_reused_across_batches_with_a_condition():
    model = demo_cldm(fresh_seed()).cuda().to(memory_format=torch.channels_last)

    def denoise(z, t, cond):
        return model.unet(torch.cat([z, cond], 1), t)

    options = dict(steps=3, autocast=torch.bfloat16, channels_last=True)
    graphed = DDIMSampler(NoiseSchedule(), cuda_graph=True, **options)
    eager = DDIMSampler(NoiseSchedule(), **options)
    for batch in range(3):
        cond = model.condition(torch.randn(4, 15, 64, 80, device="cuda"))
        seeds = [10 * batch + i for i in range(4)]
        got = graphed.sample(denoise, (3, 16, 20), seeds, device="cuda", condition=cond)
        want = eager.sample(denoise, (3, 16, 20), seeds, device="cuda", condition=cond)
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
    assert len(graphed._graphs) == 1, "one static batch shape, one graph"


@pytest.mark.cuda
def test_cuda_graph_keeps_slices_batch_independent():
    sampler = DDIMSampler(NoiseSchedule(), steps=3, eta=0.7, samples_per_input=2, cuda_graph=True)
    batch = sampler.sample(toy_denoiser, (2, 6, 4), [5, 6, 7], device="cuda")
    alone = sampler.sample(toy_denoiser, (2, 6, 4), [6], device="cuda")
    assert torch.equal(alone, batch[2:4])
