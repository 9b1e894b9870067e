"""ldmfast.nn.GroupNormAct as a drop-in for nn.GroupNorm (+ SiLU)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ldmfast.nn as lnn


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("activation", [None, "silu"])
def test_state_dict_round_trip_and_equal_outputs(affine, activation):
    torch.manual_seed(torch.seed() % 2**31)
    ref = nn.GroupNorm(8, 32, eps=1e-6, affine=affine)
    if affine:
        with torch.no_grad():
            ref.weight.normal_()
            ref.bias.normal_()
    fused = lnn.GroupNormAct(8, 32, eps=1e-6, affine=affine, activation=activation)
    assert fused.load_state_dict(ref.state_dict()) is not None  # strict: same keys and shapes
    back = nn.GroupNorm(8, 32, eps=1e-6, affine=affine)
    back.load_state_dict(fused.state_dict())
    assert set(fused.state_dict()) == set(ref.state_dict())
    for k, v in ref.state_dict().items():
        assert torch.equal(back.state_dict()[k], v)
    for memory_format in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(2, 32, 7, 9).to(memory_format=memory_format)
        want = ref(x)
        want = F.silu(want) if activation == "silu" else want
        got = fused(x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert got.is_contiguous(memory_format=memory_format)


def test_from_module_shares_parameters_and_trains_the_same():
    torch.manual_seed(0)
    ref = nn.GroupNorm(4, 12)
    with torch.no_grad():
        ref.weight.normal_()
        ref.bias.normal_()
    fused = lnn.GroupNormAct.from_module(ref, activation="silu")
    assert fused.weight is ref.weight and fused.bias is ref.bias
    x = torch.randn(3, 12, 5, 4, requires_grad=True)
    fused(x).square().sum().backward()
    grads = [t.grad.clone() for t in (x, ref.weight, ref.bias)]
    for t in (x, ref.weight, ref.bias):
        t.grad = None
    F.silu(ref(x)).square().sum().backward()
    for got, t in zip(grads, (x, ref.weight, ref.bias)):
        torch.testing.assert_close(got, t.grad, rtol=1e-4, atol=1e-5)
    assert "activation='silu'" in repr(fused)


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="num_groups"):
        lnn.GroupNormAct(3, 32)
    with pytest.raises(ValueError, match="activation"):
        lnn.GroupNormAct(4, 32, activation="gelu")
    with pytest.raises(ValueError, match="num_channels"):
        lnn.GroupNormAct(3, "6")
    for eps in (-1.0, 0.0, float("nan"), True):
        with pytest.raises(ValueError, match="eps"):
            lnn.GroupNormAct(4, 32, eps=eps)
    with pytest.raises(ValueError, match="module"):
        lnn.GroupNormAct.from_module(nn.LayerNorm(4))
