"""Exponential moving average of a model's trainable parameters (the latent-diffusion release's
LitEma): decay warms up as min(decay, (1 + n) / (10 + n)) over the n updates so far, so early
weights do not dominate. Held as float32 buffers of an nn.Module, so checkpoints carry it."""
from __future__ import annotations

import contextlib

import torch
from torch import nn


def _buffer_name(param_name: str) -> str:
    return param_name.replace(".", "__")


class EMA(nn.Module):
    def __init__(self, model: nn.Module, decay: float):
        super().__init__()
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay: must be within (0, 1), got {decay}")
        self.decay = decay
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        for n, p in model.named_parameters():
            if p.requires_grad:
                self.register_buffer(_buffer_name(n), p.detach().float().clone())
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    def _pairs(self, model: nn.Module):
        params = dict(model.named_parameters())
        for n in self.names:
            yield params[n], getattr(self, _buffer_name(n))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.num_updates += 1
        n = float(self.num_updates)
        decay = min(self.decay, (1 + n) / (10 + n))
        for p, shadow in self._pairs(model):
            shadow.lerp_(p.detach().float(), 1.0 - decay)

    def averaged_state_dict(self, model: nn.Module, keys) -> dict[str, torch.Tensor]:
        """model.state_dict() restricted to `keys`, with the averaged parameters in place of the live ones."""
        state = {k: v for k, v in model.state_dict().items() if k in set(keys)}
        for n in self.names:
            if n in state:
                state[n] = getattr(self, _buffer_name(n)).to(state[n].dtype)
        return state

    @contextlib.contextmanager
    def applied(self, model: nn.Module):
        """Within the block, the model's parameters are the averaged ones; restored after."""
        saved = [p.detach().clone() for p, _ in self._pairs(model)]
        with torch.no_grad():
            for p, shadow in self._pairs(model):
                p.copy_(shadow)
        try:
            yield model
        finally:
            with torch.no_grad():
                for (p, _), old in zip(self._pairs(model), saved):
                    p.copy_(old)
