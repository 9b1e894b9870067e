"""The fused DDIM op on every backend against its float64 definition."""
import math

import pytest
import torch

import ldmfast.ops as ops
from ldmfast.ops.ddim import ddim_coefficients
from numerics import BACKEND_CASES, assert_matches, split_case

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def scheduler_chain(x_t, out, a_t, a_prev, eta, noise, parameterization, clip_x0):
    """The op chain schedulers run today (diffusers' DDIMScheduler.step), written independently of
    ldmfast's reference, computing in the tensors' own dtype. a_t, a_prev: (N,) tensors."""
    shape = (-1,) + (1,) * (x_t.dim() - 1)
    a_t = a_t.to(x_t.device, x_t.dtype).reshape(shape)
    a_prev = a_prev.to(x_t.device, x_t.dtype).reshape(shape)
    b_t = 1 - a_t
    if parameterization == "eps":
        x0 = (x_t - b_t ** 0.5 * out) / a_t ** 0.5
        eps = out
    elif parameterization == "v":
        x0 = a_t ** 0.5 * x_t - b_t ** 0.5 * out
        eps = a_t ** 0.5 * out + b_t ** 0.5 * x_t
    else:
        x0 = out
        eps = (x_t - a_t ** 0.5 * x0) / b_t ** 0.5
    if clip_x0 is not None:
        x0 = x0.clamp(-clip_x0, clip_x0)
    variance = (1 - a_prev) / b_t * (1 - a_t / a_prev)
    std = eta * variance ** 0.5
    prev = a_prev ** 0.5 * x0 + (1 - a_prev - std ** 2) ** 0.5 * eps
    if eta > 0:
        prev = prev + std * noise
    return prev


def random_abar(n, generator):
    """Per-sample abar_t < abar_prev inside (0, 1), as a DDIM step from t to an earlier t."""
    a_t = torch.rand(n, generator=generator, dtype=torch.float64) * 0.9 + 0.05
    a_prev = a_t + (1 - a_t) * torch.rand(n, generator=generator, dtype=torch.float64) * 0.9
    return a_t, a_prev


def make_inputs(shape, dtype, device, seed, layout="contiguous"):
    g = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(3)]
    if layout == "channels_last":
        tensors = [t.to(memory_format=torch.channels_last) for t in tensors]
    elif layout == "strided":  # every other element of the last axis: not dense
        tensors = [torch.randn(shape[:-1] + (2 * shape[-1],), generator=g, dtype=torch.float64)[..., ::2]
                   for _ in range(3)]
    elif layout == "transposed":  # (B, L, H, D) view of (B, H, L, D) storage
        tensors = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in tensors]
    a_t, a_prev = random_abar(shape[0], g)
    lowp = [t.to(device=device, dtype=dtype) for t in tensors]
    return lowp, a_t, a_prev


@pytest.mark.parametrize("case", BACKEND_CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("parameterization", ["eps", "v", "x0"])
@pytest.mark.parametrize("eta,clip_x0", [(0.0, None), (0.7, None), (1.0, 1.5)])
def test_matches_float64_reference(case, dtype, parameterization, eta, clip_x0, request):
    device, backend = split_case(case)
    seed = request.node.nodeid.__hash__() % 2**31 ^ torch.seed() % 2**31  # fresh inputs every run
    (x, out, noise), a_t, a_prev = make_inputs((3, 4, 13, 7), dtype, device, seed)
    ref_prev, ref_x0 = ops.ddim_step_reference(x.double(), out.double(), a_t, a_prev, eta, noise.double(),
                                               parameterization, clip_x0)
    with ops.use_backend(backend), ops.poison_outputs():
        prev, x0 = ops.ddim_step(x, out, a_t, a_prev, eta=eta, noise=noise, parameterization=parameterization,
                                 clip_x0=clip_x0, return_x0=True)
    assert prev.dtype == dtype and x0.dtype == dtype
    torch_prev = scheduler_chain(x, out, a_t, a_prev, eta, noise, parameterization, clip_x0)
    assert_matches(prev, ref_prev, dtype, "x_prev", torch_lowp=torch_prev)
    assert_matches(x0, ref_x0, dtype, "x0_hat")


@pytest.mark.parametrize("case", BACKEND_CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,layout", [
    ((1, 1), "contiguous"),                # batch 1, one element
    ((1, 3, 5, 7), "contiguous"),
    ((7, 3, 1, 1), "contiguous"),          # spatial 1x1
    ((2, 3, 48, 56), "channels_last"),
    ((5, 3, 11, 13), "strided"),
    ((2, 9, 3, 8), "transposed"),
    ((17, 8209), "contiguous"),            # a prime sample size spanning several kernel blocks
])
def test_shapes_and_layouts(case, dtype, shape, layout):
    device, backend = split_case(case)
    (x, out, noise), a_t, a_prev = make_inputs(shape, dtype, device, torch.seed() % 2**31, layout)
    ref, _ = ops.ddim_step_reference(x.double(), out.double(), a_t, a_prev, 0.3, noise.double(), "v", None)
    with ops.use_backend(backend), ops.poison_outputs():
        prev = ops.ddim_step(x, out, a_t, a_prev, eta=0.3, noise=noise, parameterization="v")
    assert prev.shape == x.shape
    if layout == "channels_last":
        assert prev.is_contiguous(memory_format=torch.channels_last), "the output keeps channels-last"
    assert_matches(prev, ref, dtype)


def test_reference_agrees_with_the_scheduler_chain():
    """The definition itself against an independent formulation, in float64."""
    (x, out, noise), a_t, a_prev = make_inputs((4, 2, 9, 5), torch.float64, "cpu", torch.seed() % 2**31)
    for parameterization in ("eps", "v", "x0"):
        for eta, clip in ((0.0, None), (0.5, 0.8)):
            ref, _ = ops.ddim_step_reference(x, out, a_t, a_prev, eta, noise, parameterization, clip)
            chain = scheduler_chain(x, out, a_t, a_prev, eta, noise, parameterization, clip)
            assert torch.allclose(ref, chain, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_one_step_with_perfect_noise_prediction_recovers_x0(backend):
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    x0 = torch.randn(4, 3, 8, 8, generator=g)
    eps = torch.randn(4, 3, 8, 8, generator=g)
    a_t = torch.tensor([0.01, 0.3, 0.7, 0.99], dtype=torch.float64)
    x_t = (a_t.sqrt().view(-1, 1, 1, 1) * x0 + (1 - a_t).sqrt().view(-1, 1, 1, 1) * eps).float()
    with ops.use_backend(backend):
        prev = ops.ddim_step(x_t, eps, a_t, 1.0)
    assert torch.allclose(prev, x0, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", BACKEND_CASES)
def test_per_sample_timesteps_equal_separate_calls(case):
    """abar differing per sample gives each sample the update it would get alone."""
    device, backend = split_case(case)
    (x, out, _), a_t, a_prev = make_inputs((4, 3, 6, 5), torch.float32, device, torch.seed() % 2**31)
    with ops.use_backend(backend):
        batched = ops.ddim_step(x, out, a_t, a_prev)
        for i in range(4):
            alone = ops.ddim_step(x[i:i + 1], out[i:i + 1], float(a_t[i]), float(a_prev[i]))
            torch.testing.assert_close(batched[i:i + 1], alone, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cpu_half_conversions_are_exact_on_every_bit_pattern(dtype):
    """With abar_t = abar_prev = 1 the step is the identity on finite values, so every finite
    16-bit pattern (subnormals included) must round-trip; halving then checks round-to-nearest-even
    against torch's conversion. (inf times a zero coefficient is NaN, so infinities are left out.)"""
    bits = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16)
    x = bits.view(dtype)
    x = x[torch.isfinite(x)].reshape(2, -1)
    with ops.use_backend("cpu"):
        same = ops.ddim_step(x, x, 1.0, 1.0)
        halved = ops.ddim_step(x, x, 1.0, 0.25, parameterization="x0")  # x_prev = 0.5 * x0
    nonzero = x != 0
    assert torch.equal(same[nonzero].view(torch.int16), x[nonzero].view(torch.int16))
    assert (same[~nonzero] == 0).all()
    expected = (x.float() * 0.5).to(dtype)
    nonzero = expected != 0  # adding the zero eps term turns -0 into +0
    assert torch.equal(halved[nonzero].view(torch.int16), expected[nonzero].view(torch.int16))
    assert (halved[~nonzero] == 0).all()


def test_eta_zero_ignores_noise_and_eta_draws_from_the_generator():
    (x, out, noise), a_t, a_prev = make_inputs((2, 3, 4, 4), torch.float32, "cpu", 0)
    assert torch.equal(ops.ddim_step(x, out, a_t, a_prev, noise=noise), ops.ddim_step(x, out, a_t, a_prev))
    first = ops.ddim_step(x, out, a_t, a_prev, eta=1.0, generator=torch.Generator().manual_seed(3))
    again = ops.ddim_step(x, out, a_t, a_prev, eta=1.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(first, again)
    assert not torch.equal(first, ops.ddim_step(x, out, a_t, a_prev))


def test_coefficients_reproduce_the_reference_in_float64():
    """The per-sample coefficient table that the kernels read, applied in float64."""
    (x, out, noise), a_t, a_prev = make_inputs((3, 5), torch.float64, "cpu", torch.seed() % 2**31)
    for parameterization in ("eps", "v", "x0"):
        c = ddim_coefficients(a_t, a_prev, 0.6, parameterization)
        x0 = c[:, 0:1] * x + c[:, 1:2] * out
        prev = c[:, 4:5] * x0 + c[:, 5:6] * (c[:, 2:3] * x + c[:, 3:4] * out) + c[:, 6:7] * noise
        ref, _ = ops.ddim_step_reference(x, out, a_t, a_prev, 0.6, noise, parameterization)
        assert torch.allclose(prev, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", BACKEND_CASES)
@pytest.mark.parametrize("clip_x0", [None, 0.5])
def test_gradients_match_the_reference(case, clip_x0):
    device, backend = split_case(case)
    (x, out, noise), a_t, a_prev = make_inputs((2, 3, 5, 4), torch.float64, device, torch.seed() % 2**31)
    grads = []
    for b in ("reference", backend):
        leaves = [t.float().clone().requires_grad_() for t in (x, out, noise)]
        with ops.use_backend(b):
            prev, x0 = ops.ddim_step(*leaves[:2], a_t, a_prev, eta=0.8, noise=leaves[2], parameterization="eps",
                                     clip_x0=clip_x0, return_x0=True)
        ((prev * torch.cos(x0.detach())).sum() + (x0 ** 2).sum()).backward()
        grads.append([t.grad for t in leaves])
    # The reference's own autograd through plain torch ops is the independent check of the formula.
    leaves = [t.clone().requires_grad_() for t in (x, out, noise)]
    prev, x0 = ops.ddim_step_reference(*leaves[:2], a_t, a_prev, 0.8, leaves[2], "eps", clip_x0)
    ((prev * torch.cos(x0.detach())).sum() + (x0 ** 2).sum()).backward()
    for name, g_ref, g_op, g_ours in zip(("x_t", "model_output", "noise"), [t.grad for t in leaves], *grads):
        assert_matches(g_op, g_ref, torch.float32, f"d{name} (op, reference backend)")
        assert_matches(g_ours, g_ref, torch.float32, f"d{name} ({backend})")


@pytest.mark.parametrize("case", BACKEND_CASES)
def test_opcheck(case):
    device, backend = split_case(case)
    (x, out, noise), a_t, a_prev = make_inputs((2, 3, 4, 5), torch.float32, device, 0)
    for requires_grad in (False, True):
        args = (x.clone().requires_grad_(requires_grad), out, a_t, a_prev, 0.5, noise, "v", 2.0, True, backend)
        torch.library.opcheck(torch.ops.ldmfast.ddim_step.default, args)


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compiles_with_fullgraph(compiler):
    torch._dynamo.reset()

    @torch.compile(fullgraph=True, backend=compiler)
    def sample_two_steps(x, out, a_t, a_mid):
        x = ops.ddim_step(x, out, a_t, a_mid, parameterization="v")
        return ops.ddim_step(x, out, a_mid, 1.0, parameterization="v", clip_x0=1.0)

    (x, out, _), a_t, a_mid = make_inputs((2, 3, 8, 8), torch.float32, "cpu", 1)
    with ops.use_backend("cpu"):
        compiled = sample_two_steps(x, out, a_t, a_mid)
        eager = ops.ddim_step(ops.ddim_step(x, out, a_t, a_mid, parameterization="v"), out, a_mid, 1.0,
                              parameterization="v", clip_x0=1.0)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)


@pytest.mark.parametrize("kwargs,argument", [
    (dict(model_output=torch.zeros(2, 3, 5)), "model_output"),
    (dict(model_output=torch.zeros(2, 3, 4, dtype=torch.float64)), "model_output"),
    (dict(noise=torch.zeros(2, 3, 5), eta=0.5), "noise"),
    (dict(parameterization="score"), "parameterization"),
    (dict(abar_t=0.0), "abar_t"),
    (dict(abar_t=1.5), "abar_t"),
    (dict(abar_prev=torch.tensor([0.5, float("nan")])), "abar_prev"),
    (dict(abar_prev=torch.tensor([0.5, 0.6, 0.7])), "abar_prev"),
    (dict(abar_t=torch.tensor([1, 1])), "abar_t"),
    (dict(eta=-1.0), "eta"),
    (dict(eta=math.inf), "eta"),
    (dict(clip_x0=0.0), "clip_x0"),
    (dict(eta=True), "eta"),             # a bool is no number (True would pass as 1)
    (dict(clip_x0=True), "clip_x0"),
    (dict(abar_t=True), "abar_t"),
    (dict(x_t=torch.zeros(2, 3, 4, dtype=torch.int64)), "x_t"),
    (dict(x_t=torch.tensor(1.0), model_output=torch.tensor(1.0)), "x_t"),
])
def test_bad_input_names_the_argument(kwargs, argument):
    args = dict(x_t=torch.zeros(2, 3, 4), model_output=torch.zeros(2, 3, 4), abar_t=0.5, abar_prev=0.9)
    args.update(kwargs)
    with pytest.raises(ValueError, match=argument):
        ops.ddim_step(**args)


@pytest.mark.cuda
def test_cuda_rejects_mixed_devices():
    with pytest.raises(ValueError, match="model_output"):
        ops.ddim_step(torch.zeros(2, 3, device="cuda"), torch.zeros(2, 3), 0.5, 0.9)
