"""AdamW with 8-bit moments (ldmfast/train/adamw8bit.py): its number format, its rounding, its update
against torch's AdamW, its state through checkpoints, and the Triton kernel against the plain-torch
definition (through Triton's interpreter here)."""
import copy

import pytest
import torch

from ldmfast.train import adamw8bit, adamw8bit_triton, optim
from ldmfast.train.adamw8bit import BLOCK, MIN_8BIT_NUMEL, AdamW8bit, dynamic_code, quantize, state_bytes
from ldmfast.train.step_in_backward import StepInBackward


def _hash32_python(x: int) -> int:
    """The hash in plain Python integers (what the int64 masking and the kernel's uint32 emulate)."""
    m = 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x7FEB352D) & m
    x ^= x >> 15
    x = (x * 0x5BD1E995) & m
    return x ^ (x >> 16)


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_code_is_256_sorted_values_from_its_range(signed):
    code = dynamic_code(signed)
    assert code.numel() == 256 and bool((code[1:] > code[:-1]).all())
    assert code[-1].item() == 1.0 and 0.0 in code.tolist()
    assert code[0].item() == (-1.0 if signed else 0.0)
    positive = code[code > 0]
    assert 1e-7 < positive.min().item() <= 1e-6  # six decades below the block's scale
    # steps near the top of the scale are fine: at most 1.5 % of the scale
    assert (positive[-1] - positive[-2]).item() < 0.015
    if signed:
        assert code[127].item() == 0.0  # the zero that a fresh state's m codes hold


def test_hash_matches_plain_integers():
    x = torch.tensor([0, 1, 2, 12345, 2**31 - 1, 2**31, 2**32 - 1], dtype=torch.int64)
    assert adamw8bit._hash32(x).tolist() == [_hash32_python(v) for v in x.tolist()]
    u = adamw8bit.uniforms(0, 100_000, adamw8bit.stream_key(3, 7, 1), "cpu")
    assert 0.0 <= u.min().item() and u.max().item() < 1.0
    assert abs(u.mean().item() - 0.5) < 0.01 and abs(u.var().item() - 1 / 12) < 0.005


@pytest.mark.parametrize("squared", [False, True])
def test_stochastic_rounding_brackets_and_is_unbiased(squared):
    g = torch.Generator().manual_seed(0)
    # magnitudes over six decades, so that every part of the table is used
    x = torch.exp(torch.empty(64, BLOCK).uniform_(-13, 0, generator=g))
    if not squared:
        x = x * torch.where(torch.rand(64, BLOCK, generator=g) < 0.5, -1.0, 1.0)
    code = dynamic_code(not squared)
    total = torch.zeros_like(x, dtype=torch.float64)
    draws = 400
    for _ in range(draws):
        codes, scale = quantize(x, code, torch.rand(x.shape, generator=g), squared)
        value = code[codes.long()] * scale[:, None]
        # each draw is one of the two table values around x
        lo = (torch.searchsorted(code, x / scale[:, None], right=True) - 1).clamp(0, 254)
        assert bool(((codes.long() == lo) | (codes.long() == lo + 1)).all())
        total += (value.double() ** 2) if squared else value.double()
    target = x.double() ** 2 if squared else x.double()
    # bias of the mean over draws, in units of each value's own gap between codes: unbiased
    # rounding leaves sampling noise (|z| ~ 0.02 at 400 draws), always-down half a gap on average
    lo_v, hi_v = code[lo].double() * scale[:, None], code[lo + 1].double() * scale[:, None]
    gap = (hi_v ** 2 - lo_v ** 2) if squared else (hi_v - lo_v)
    z = (total / draws - target) / gap
    assert z.abs().mean().item() < 0.03 and abs(z.mean().item()) < 0.003
    codes, scale = quantize(x, code, torch.ones_like(x), squared)  # u = 1: always the lower code
    down = code[codes.long()].double() * scale[:, None]
    assert ((((down ** 2) if squared else down) - target) / gap).abs().mean().item() > 0.3


def _regression(opt_factory, steps=200, seed=1):
    """A linear model fitted with minibatches; returns the model, its final full-data loss and the optimizer."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 128, generator=g)
    y = x @ (0.1 * torch.randn(64, 128, generator=g)).T + 0.01 * torch.randn(512, 64, generator=g)
    torch.manual_seed(seed)
    model = torch.nn.Linear(128, 64)
    opt = opt_factory(model.parameters())
    batches = torch.Generator().manual_seed(2)
    for _ in range(steps):
        idx = torch.randint(0, 512, (64,), generator=batches)
        loss = ((model(x[idx]) - y[idx]) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, ((model(x) - y) ** 2).mean().item(), opt


def test_tracks_torch_adamw_with_a_quarter_of_the_state():
    hyper = dict(lr=3e-3, betas=(0.9, 0.999), weight_decay=0.01)
    ref, ref_loss, ref_opt = _regression(lambda p: torch.optim.AdamW(p, **hyper))
    ours, loss, opt = _regression(lambda p: AdamW8bit(p, **hyper))
    assert ours.weight.numel() >= MIN_8BIT_NUMEL and "m_codes" in opt.state[ours.weight]
    assert "exp_avg" in opt.state[ours.bias]  # small parameters keep float32 moments
    rel = ((ours.weight - ref.weight).norm() / ref.weight.norm()).item()
    assert rel < 0.01, rel
    assert loss < 1.1 * ref_loss
    assert state_bytes(opt) < 0.3 * state_bytes(ref_opt)


def test_second_moment_decays_like_float32_adamw():
    """In each block one element keeps a gradient of 1 (and the block's scale up) while the others
    stop getting any: their v decays by beta2 = 0.999 a step, a thousandth of a code step, which
    only unbiased rounding follows (to nearest, their codes would never move)."""
    shape = (64, BLOCK)
    p_ref, p = torch.nn.Parameter(torch.ones(shape)), torch.nn.Parameter(torch.ones(shape))
    ref, ours = torch.optim.AdamW([p_ref], lr=1e-4), AdamW8bit([p], lr=1e-4)
    g = torch.Generator().manual_seed(0)
    for step in range(300):
        grad = 0.3 * (torch.rand(shape, generator=g) + 0.5) if step < 10 else torch.zeros(shape)
        grad[:, 0] = 1.0
        p_ref.grad, p.grad = grad.clone(), grad.clone()
        ref.step()
        ours.step()
    st = ours.state[p]
    r = dynamic_code(False)[st["r_codes"].long()] * st["r_scale"][:, None]
    v_ours, v_ref = (r[:, 1:] ** 2).mean().item(), ref.state[p_ref]["exp_avg_sq"][:, 1:].mean().item()
    assert abs(v_ours / v_ref - 1) < 0.02, (v_ours, v_ref)


def test_checkpoint_round_trip_continues_exactly():
    hyper = dict(lr=3e-3, weight_decay=0.01)
    model, _, opt = _regression(lambda p: AdamW8bit(p, seed=5, **hyper), steps=20)
    saved_model, saved_state = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    # the state dict through torch's load_state_dict, which casts states to the parameters' dtype
    resumed = torch.nn.Linear(128, 64)
    resumed.load_state_dict(saved_model)
    opt2 = AdamW8bit(resumed.parameters(), seed=5, **hyper)
    opt2.load_state_dict(saved_state)
    assert opt2.state[resumed.weight]["m_codes"].dtype == torch.uint8
    g = torch.Generator().manual_seed(9)
    for _ in range(5):
        grads = [torch.randn(p.shape, generator=g) for p in model.parameters()]
        for o, m in ((opt, model), (opt2, resumed)):
            for p, gr in zip(m.parameters(), grads):
                p.grad = gr.clone()
            o.step()
    assert torch.equal(model.weight, resumed.weight) and torch.equal(model.bias, resumed.bias)


def test_takes_a_float32_adamw_state_on_resume():
    model, loss32, ref = _regression(lambda p: torch.optim.AdamW(p, lr=3e-3), steps=100)
    opt = AdamW8bit(model.parameters(), lr=3e-3)
    opt.load_state_dict(ref.state_dict())
    st = opt.state[model.weight]
    assert "m_codes" in st and "exp_avg" not in st and st["step"] == 100
    m = dynamic_code(True)[st["m_codes"].long()] * st["m_scale"][:, None]
    m_ref = ref.state[model.weight]["exp_avg"].reshape(-1, BLOCK)
    assert ((m - m_ref).abs().max() / m_ref.abs().max()).item() < 0.01


def test_step_in_backward_rounds_as_one_optimizer():
    """One optimizer over the model and StepInBackward's one per parameter (from optim.adamw_maker)
    draw the same random streams: the same parameters, to the bit."""
    def build():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(96, 96), torch.nn.SiLU(), torch.nn.Linear(96, 64))

    x, y = torch.randn(32, 96), torch.randn(32, 64)
    plain, hooked = build(), build()
    opt = optim.adamw_maker(8, seed=4, lr=1e-2)(plain.parameters())
    sib = StepInBackward(list(hooked.parameters()), optim.adamw_maker(8, seed=4, lr=1e-2))
    for _ in range(3):
        opt.zero_grad()
        ((plain(x) - y) ** 2).mean().backward()
        opt.step()
        ((hooked(x) - y) ** 2).mean().backward()
    for a, b in zip(plain.parameters(), hooked.parameters()):
        assert torch.equal(a, b)
    # and a single-optimizer state dict loads into the per-parameter ones
    sib.load_state_dict(opt.state_dict())
    for part, p, q in zip(sib.optimizers, hooked.parameters(), plain.parameters()):
        key = "m_codes" if "m_codes" in opt.state[q] else "exp_avg"
        assert torch.equal(part.state[p][key], opt.state[q][key])


def test_bad_arguments_name_themselves():
    p = [torch.nn.Parameter(torch.zeros(4))]
    with pytest.raises(ValueError, match="lr"):
        AdamW8bit(p, lr=-1.0)
    with pytest.raises(ValueError, match="betas"):
        AdamW8bit(p, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="state_bits"):
        optim.adamw_maker(16)
    half = torch.nn.Parameter(torch.zeros(MIN_8BIT_NUMEL, dtype=torch.float16))
    half.grad = torch.zeros_like(half)
    with pytest.raises(ValueError, match="float32"):
        AdamW8bit([half]).step()


def _steps_in_both_layouts(w, grad_format):
    """Three 8-bit AdamW steps of a channels-last copy of w (gradients in `grad_format`) and of a
    contiguous one, with the same gradients: ((a, its optimizer), (b, its optimizer), the
    gradients' generator), after checking that a kept its layout and equals b."""
    a = torch.nn.Parameter(w.clone().contiguous(memory_format=torch.channels_last))
    b = torch.nn.Parameter(w.clone())
    oa, ob = AdamW8bit([a], lr=1e-2), AdamW8bit([b], lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        grad = torch.randn(w.shape, generator=g)
        a.grad, b.grad = grad.contiguous(memory_format=grad_format), grad.clone()
        oa.step()
        ob.step()
    assert a.is_contiguous(memory_format=torch.channels_last) and torch.equal(a, b)
    return (a, oa), (b, ob), g


def test_state_is_in_logical_order_whatever_the_layout():
    """A channels-last weight steps as its contiguous copy does (the state follows the logical
    order), keeps its layout, and its state resumes a contiguous run exactly, as the checkpoints
    (which store tensors contiguous) need."""
    w = torch.randn(32, 16, 3, 3)
    (a, oa), (b, ob), g = _steps_in_both_layouts(w, torch.channels_last)
    c = torch.nn.Parameter(a.detach().contiguous())
    oc = AdamW8bit([c], lr=1e-2)
    oc.load_state_dict({k: v for k, v in copy.deepcopy(oa.state_dict()).items()})
    grad = torch.randn(w.shape, generator=g)
    b.grad, c.grad = grad.clone(), grad.clone()
    ob.step()
    oc.step()
    assert torch.equal(b, c)


@pytest.mark.parametrize("grad_format", [torch.channels_last, torch.contiguous_format])
def test_triton_kernel_steps_a_channels_last_weight_in_place(monkeypatch, grad_format):
    """The Triton kernel reads and writes a channels-last weight (and its gradient, in either
    layout) where they lie, in logical order: bitwise what the contiguous copy's steps give."""
    if not adamw8bit_triton._TRITON_INTERPRET:
        pytest.skip("needs TRITON_INTERPRET=1 (tests/conftest.py sets it)")
    monkeypatch.setattr(adamw8bit_triton, "ON_CPU", True)
    w = torch.randn(24, 20, 3, 3)  # 4320 values: 17 blocks, the last one partial
    (a, oa), (b, ob), _ = _steps_in_both_layouts(w, grad_format)
    for key in ("m_codes", "m_scale", "r_codes", "r_scale"):
        assert torch.equal(oa.state[a][key], ob.state[b][key]), key


def test_float32_state_of_a_channels_last_weight_quantizes_in_place():
    """A float32 AdamW state as a checkpoint stores it (contiguous) for a channels-last weight: each
    value's moments stay its own."""
    w = torch.nn.Parameter(torch.randn(32, 16, 3, 3).contiguous(memory_format=torch.channels_last))
    ref = torch.optim.AdamW([w], lr=1e-3)
    w.grad = torch.randn(w.shape).contiguous(memory_format=torch.channels_last)
    ref.step()
    saved = ref.state_dict()
    saved["state"][0] = {k: v.contiguous() for k, v in saved["state"][0].items()}
    opt = AdamW8bit([w], lr=1e-3)
    opt.load_state_dict(saved)
    st = opt.state[w]
    m = (dynamic_code(True)[st["m_codes"].long()] * st["m_scale"][:, None]).view(-1)[: w.numel()]
    m_ref = ref.state[w]["exp_avg"].contiguous().view(-1)
    assert ((m - m_ref).norm() / m_ref.norm()).item() < 0.02


def test_load_checks_state_shapes():
    p = torch.nn.Parameter(torch.zeros(64, 4096))
    small = torch.nn.Parameter(torch.zeros(16, 256))
    opt = AdamW8bit([small])
    small.grad = torch.ones_like(small)
    opt.step()
    with pytest.raises(ValueError, match="parameter 0 .* needs m_codes of shape"):
        AdamW8bit([p]).load_state_dict(opt.state_dict())


def test_an_overflowing_gradient_spoils_no_other_value():
    """g^2 beyond float32's range: v is kept at its largest finite value, so the block's scale stays
    finite and its other values keep stepping (float32 AdamW freezes that value alone)."""
    p = torch.nn.Parameter(torch.zeros(2 * BLOCK * 16))
    opt = AdamW8bit([p], lr=1e-3)
    for step in range(3):
        p.grad = torch.ones_like(p)
        if step == 0:
            p.grad[5] = 1e25
        opt.step()
    assert torch.isfinite(p).all() and torch.isfinite(opt.state[p]["r_scale"]).all()
    others = torch.ones(p.shape, dtype=torch.bool)
    others[5] = False
    assert (p[others] < 0).all() and p[5].item() == 0.0  # (that value frozen, as AdamW's)


def test_steps_without_triton(monkeypatch):
    """Triton is optional: without it the C++ loop (or the definition) steps."""
    import builtins
    real_import = builtins.__import__

    def no_triton(name, *args, **kwargs):
        if name == "triton" or name.startswith("triton.") or name.endswith("adamw8bit_triton"):
            raise ImportError("no triton here")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(__import__("sys").modules, "ldmfast.train.adamw8bit_triton", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_triton)
    p = torch.nn.Parameter(torch.zeros(8192))
    small = torch.nn.Parameter(torch.zeros(10))
    opt = AdamW8bit([p, small], lr=1e-2)
    p.grad, small.grad = torch.ones_like(p), torch.ones_like(small)
    opt.step()
    assert (p < 0).all() and (small < 0).all()


def _steps(p0, grads, device="cpu"):
    """(parameter, state) on the CPU after AdamW8bit steps of p0 on `device` with `grads`."""
    p = torch.nn.Parameter(p0.clone().to(device))
    opt = AdamW8bit([p], lr=1e-2, weight_decay=0.1, seed=3)
    for grad in grads:
        p.grad = grad.clone().to(device)
        opt.step()
    return p.detach().cpu(), {k: v.cpu() for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)}


def _definition_steps(monkeypatch, p0, grads):
    """_steps through the plain-torch adamw8bit_update (no C++ loop, no Triton kernel)."""
    with monkeypatch.context() as patch:
        patch.setattr(adamw8bit, "cpu_update", lambda *args, **kwargs: False)
        patch.setattr(adamw8bit_triton, "ON_CPU", False)
        return _steps(p0, grads)


def _assert_alike(reference, other):
    """The same codes and scales, parameters to float32 rounding, but where a float rounding tipped
    one stochastic rounding the other way (that value's later updates differ): a handful in 10^4."""
    (p_ref, st_ref), (p, st) = reference, other
    assert ((p - p_ref).abs() > 1e-5).float().mean().item() < 1e-3
    for key in ("m_codes", "r_codes"):
        assert (st[key] != st_ref[key]).float().mean().item() < 1e-3, key
    for key in ("m_scale", "r_scale"):
        assert torch.allclose(st[key], st_ref[key], rtol=1e-5), key


def _gradients(shape, count):
    g = torch.Generator().manual_seed(0)
    return torch.randn(shape, generator=g), [torch.randn(shape, generator=g) * 10.0 ** -k for k in range(count)]


def test_triton_kernel_matches_the_definition(monkeypatch):
    """Through Triton's interpreter, over steps with gradients of several magnitudes."""
    if not adamw8bit_triton._TRITON_INTERPRET:
        pytest.skip("needs TRITON_INTERPRET=1 (tests/conftest.py sets it)")
    p0, grads = _gradients((3, 5000), 4)  # 59 blocks, the last one partial
    reference = _definition_steps(monkeypatch, p0, grads)
    monkeypatch.setattr(adamw8bit_triton, "ON_CPU", True)
    _assert_alike(reference, _steps(p0, grads))


def test_cpu_loop_matches_the_definition(monkeypatch):
    """csrc/cpu/adamw8bit.cpp against adamw8bit_update."""
    p0, grads = _gradients((7, 4321), 5)  # 119 blocks, the last one partial
    _assert_alike(_definition_steps(monkeypatch, p0, grads), _steps(p0, grads))


@pytest.mark.cuda
def test_cuda_kernel_matches_the_definition(monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("no GPU")
    p0, grads = _gradients((1000, 999), 4)
    _assert_alike(_definition_steps(monkeypatch, p0, grads), _steps(p0, grads, "cuda"))


def test_triton_small_parameter_step_matches_torch_adamw(monkeypatch):
    """The float32-moment kernel of small parameters, through Triton's interpreter, against torch's
    AdamW."""
    if not adamw8bit_triton._TRITON_INTERPRET:
        pytest.skip("needs TRITON_INTERPRET=1 (tests/conftest.py sets it)")
    monkeypatch.setattr(adamw8bit_triton, "ON_CPU", True)
    g = torch.Generator().manual_seed(0)
    p0 = torch.randn(3000, generator=g)  # under MIN_8BIT_NUMEL: float32 moments
    ours, ref = torch.nn.Parameter(p0.clone()), torch.nn.Parameter(p0.clone())
    o8, oref = AdamW8bit([ours], lr=1e-2, weight_decay=0.1), torch.optim.AdamW([ref], lr=1e-2, weight_decay=0.1)
    for k in range(4):
        grad = torch.randn(p0.shape, generator=g) * 10.0 ** -k
        ours.grad, ref.grad = grad.clone(), grad.clone()
        o8.step()
        oref.step()
    assert "exp_avg" in o8.state[ours]
    torch.testing.assert_close(ours.detach(), ref.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(o8.state[ours]["exp_avg_sq"], oref.state[ref]["exp_avg_sq"], rtol=1e-6, atol=0)
