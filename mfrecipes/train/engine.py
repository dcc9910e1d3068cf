"""Training engines: the interface every engine gives the loop (:class:`Engine`, which also holds
the optimiser code they share) and the single-process engine, CPU or one GPU, plain torch.
(DeepSpeed lives in its own module, ``deepspeed_engine.py``.)

An engine owns the optimiser and the backward/step mechanics; the loop stays the same for every
engine. The objective always receives the raw module (``engine.module``): torch.func.jvp cannot
run through wrappers.

The interface the loop uses:

- ``launch(device) -> (rank, world_size, device)`` (static): join the process group, if any.
- ``module``, ``rank``, ``world_size``, ``is_main``, ``device``.
- ``configure(train_cfg)``: a stage's optimiser settings; ``set_lr(images)`` the scheduled
  rate before each step; ``micro_batch_size()`` and
  ``accumulation_steps()`` per rank; ``autocast()`` around the objective.
- ``backward(loss)`` per micro batch; then ``step()`` (clips, and drops the update itself when
  the gradient is non-finite) and ``grad_norm()`` (before clipping; inf/nan when dropped), or
  ``skip()`` to drop the gradients of a non-finite loss.
- ``mean_across_ranks(values)``, ``broadcast(obj)`` (from rank 0), ``gather(obj)``, ``barrier()``.
- ``full_state_dict()`` / ``load_weights(sd)``: raw weights; ``state_dict()`` /
  ``load_state_dict(state, folder)``: optimiser state in torch's AdamW layout (engine-neutral);
  ``save_native(folder)``: the engine's own checkpoint files, if it has any.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Optional

import torch
from torch import nn

from mfrecipes.recipe.schema import Recipe, TrainCfg


class Engine:
    """Base of the engines: the optimiser code they share, and the rest of the interface above
    declared (each engine implements it).

    Every engine trains with torch's AdamW built from ``train:`` (the same layout for every
    engine, so a consolidated optimiser state moves between them); its rate follows
    ``train.lr_schedule`` (``set_lr`` before every step).
    """

    module: nn.Module
    device: torch.device
    cfg: TrainCfg
    optimizer: torch.optim.Optimizer
    rank: int = 0
    world_size: int = 1
    _grad_norm: float = math.nan

    @staticmethod
    def launch(device: torch.device) -> tuple[int, int, torch.device]:
        """Join the process group, if any: ``(rank, world size, this rank's device)``."""
        raise NotImplementedError

    # -- the shared optimiser code ------------------------------------------------------------
    def _make_optimizer(self, net: nn.Module, cfg: TrainCfg) -> torch.optim.Optimizer:
        self.cfg = cfg
        self.optimizer = torch.optim.AdamW(net.parameters(), lr=cfg.lr, betas=tuple(cfg.betas),
                                           weight_decay=cfg.weight_decay)
        self._grad_norm = math.nan
        return self.optimizer

    def configure(self, cfg: TrainCfg) -> None:
        """Apply a stage's optimiser settings (lr, betas, weight decay, clipping) in place."""
        self.cfg = cfg
        for group in self.optimizer.param_groups:
            group.update(lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)

    def set_lr(self, images: int) -> float:
        """Set the scheduled rate (``train.lr_schedule``) for the step ending at ``images``."""
        lr = self.cfg.lr_at(images)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def grad_norm(self) -> float:
        """Gradient norm of the last ``step()`` before clipping; inf/nan if it was dropped."""
        return self._grad_norm

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- what each engine implements ----------------------------------------------------------
    def micro_batch_size(self) -> int:
        raise NotImplementedError

    def accumulation_steps(self) -> int:
        raise NotImplementedError

    def autocast(self):
        raise NotImplementedError

    def backward(self, loss: torch.Tensor) -> None:
        raise NotImplementedError

    def step(self) -> None:
        raise NotImplementedError

    def skip(self) -> None:
        raise NotImplementedError

    def mean_across_ranks(self, values: list[float]) -> list[float]:
        raise NotImplementedError

    def broadcast(self, obj: Any) -> Any:
        raise NotImplementedError

    def gather(self, obj: Any) -> list:
        raise NotImplementedError

    def barrier(self) -> None:
        raise NotImplementedError

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def load_weights(self, sd: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict:
        raise NotImplementedError

    def save_native(self, folder: str) -> None:
        raise NotImplementedError

    def load_state_dict(self, state: dict, folder: Optional[str] = None) -> str:
        raise NotImplementedError


class SingleEngine(Engine):
    world_size = 1
    rank = 0

    @staticmethod
    def launch(device: torch.device) -> tuple[int, int, torch.device]:
        return 0, 1, device

    def __init__(self, net: nn.Module, recipe: Recipe, device: torch.device):
        self.module = net
        self.device = device
        self._make_optimizer(net, recipe.train)

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

    def step(self) -> None:
        """Clip (if configured) and update, unless the gradient is non-finite."""
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip is not None else math.inf
        self._grad_norm = float(torch.nn.utils.clip_grad_norm_(self.module.parameters(),
                                                               max_norm))
        if math.isfinite(self._grad_norm):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def skip(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    # -- collectives (trivial with one process) -------------------------------------------------
    def mean_across_ranks(self, values: list[float]) -> list[float]:
        return list(values)

    def broadcast(self, obj: Any) -> Any:
        return obj

    def gather(self, obj: Any) -> list:
        return [obj]

    def barrier(self) -> None:
        pass

    # -- weights and state ----------------------------------------------------------------------
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_weights(self, sd: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(sd)

    def state_dict(self) -> dict:
        return {"kind": "single", "world_size": 1, "optimizer": self.optimizer.state_dict()}

    def save_native(self, folder: str) -> None:
        pass

    def load_state_dict(self, state: dict, folder: Optional[str] = None) -> str:
        """Restore the optimiser (also from a DeepSpeed run's consolidated copy)."""
        full = state.get("optimizer")
        if not full or "state" not in full:
            return "no optimiser state (reinitialised)"
        self.optimizer.load_state_dict(full)
        return "optimiser state"
