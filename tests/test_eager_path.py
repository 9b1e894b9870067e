"""The eager fast path (ldmfast/ops/_eager.py): in plain eager mode the ops with autograd skip the
custom op's dispatcher round trip; anything that must see the custom op still does."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import ldmfast.ops as ops
from ldmfast.ops import _eager
from ldmfast.ops.attention import _AttentionEager, _attention_op
from ldmfast.ops.group_norm import _group_norm_op, _GroupNormEager


def fresh(*shape):
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    return torch.randn(*shape, generator=g)


def assert_paths_agree(fast, slow, leaves, args):
    """The same inputs and output gradient through the fast path and the custom op give
    bit-identical outputs and input gradients."""
    results, dout = [], None
    for fn in (fast, slow):
        xs = [t.detach().clone().requires_grad_() for t in leaves]
        out = fn(*xs, *args)[0]
        if dout is None:
            dout = fresh(*out.shape).to(out.dtype)
        out.backward(dout)
        results.append((out.detach(), [t.grad for t in xs]))
    (out1, grads1), (out2, grads2) = results
    assert torch.equal(out1, out2)
    for a, c in zip(grads1, grads2):
        assert torch.equal(a, c)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_group_norm_fast_path_equals_the_custom_op(backend):
    x, w, b = fresh(2, 12, 5, 7), fresh(12), fresh(12)
    assert_paths_agree(_GroupNormEager.apply, _group_norm_op, [x, w, b], (4, 1e-5, "silu", backend))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_attention_fast_path_equals_the_custom_op(backend):
    q, k, v = fresh(2, 3, 9, 16), fresh(2, 3, 11, 16), fresh(2, 3, 11, 16)
    assert_paths_agree(_AttentionEager.apply, _attention_op, [q, k, v], (0.25, backend))


class RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def test_dispatch_modes_still_see_the_custom_ops():
    x, q = fresh(1, 4, 3, 3), fresh(1, 1, 5, 8)
    with RecordOps() as mode:
        ops.group_norm(x, 2, activation="silu")
        ops.attention(q, q, q)
    assert any("ldmfast.group_norm" in n for n in mode.names), mode.names
    assert any("ldmfast.attention" in n for n in mode.names), mode.names


class Subclass(torch.Tensor):
    pass


def test_fast_path_applies_only_in_plain_eager_mode():
    x = fresh(2, 3)
    assert _eager.applies(x, None, torch.nn.Parameter(fresh(3)))
    assert not _eager.applies(x, x.as_subclass(Subclass))
    with RecordOps():
        assert not _eager.applies(x)
    seen = []
    torch.func.vmap(lambda t: seen.append(_eager.applies(t)) or t)(x)
    assert seen == [False]


def _penalty_grads(fn, leaves):
    """Gradients of a gradient penalty, |d(sum(fn(leaves) * dout))/d leaves[0]|^2, in every leaf:
    a double backward through fn."""
    xs = [t.detach().clone().requires_grad_() for t in leaves]
    out = fn(*xs)
    dout = torch.linspace(-1, 1, out.numel()).reshape(out.shape)
    grad, = torch.autograd.grad((out * dout).sum(), xs[0], create_graph=True)
    grad.square().sum().backward()
    return [grad.detach()] + [t.grad for t in xs]


@pytest.mark.parametrize("activation", [None, "silu"])
def test_group_norm_double_backward_matches_torch(activation):
    """The kernels' backward is not differentiable: a backward that autograd records runs on the
    reference instead (it used to raise: once_differentiable)."""
    x, w, b = fresh(2, 12, 5, 7), fresh(12), fresh(12)

    def torch_norm(x, w, b):
        y = F.group_norm(x, 4, w, b, 1e-5)
        return F.silu(y) if activation else y

    got = _penalty_grads(lambda *t: ops.group_norm(*t[:1], 4, *t[1:], activation=activation), [x, w, b])
    want = _penalty_grads(torch_norm, [x, w, b])
    for g, t in zip(got, want):
        torch.testing.assert_close(g, t, rtol=1e-4, atol=1e-5)


def test_attention_double_backward_matches_torch():
    q, k, v = fresh(2, 3, 9, 16), fresh(2, 3, 11, 16), fresh(2, 3, 11, 16)
    got = _penalty_grads(lambda q, k, v: ops.attention(q, k, v, scale=0.25), [q, k, v])
    want = _penalty_grads(lambda q, k, v: torch.softmax(q @ k.transpose(-1, -2) * 0.25, dim=-1) @ v, [q, k, v])
    for g, t in zip(got, want):
        torch.testing.assert_close(g, t, rtol=1e-4, atol=1e-5)


def test_double_backward_passes_gradgradcheck_without_affine_parameters():
    """float64 (the reference backend, on the fast path too); weight and bias None."""
    x = fresh(1, 4, 3, 2).double().requires_grad_()
    q = fresh(1, 2, 3, 4).double().requires_grad_()
    assert torch.autograd.gradgradcheck(lambda x: ops.group_norm(x, 2, activation="silu"), (x,))
    assert torch.autograd.gradgradcheck(lambda q: ops.attention(q, q * 2, q.flip(-2)), (q,))


def test_a_backward_without_create_graph_runs_the_kernels(monkeypatch):
    """The fast backward is unchanged: the reference forward is recomputed only for create_graph."""
    monkeypatch.setattr(_eager, "_differentiable_backward", lambda *a: pytest.fail("reference recomputed"))
    x, q = fresh(2, 4, 3, 3).requires_grad_(), fresh(1, 2, 5, 8).requires_grad_()
    (ops.group_norm(x, 2, activation="silu").square().sum() + ops.attention(q, q, q).sum()).backward()
    assert x.grad is not None and q.grad is not None
