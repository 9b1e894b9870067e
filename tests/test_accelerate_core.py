"""ldmfast.accelerate on plain torch modules: what it leaves alone and says why, reversibility,
shared parameters, argument checks, and that `import ldmfast` stays light."""
import copy
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ldmfast
from accelerate_checks import fresh_seed, randomize
from ldmfast.acceleration import AcceleratedGroupNorm


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
        "scaled": "ScaledGroupNorm overrides GroupNorm.forward",
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
