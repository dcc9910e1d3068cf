"""``train.compile``: torch.compile for the backbone being trained.

The backbone's ``forward`` is compiled in place (``nn.Module.compile``: parameter names, and so
checkpoints, are unchanged) and so is its ``forward_jvp`` when it has one, which is what the
MeanFlow objectives call for the r != t rows. The number of r != t rows changes from step to
step: after the second distinct count torch marks that dimension dynamic, so compilation happens
a few times at the start, not at every step. The EMA copies and sampling stay eager.
"""
from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["compile_backbone"]


def compile_backbone(net: nn.Module, mode: str = "default") -> nn.Module:
    """Compile ``net.forward`` (in place) and ``net.forward_jvp`` if present; returns ``net``."""
    net.compile(mode=mode)
    jvp = getattr(net, "forward_jvp", None)
    if callable(jvp):
        net.forward_jvp = torch.compile(jvp, mode=mode)
    return net
