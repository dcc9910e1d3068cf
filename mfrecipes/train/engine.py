"""The single-process engine: CPU or one GPU, plain torch. (DeepSpeed lives in its own module.)

An engine owns the optimiser and the backward/step mechanics; the loop stays the same for every
engine. The objective always receives the raw module (``engine.module``): torch.func.jvp cannot
run through wrappers.
"""
from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from mfrecipes.recipe.schema import TrainCfg


class SingleEngine:
    world_size = 1
    rank = 0

    def __init__(self, net: nn.Module, cfg: TrainCfg, device: torch.device):
        self.module = net
        self.device = device
        self.cfg = cfg
        # AdamW, constant LR, no warm-up (MeanFlow's ImageNet setting; betas from the recipe).
        self.optimizer = torch.optim.AdamW(net.parameters(), lr=cfg.lr, betas=tuple(cfg.betas),
                                           weight_decay=cfg.weight_decay)

    def configure(self, cfg: TrainCfg) -> None:
        """Apply a stage's optimiser settings (lr, betas, weight decay, clipping) in place."""
        self.cfg = cfg
        for group in self.optimizer.param_groups:
            group.update(lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)

    @property
    def is_main(self) -> bool:
        return True

    def micro_batch_size(self) -> int:
        return self.cfg.micro_batch_size or self.cfg.global_batch_size

    def accumulation_steps(self) -> int:
        mb = self.micro_batch_size()
        if self.cfg.global_batch_size % mb:
            raise ValueError(f"train.global_batch_size {self.cfg.global_batch_size} is not a "
                             f"multiple of train.micro_batch_size {mb}")
        return self.cfg.global_batch_size // mb

    def autocast(self):
        """bf16 autocast on CUDA when train.precision is bf16; parameters stay fp32."""
        if self.cfg.precision == "bf16" and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def clip_and_check(self) -> float:
        """Clip (if configured) and return the global gradient norm (inf/nan if non-finite)."""
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip is not None else math.inf
        norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), max_norm)
        return float(norm)

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def skip(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
