"""ldmfast.train.recast: autocast's weight copies cast again in the backward instead of kept."""
import pytest
import torch

from ldmfast.models import ConditionalLDM, UNetConfig
from ldmfast.train import optim, recast
from ldmfast.train.step_in_backward import StepInBackward


def _model_and_batch():
    torch.manual_seed(0)
    config = UNetConfig.demo()
    config.in_channels, config.out_channels = 18, 3
    model = ConditionalLDM(config, latent_channels=3)
    g = torch.Generator().manual_seed(1)
    batch = (torch.randn(2, 3, 16, 16, generator=g), torch.randn(2, 15, 64, 64, generator=g), torch.tensor([10, 700]))
    return model, batch


def _loss(model, batch, recast_on: bool, dtype=torch.bfloat16):
    z, ctp, t = batch
    with torch.autocast("cpu", dtype=dtype, cache_enabled=False), recast.recast_weight_copies(recast_on):
        out = model.denoiser(ctp)(z, t)
    return out.float().square().mean()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gradients_are_bitwise_those_without(dtype):
    model, batch = _model_and_batch()
    grads = []
    for on in (False, True):
        model.zero_grad(set_to_none=True)
        _loss(model, batch, on, dtype).backward()
        grads.append([p.grad for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_every_weight_copy_that_a_backward_needs_is_recast(monkeypatch):
    """Convolution weights as they are, linear weights transposed (what addmm saves); not the
    time embedding's first linear layer, whose input needs no gradient, so its weight is not saved."""
    model, batch = _model_and_batch()
    made = []
    original = recast._Recast.__init__

    def spy(self, leaf, dtype, transposed):
        made.append((leaf, transposed))
        original(self, leaf, dtype, transposed)

    monkeypatch.setattr(recast._Recast, "__init__", spy)
    _loss(model, batch, True).backward()
    recast_ids = {id(leaf) for leaf, _ in made}
    convs = [n for n, p in model.named_parameters() if p.dim() == 4]
    linears = [n for n, p in model.named_parameters() if p.dim() == 2 and n != "unet.time_embed.0.weight"]
    params = dict(model.named_parameters())
    assert convs and linears
    assert all(id(params[n]) in recast_ids for n in convs + linears)
    assert {t for _, t in made} == {False, True}


def test_nothing_is_recast_where_off_or_without_autocast(monkeypatch):
    model, batch = _model_and_batch()
    def refuse(*args):
        raise AssertionError("a weight copy was recast")

    monkeypatch.setattr(recast._Recast, "__init__", refuse)
    _loss(model, batch, False).backward()
    z, ctp, t = batch
    with recast.recast_weight_copies(True):  # float32: no copies to recast
        model.denoiser(ctp)(z, t).square().mean().backward()


def test_steps_in_the_backward_as_without():
    """An optimizer updating each weight inside the backward (train.step_in_backward) updates it
    only after every layer that used it has run its backward, so the recast copy is the forward's."""
    params = []
    for on in (False, True):
        model, batch = _model_and_batch()
        stepper = StepInBackward(list(model.parameters()), optim.adamw_maker(32, lr=1e-2))
        _loss(model, batch, on).backward()
        stepper.remove()
        params.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*params))
