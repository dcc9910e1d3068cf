"""One forward pass that also returns the directional derivative of the network.

``(u, du) = jvp_forward(net, z, t, h, y, dz, dt, dh)`` gives ``u = net(z, t, h, y)`` with its
autograd graph (it is the prediction that receives gradients) and ``du``, the derivative of u
along ``(dz, dt, dh)``, detached (it only enters a stop-gradient target).

A backbone may offer ``forward_jvp(z, t, h, y, dz, dt, dh) -> (u, du)`` (a hand-written tangent
pass, e.g. one that keeps fused attention kernels); ``impl="auto"`` and ``"manual"`` use it when
present, ``"torch_func"`` always uses ``torch.func.jvp``, and so does any net without the method.

A backbone whose class sets ``jvp_leading_rows = True`` takes tangents for only the first
``K <= B`` rows (``dz [K, ...]``, ``du [K, ...]``): the primal covers the whole batch in one call
while the tangent stream runs on K rows (``takes_leading_rows``).
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch

__all__ = ["JVP_IMPLS", "jvp_forward", "jvp_precision", "takes_leading_rows"]

JVP_IMPLS = ("auto", "torch_func", "manual")


def takes_leading_rows(net, impl: str = "auto") -> bool:
    """Whether ``jvp_forward(net, ..., impl=impl)`` accepts tangents for the first K rows only."""
    return (impl != "torch_func" and callable(getattr(net, "forward_jvp", None))
            and getattr(net, "jvp_leading_rows", False) is True)


def jvp_forward(net, z: torch.Tensor, t: torch.Tensor, h: torch.Tensor,
                y: Optional[torch.Tensor], dz: torch.Tensor, dt: torch.Tensor, dh: torch.Tensor,
                *, impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """``(u [B, ...] with graph, du [K, ...] detached)``: the net and its derivative along the
    tangents ``(dz [K, ...], dt [K], dh [K])``; K = B unless ``takes_leading_rows(net, impl)``."""
    if dz.shape[0] != z.shape[0] and not takes_leading_rows(net, impl):
        raise ValueError(f"tangents for {dz.shape[0]} of {z.shape[0]} rows need a backbone with "
                         f"jvp_leading_rows = True and jvp_impl 'auto' or 'manual'")
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
