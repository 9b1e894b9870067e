"""ldmfast.accelerate on plain torch modules: what it leaves alone and says why, reversibility,
shared parameters, argument checks, and that `import ldmfast` stays light."""
import copy
import gc
import io
import pickle
import subprocess
import sys
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ldmfast
from accelerate_checks import fresh_seed, randomize
from ldmfast.acceleration import AcceleratedGroupNorm
from ldmfast.nn import GroupNormAct


class ScaledGroupNorm(nn.GroupNorm):
    def forward(self, x):
        return 2 * super().forward(x)


class Mixed(nn.Module):
    """Candidates of every sort: fusable pairs, a GroupNorm then ReLU, norms ldmfast has no op
    for, a GroupNorm subclass with its own forward, a hooked GroupNorm, torch's attention."""

    def __init__(self):
        super().__init__()
        self.pair = nn.Sequential(nn.GroupNorm(4, 8), nn.SiLU(), nn.Conv2d(8, 8, 1))
        self.relu = nn.Sequential(nn.GroupNorm(2, 8), nn.ReLU())
        self.batch_norm = nn.BatchNorm2d(8)
        self.scaled = ScaledGroupNorm(4, 8)
        self.hooked = nn.GroupNorm(4, 8)
        self.hooked.register_forward_hook(lambda module, args, out: out + 1)
        self.layer_norm = nn.LayerNorm(8)
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):
        x = self.hooked(self.scaled(self.batch_norm(self.relu(self.pair(x)))))
        t = self.layer_norm(x.flatten(2).transpose(1, 2))
        return x + self.mha(t, t, t)[0].transpose(1, 2).reshape(x.shape)


def test_left_alone_modules_are_listed_untouched_and_outputs_agree():
    fresh_seed()
    model = randomize(Mixed()).eval()
    untouched = {name: getattr(model, name) for name in ("batch_norm", "scaled", "hooked", "layer_norm", "mha")}
    x = torch.randn(2, 8, 5, 3)
    want = model(x)
    report = ldmfast.accelerate(model)
    reasons = {s.path: s.reason for s in report.left_alone}
    assert reasons == {
        "batch_norm": "ldmfast has no fused BatchNorm2d",
        "scaled": "ScaledGroupNorm overrides GroupNorm.forward with something other than GroupNorm (checked on a "
                  "probe input)",
        "hooked": "has forward/backward hooks, which a replacement would drop",
        "layer_norm": "ldmfast has no fused LayerNorm",
        "mha": "no ldmfast rule for this attention module",
    }
    assert {c.path: c.kind for c in report.replaced} == {"pair": "group_norm+silu", "pair.0": "group_norm",
                                                         "relu.0": "group_norm"}
    for name, module in untouched.items():
        assert getattr(model, name) is module
    torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)
    assert "left alone" in str(report) and "MultiheadAttention" in str(report)


def test_undo_restores_modules_forwards_and_keeps_trained_parameters():
    fresh_seed()
    model = randomize(nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(4, 8), nn.SiLU(), nn.Conv2d(8, 2, 1)))
    originals = list(model)
    params = list(model.parameters())
    report = ldmfast.accelerate(model)
    assert isinstance(model[1], AcceleratedGroupNorm) and "forward" in model.__dict__
    assert list(model.parameters()) == params  # the very same Parameter objects
    before = model[1].weight.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(2, 3, 6, 6)).square().sum().backward()
    optimizer.step()
    report.undo()
    assert list(model) == originals and "forward" not in model.__dict__ and not report.active
    assert not torch.equal(model[1].weight, before)  # the training step is kept
    report.undo()  # a second undo does nothing


def test_deepcopy_of_an_accelerated_model_runs_its_own_weights():
    fresh_seed()
    model = randomize(nn.Sequential(nn.GroupNorm(2, 4), nn.SiLU()))
    ldmfast.accelerate(model)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin[0].bias.add_(1.0)
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(twin(x), F.silu(F.group_norm(x, 2, twin[0].weight, twin[0].bias)),
                               rtol=1e-5, atol=1e-5)
    assert not torch.allclose(twin(x), model(x))


def test_group_norm_without_spatial_dims_falls_back_to_torch():
    fresh_seed()
    model = randomize(nn.Sequential(nn.Linear(6, 8), nn.GroupNorm(4, 8)))
    x = torch.randn(5, 6)
    want = model(x)
    ldmfast.accelerate(model)
    torch.testing.assert_close(model(x), want, rtol=1e-6, atol=1e-6)


def test_kinds_can_be_switched_off():
    fresh_seed()
    model = nn.Sequential(nn.GroupNorm(2, 4), nn.SiLU())
    report = ldmfast.accelerate(model, group_norm=False)
    assert report.replaced == [] and type(model[0]) is nn.GroupNorm
    ldmfast.restore(model)
    report = ldmfast.accelerate(model, attention=False)
    assert report.counts() == {"group_norm+silu": 1, "group_norm": 1}


def test_bad_arguments_and_double_acceleration_name_the_argument():
    with pytest.raises(ValueError, match="model: must be a torch.nn.Module"):
        ldmfast.accelerate("unet")
    with pytest.raises(ValueError, match="attention: must be True or False"):
        ldmfast.accelerate(nn.Identity(), attention=1)
    model = nn.Sequential(nn.GroupNorm(2, 4))
    ldmfast.accelerate(model)
    with pytest.raises(ValueError, match="model: .*already accelerated"):
        ldmfast.accelerate(model)
    ldmfast.restore(model)
    with pytest.raises(ValueError, match="model: .*not accelerated"):
        ldmfast.restore(model)


def test_import_ldmfast_does_not_import_the_peers_or_this_package():
    code = ("import sys, ldmfast; "
            "print(sorted(m for m in ('monai', 'diffusers', 'ldmfast.acceleration', 'ldmfast.schedulers') "
            "if m in sys.modules)); print(callable(ldmfast.accelerate))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split("\n")[:2] == ["[]", "True"]


class SwishGroupNorm32(nn.GroupNorm):
    """GLIDE's GroupNorm32 (glide_text2im/nn.py): the norm in float32, then SiLU or a swish, in its
    own forward."""

    def __init__(self, num_groups, num_channels, swish, eps=1e-5):
        super().__init__(num_groups=num_groups, num_channels=num_channels, eps=eps)
        self.swish = swish

    def forward(self, x):
        y = super().forward(x.float()).to(x.dtype)
        if self.swish == 1.0:
            y = F.silu(y)
        elif self.swish:
            y = y * torch.sigmoid(y * float(self.swish))
        return y


class Float32GroupNorm(nn.GroupNorm):
    """The reference release's GroupNorm32, verbatim."""

    def forward(self, x):
        return super().forward(x.float()).type(x.dtype)


def test_group_norm_subclasses_are_replaced_only_where_their_forward_computes_group_norm():
    fresh_seed()
    glide = type("GroupNorm32", (SwishGroupNorm32,), {})  # the name of the reference release's class too
    model = randomize(nn.Sequential(glide(2, 8, swish=1.0), glide(2, 8, swish=0.0), Float32GroupNorm(2, 8),
                                    nn.SiLU()))
    x = torch.randn(2, 8, 5, 3)
    want = model(x)
    report = ldmfast.accelerate(model)
    assert {s.path: s.reason for s in report.left_alone} == {
        "0": "GroupNorm32 overrides GroupNorm.forward with something other than GroupNorm (checked on a probe input)"}
    assert [type(m) for m in model] == [glide, AcceleratedGroupNorm, AcceleratedGroupNorm, nn.SiLU]
    torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)


def test_group_norm_subclass_on_the_meta_device_is_checked_too():
    with torch.device("meta"):
        model = nn.Sequential(Float32GroupNorm(2, 4), SwishGroupNorm32(2, 4, swish=1.0))
    ldmfast.accelerate(model)
    assert [type(m) for m in model] == [AcceleratedGroupNorm, SwishGroupNorm32]


def test_accelerated_group_norm_is_an_nn_group_norm_with_the_same_state_dict():
    """Code that checks its norms' type (diffusers' Attention with cross_attention_norm="group_norm")
    keeps working, and accelerating a model around an accelerated one does not replace it again."""
    model = nn.Sequential(nn.Conv2d(4, 4, 1), nn.GroupNorm(2, 4, eps=1e-4), nn.GroupNorm(1, 4, affine=False))
    before = {k: v.data_ptr() for k, v in model.state_dict().items()}
    ldmfast.accelerate(model)
    norms = [model[1], model[2]]
    assert all(type(m) is AcceleratedGroupNorm and isinstance(m, nn.GroupNorm) for m in norms)
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == before
    assert (model[1].num_groups, model[1].eps, model[2].affine, model[2].weight) == (2, 1e-4, False, None)
    outer = ldmfast.accelerate(nn.Sequential(model))
    assert outer.replaced == [] and [model[1], model[2]] == norms
    assert {s.reason for s in outer.left_alone} == {"already accelerated (by an earlier accelerate of a part of "
                                                    "the model)"}


def test_pickled_accelerated_model_loads_and_runs_accelerated():
    """The fused forwards are instance attributes: they pickle (a bound method pickled as
    getattr(module, "_sequential_forward"), which failed to load)."""
    fresh_seed()
    model = randomize(nn.Sequential(nn.Conv2d(4, 8, 1), nn.GroupNorm(2, 8), nn.SiLU()))
    ldmfast.accelerate(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for loaded in (torch.load(buffer, weights_only=False), pickle.loads(pickle.dumps(model))):
        assert "forward" in loaded.__dict__ and isinstance(loaded[1], AcceleratedGroupNorm)
        x = torch.randn(2, 4, 3, 3)
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
        assert ldmfast.accelerate(loaded).replaced == []  # recognized as accelerated already


@pytest.mark.parametrize("make", [
    lambda: nn.Sequential(nn.GroupNorm(2, 4), nn.SiLU()),  # the root is the parent of a swapped norm
    lambda: nn.Sequential(GroupNormAct(2, 4, activation=None), nn.SiLU()),  # only the root's forward replaced
], ids=["swap-in-root", "root-forward"])
def test_an_accelerated_model_is_freed(make):
    """The report is kept per model with the model as a weak key: nothing in it may hold the model."""
    model = make()
    report = ldmfast.accelerate(model)
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None
    report.undo()  # with the model gone, nothing to do


@pytest.mark.parametrize("replace", ["load_state_dict(assign=True)", "to_empty"])
def test_restore_keeps_parameters_replaced_while_accelerated(replace):
    fresh_seed()
    trained = randomize(nn.Sequential(nn.Conv2d(4, 4, 1), nn.GroupNorm(2, 4), nn.SiLU()))
    with torch.device("meta" if replace == "to_empty" else "cpu"):
        model = nn.Sequential(nn.Conv2d(4, 4, 1), nn.GroupNorm(2, 4), nn.SiLU())
    ldmfast.accelerate(model)
    if replace == "to_empty":
        model.to_empty(device="cpu")
        model.load_state_dict(trained.state_dict())
    else:
        model.load_state_dict(trained.state_dict(), assign=True)
    model.eval()
    x = torch.randn(2, 4, 3, 3)
    ldmfast.restore(model)
    assert type(model[1]) is nn.GroupNorm and not model[1].training
    assert model[1].weight.device.type == "cpu"
    torch.testing.assert_close(model(x), trained(x), rtol=0, atol=0)


def _rename_gamma_beta(module, state_dict, prefix, *args):
    """A checkpoint-compatibility hook: old checkpoints named the norm's weight and bias gamma, beta."""
    for old, new in (("gamma", "weight"), ("beta", "bias")):
        if prefix + old in state_dict:
            state_dict[prefix + new] = state_dict.pop(prefix + old)


def test_group_norm_with_state_dict_hooks_is_left_alone():
    model = nn.Sequential(nn.Conv2d(4, 4, 1), nn.GroupNorm(2, 4), nn.SiLU())
    model[1].register_load_state_dict_pre_hook(_rename_gamma_beta)
    old_checkpoint = {"0.weight": torch.randn(4, 4, 1, 1), "0.bias": torch.randn(4), "1.gamma": torch.randn(4),
                      "1.beta": torch.randn(4)}
    report = ldmfast.accelerate(model)
    assert {s.path: s.reason for s in report.left_alone} == {
        "1": "has state_dict or load_state_dict hooks, which a replacement would drop"}
    model.load_state_dict(old_checkpoint)
    assert torch.equal(model[1].weight, old_checkpoint["1.gamma"])


def test_gradient_penalty_through_an_accelerated_model_matches_torch():
    """A double backward (R1 penalty): the fused ops' backward is recomputed differentiably where
    autograd records it, and the convolution's double backward, which sends no gradient to the
    fused op's output, goes through too."""
    fresh_seed()
    model = randomize(nn.Sequential(nn.Conv2d(4, 8, 3), nn.GroupNorm(2, 8), nn.SiLU(), nn.Conv2d(8, 1, 1)))
    plain = copy.deepcopy(model)
    ldmfast.accelerate(model)
    x = torch.randn(2, 4, 6, 5)

    def penalty_grads(m):
        xs = x.clone().requires_grad_()
        grad, = torch.autograd.grad(m(xs).sum(), xs, create_graph=True)
        grad.square().sum().backward()
        return [p.grad for p in m.parameters()]

    for got, want in zip(penalty_grads(model), penalty_grads(plain)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
