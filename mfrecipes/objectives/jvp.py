"""One forward pass that also returns the directional derivative of the network.

``(u, du) = jvp_forward(net, z, t, h, y, dz, dt, dh)`` gives ``u = net(z, t, h, y)`` with its
autograd graph (it is the prediction that receives gradients) and ``du``, the derivative of u
along ``(dz, dt, dh)``, detached (it only enters a stop-gradient target).

A backbone may offer ``forward_jvp(z, t, h, y, dz, dt, dh) -> (u, du)`` (a hand-written tangent
pass, e.g. one that keeps fused attention kernels); ``impl="auto"`` and ``"manual"`` use it when
present, ``"torch_func"`` always uses ``torch.func.jvp``, and so does any net without the method.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch

__all__ = ["JVP_IMPLS", "jvp_forward", "jvp_precision"]

JVP_IMPLS = ("auto", "torch_func", "manual")


def jvp_forward(net, z: torch.Tensor, t: torch.Tensor, h: torch.Tensor,
                y: Optional[torch.Tensor], dz: torch.Tensor, dt: torch.Tensor, dh: torch.Tensor,
                *, impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """``(u [B, ...] with graph, du [B, ...] detached)``: the net and its derivative along the
    tangents ``(dz, dt, dh)``."""
    manual = getattr(net, "forward_jvp", None)
    if impl != "torch_func" and callable(manual):
        u, du = manual(z, t, h, y, dz, dt, dh)
    else:
        u, du = torch.func.jvp(lambda z_, t_, h_: net(z_, t_, h_, y), (z, t, h), (dz, dt, dh))
    return u, du.detach()


@contextlib.contextmanager
def jvp_precision(dtype: Optional[str], device_type: str) -> Iterator[Optional[torch.dtype]]:
    """Context for the JVP: ``None`` keeps the ambient precision; ``"float32"`` switches autocast
    off and yields the dtype the inputs must be cast to."""
    if dtype is None:
        yield None
        return
    with torch.autocast(device_type=device_type, enabled=False):
        yield getattr(torch, dtype)
