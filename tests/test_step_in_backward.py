"""StepInBackward: AdamW applied per parameter inside the backward computes what one AdamW over the
model does after it, holds no gradient afterwards, and shares the single optimizer's checkpoints."""
import copy

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ldmfast.train import optim
from ldmfast.train.step_in_backward import StepInBackward


class Net(nn.Module):
    """Convolutions, a checkpointed block (gradients through recomputation) and a parameter used
    twice (its gradient accumulates before its update may run)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.GroupNorm(4, 8), nn.SiLU())
        self.shared = nn.Linear(8, 8)
        self.unused = nn.Linear(2, 2)  # no gradient: neither optimizer may touch it

    def forward(self, x):
        h = self.conv(x)
        h = checkpoint(self.block, h, use_reentrant=False)
        h = h.mean((2, 3))
        return self.shared(torch.tanh(self.shared(h)))


def adamw(params):
    return optim.adamw(params, lr=1e-2, betas=(0.9, 0.99), weight_decay=0.05)


def train(model, opt, batches, lrs):
    for (x, y), lr in zip(batches, lrs):
        for group in opt.param_groups:
            group["lr"] = lr
        loss = (model(x) - y).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def make_batches(seed, n):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 3, 9, 7, generator=g), torch.randn(4, 8, generator=g)) for _ in range(n)]


def assert_same_parameters(a, b):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=lambda m: f"{name}: {m}")


def test_updates_equal_one_adamw_after_the_backward():
    torch.manual_seed(0)
    plain = Net()
    inside = copy.deepcopy(plain)
    before = copy.deepcopy(plain)
    batches, lrs = make_batches(torch.seed() % 2**31, 3), [1e-2, 5e-3, 2e-2]
    train(plain, adamw(list(plain.parameters())), batches, lrs)
    train(inside, StepInBackward(list(inside.parameters()), adamw), batches, lrs)
    assert_same_parameters(plain, inside)
    assert not torch.equal(plain.conv.weight, before.conv.weight), "the test must train something"
    assert torch.equal(inside.unused.weight, before.unused.weight)


def test_no_gradient_is_left_after_the_backward():
    model = Net()
    opt = StepInBackward(list(model.parameters()), adamw)
    x, y = make_batches(1, 1)[0]
    (model(x) - y).square().mean().backward()
    assert all(p.grad is None for p in model.parameters())
    opt.remove()
    (model(x) - y).square().mean().backward()
    assert model.conv.weight.grad is not None, "after remove() gradients are plain again"
    opt.zero_grad()
    opt.attach()
    (model(x) - y).square().mean().backward()
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("direction", ["into plain", "from plain"])
def test_state_dict_moves_between_the_two(direction):
    torch.manual_seed(1)
    first = Net()
    batches = make_batches(2, 4)
    lrs = [1e-2] * 4
    second = copy.deepcopy(first)
    reference = copy.deepcopy(first)
    make_first = (lambda m: StepInBackward(list(m.parameters()), adamw)) if direction == "into plain" else \
        (lambda m: adamw(list(m.parameters())))
    make_second = (lambda m: adamw(list(m.parameters()))) if direction == "into plain" else \
        (lambda m: StepInBackward(list(m.parameters()), adamw))
    opt_first = make_first(first)
    train(first, opt_first, batches[:2], lrs)
    # Resume: the second optimizer takes the first's state (as a checkpoint would carry it).
    second.load_state_dict(first.state_dict())
    opt_second = make_second(second)
    opt_second.load_state_dict(copy.deepcopy(opt_first.state_dict()))
    train(second, opt_second, batches[2:], lrs)
    train(reference, adamw(list(reference.parameters())), batches, lrs)
    assert_same_parameters(reference, second)


def test_state_dict_of_another_shape_is_refused():
    model = Net()
    opt = StepInBackward(list(model.parameters()), adamw)
    other = adamw(list(model.conv.parameters()))
    with pytest.raises(ValueError, match="state_dict"):
        opt.load_state_dict(other.state_dict())
    with pytest.raises(ValueError, match="params"):
        StepInBackward([], adamw)
