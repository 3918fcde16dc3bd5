"""Exponential moving average of a network's weights.

The average is kept as a full copy of the network (``EMA.model``), so it can be run for samples and
written with the network's own ``save_pretrained`` into a model folder that the engine loads.
"""

import copy

import torch
import torch.nn as nn


class EMA:
    """``ema = decay * ema + (1 - decay) * weights`` after every optimizer step.

    The decay warms up as ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates (as diffusers'
    EMAModel does), so short runs are not dominated by the random initial weights."""

    def __init__(self, net: nn.Module, decay: float = 0.999, warmup: bool = True):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.num_updates = 0
        self.model = copy.deepcopy(net).eval().requires_grad_(False)

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        n = self.num_updates
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, net: nn.Module) -> None:
        weight = 1.0 - self.current_decay()
        self.num_updates += 1
        ema_params = [p for p in self.model.parameters()]
        params = [p.detach() for p in net.parameters()]
        if len(ema_params) != len(params):
            raise ValueError("EMA.update: the network's parameters do not match the EMA copy")
        torch._foreach_lerp_(ema_params, params, weight)
        # Buffers (e.g. running statistics) are copied, not averaged.
        for ema_b, b in zip(self.model.buffers(), net.buffers()):
            ema_b.copy_(b)

    def state_dict(self):
        return self.model.state_dict()

    def load_state_dict(self, state, num_updates: int) -> None:
        self.model.load_state_dict(state)
        self.num_updates = num_updates
