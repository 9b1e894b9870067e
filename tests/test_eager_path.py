"""The eager fast path (ldmfast/ops/_eager.py): in plain eager mode the ops with autograd skip the
custom op's dispatcher round trip; anything that must see the custom op still does."""
import pytest
import torch
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
