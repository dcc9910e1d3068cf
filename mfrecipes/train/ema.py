"""Exponential moving averages of the weights: one or more decays, fp32, outside any engine."""
from __future__ import annotations

import copy

import torch
from torch import nn

from mfrecipes.run.layout import ema_key


class EMA:
    """``theta_ema <- decay * theta_ema + (1 - decay) * theta`` every step, for each decay.

    Initialised to the weights (as the official code does). Shadows are fp32 copies of the raw
    module, kept in eval mode, never wrapped by an engine, so they can be sampled from directly.
    """

    def __init__(self, net: nn.Module, decays: tuple[float, ...]):
        self.decays = tuple(decays)
        self.shadows: dict[str, nn.Module] = {}
        for d in self.decays:
            shadow = copy.deepcopy(net).float().eval().requires_grad_(False)
            self.shadows[ema_key(d)] = shadow

    @torch.no_grad()
    def update(self, net: nn.Module) -> None:
        params = [p.detach().float() for p in net.parameters()]
        for d, shadow in zip(self.decays, self.shadows.values()):
            ema_params = list(shadow.parameters())
            torch._foreach_lerp_(ema_params, params, 1.0 - d)
            for b_ema, b in zip(shadow.buffers(), net.buffers()):
                b_ema.copy_(b)

    def module(self, key: str | None = None) -> nn.Module:
        """The EMA network for ``key`` (default: the first decay)."""
        return self.shadows[key or ema_key(self.decays[0])]

    def state_dicts(self) -> dict[str, dict[str, torch.Tensor]]:
        return {k: m.state_dict() for k, m in self.shadows.items()}

    def load_state_dicts(self, states: dict[str, dict[str, torch.Tensor]]) -> None:
        for k, m in self.shadows.items():
            if k in states:
                m.load_state_dict(states[k])
