"""An optimizer applied inside the backward pass: each parameter is updated as soon as its gradient
is complete (a post-accumulate-grad hook) and that gradient is freed at once, so a training step
never holds the gradients of the whole model. For the release UNet those are ~1.4 GB of float32,
the largest part of a post-training step's memory that checkpointing leaves
(bench/bench_posttrain.py).

The update is the wrapped optimizer's, per parameter: AdamW's is elementwise with a step count per
parameter, so one AdamW per parameter computes what one AdamW over all of them does. The state
dict has the single optimizer's layout, so checkpoints move between runs with and without it.
Not with gradient accumulation, DDP (both need every gradient before any update) or anything that
looks at all gradients at once (clipping by the global norm, a gradient scaler).
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch


class StepInBackward:
    """Quacks like the one optimizer it replaces where the trainers use it (param_groups for the
    learning rate, step and zero_grad, state_dict and load_state_dict)."""

    def __init__(self, params: Iterable[torch.Tensor], make: Callable[[list[torch.Tensor]], torch.optim.Optimizer]):
        self.params = list(params)
        if not self.params:
            raise ValueError("params: no parameter to optimize")
        self.optimizers = [make([p]) for p in self.params]
        self._handles: list = []
        self.attach()

    def attach(self) -> None:
        """Hook the updates into the parameters' gradient accumulation (done by the constructor)."""
        if not self._handles:
            self._handles = [p.register_post_accumulate_grad_hook(self._update(opt))
                             for p, opt in zip(self.params, self.optimizers)]

    def remove(self) -> None:
        """Detach the hooks: the parameters take plain gradients again until attach()."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _update(self, optimizer: torch.optim.Optimizer):
        # (AdamW8bit's update without Optimizer.step's hooks and profiler range: host time, per
        # parameter per step.)
        update = getattr(optimizer, "update_parameters", optimizer.step)

        def hook(param: torch.Tensor) -> None:
            update()
            param.grad = None
        return hook

    @property
    def param_groups(self) -> list[dict]:
        return [group for opt in self.optimizers for group in opt.param_groups]

    def step(self) -> None:
        """Nothing left to do: the updates ran in the backward."""

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    # ---- the single optimizer's state dict layout -------------------------------------------

    def state_dict(self) -> dict:
        state = {}
        for index, opt in enumerate(self.optimizers):
            own = opt.state_dict()["state"]
            if 0 in own:
                state[index] = own[0]
        group = dict(self.optimizers[0].state_dict()["param_groups"][0])
        group["params"] = list(range(len(self.params)))
        return {"state": state, "param_groups": [group]}

    def load_state_dict(self, state_dict: dict) -> None:
        groups = state_dict["param_groups"]
        if len(groups) != 1 or len(groups[0]["params"]) != len(self.params):
            raise ValueError(f"state_dict: {len(groups)} parameter group(s) of "
                             f"{[len(g['params']) for g in groups]} parameters; this optimizer has one group of "
                             f"{len(self.params)}")
        ids = groups[0]["params"]
        for opt, pid in zip(self.optimizers, ids):
            state = {0: state_dict["state"][pid]} if pid in state_dict["state"] else {}
            opt.load_state_dict({"state": state, "param_groups": [dict(groups[0], params=[0])]})
