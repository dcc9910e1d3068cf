"""Softmax attention that keeps the fused kernels under forward-mode AD.

PyTorch's fused ``F.scaled_dot_product_attention`` kernels (flash, memory-efficient, CPU flash)
have no forward-mode derivative: under ``torch.func.jvp`` they fail, and the portable escape (the
math kernel) materialises the ``[B, H, N, N]`` score matrix in the primal. Here the primal and its
backward stay fused, and the tangent has a closed form.

For ``O = softmax(S) V`` with ``S = Q K^T / sqrt(d)`` and ``P = softmax(S)``::

    dS    = (dQ K^T + Q dK^T) / sqrt(d)
    dO_i  = sum_j P_ij dV_j + sum_j P_ij (dS_ij - sum_k P_ik dS_ik) V_j

The second sum needs ``P`` itself (no fused kernel computes it), so the tangent is computed over
blocks of query rows: at most ``TANGENT_BLOCK_ELEMENTS`` score entries live at a time, and nothing
of size ``N^2`` is kept for backward (backward through the tangent recomputes block by block).
``P dV`` could be a second fused call ``SDPA(Q, K, dV)``, but the block holds ``P`` already, so
one matmul is cheaper than recomputing the softmax.

Shapes: q, k, v and their tangents ``[B, H, N, d]`` (any leading dims), output ``[B, H, N, d]``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.autograd.forward_ad as fwad
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["attention", "attention_tangent", "SelfAttention", "TANGENT_BLOCK_ELEMENTS"]

# Score entries (over all batch and head dims) materialised at once by the tangent.
TANGENT_BLOCK_ELEMENTS = 1 << 24


def _rows_per_block(q: torch.Tensor, n_keys: int) -> int:
    batch = max(1, q[..., 0, 0].numel())
    return max(1, min(q.shape[-2], TANGENT_BLOCK_ELEMENTS // (batch * n_keys)))


def _tangent_block(q, k, v, dq, dk, dv):
    """Closed-form attention tangent for the query rows in ``q`` / ``dq`` (differentiable)."""
    out_dtype = q.dtype
    if q.dtype in (torch.float16, torch.bfloat16):
        # Softmax products in half precision lose the tangent; blocks are small, so upcast.
        q, k, v, dq, dk, dv = (x.float() for x in (q, k, v, dq, dk, dv))
    scale = 1.0 / math.sqrt(q.shape[-1])
    p = torch.softmax((q @ k.transpose(-2, -1)) * scale, dim=-1)  # [..., n, N]
    ds = (dq @ k.transpose(-2, -1) + q @ dk.transpose(-2, -1)) * scale  # [..., n, N]
    pds = p * ds
    mix = pds - p * pds.sum(-1, keepdim=True)  # P (dS - rowsum(P dS))
    return (p @ dv + mix @ v).to(out_dtype)


def _tangent_blocks(q, k, v, dq, dk, dv) -> torch.Tensor:
    rows = _rows_per_block(q, k.shape[-2])
    if rows >= q.shape[-2]:
        return _tangent_block(q, k, v, dq, dk, dv)
    return torch.cat([_tangent_block(q[..., i:i + rows, :], k, v, dq[..., i:i + rows, :], dk, dv)
                      for i in range(0, q.shape[-2], rows)], dim=-2)


class _AttentionTangent(torch.autograd.Function):
    """dO as a function of (q, k, v, dq, dk, dv); backward recomputes block by block, so no
    ``N^2`` intermediate outlives the call (backprop through a tangent is rare but stays exact)."""

    @staticmethod
    def forward(q, k, v, dq, dk, dv):
        return _tangent_blocks(q, k, v, dq, dk, dv)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, dq, dk, dv = ctx.saved_tensors
        create_graph = torch.is_grad_enabled()
        rows = _rows_per_block(q, k.shape[-2])
        full = [x.detach().requires_grad_() for x in (k, v, dk, dv)]
        grads_full = [torch.zeros_like(x) for x in full]
        grads_q, grads_dq = [], []
        with torch.enable_grad():
            for i in range(0, q.shape[-2], rows):
                q_i = q[..., i:i + rows, :].detach().requires_grad_()
                dq_i = dq[..., i:i + rows, :].detach().requires_grad_()
                out = _tangent_block(q_i, full[0], full[1], dq_i, full[2], full[3])
                g = torch.autograd.grad(out, [q_i, dq_i, *full],
                                        grad_out[..., i:i + rows, :], create_graph=create_graph)
                grads_q.append(g[0])
                grads_dq.append(g[1])
                grads_full = [a + b for a, b in zip(grads_full, g[2:])]
        gk, gv, gdk, gdv = grads_full
        return torch.cat(grads_q, -2), gk, gv, torch.cat(grads_dq, -2), gdk, gdv


def attention_tangent(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      dq: Optional[torch.Tensor], dk: Optional[torch.Tensor],
                      dv: Optional[torch.Tensor]) -> torch.Tensor:
    """Directional derivative of ``softmax(q k^T / sqrt(d)) v`` along ``(dq, dk, dv)``
    (``None`` = zero tangent); blockwise, memory ``O(TANGENT_BLOCK_ELEMENTS)``."""
    dq = torch.zeros_like(q) if dq is None else dq
    dk = torch.zeros_like(k) if dk is None else dk
    dv = torch.zeros_like(v) if dv is None else dv
    if not torch.is_grad_enabled():
        return _tangent_blocks(q, k, v, dq, dk, dv)
    return _AttentionTangent.apply(q, k, v, dq, dk, dv)


class _FusedAttention(torch.autograd.Function):
    """Fused SDPA in the primal, closed-form tangent for forward-mode AD, backward by recomputing
    the fused forward."""

    @staticmethod
    def forward(q, k, v):
        return F.scaled_dot_product_attention(q, k, v)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)
        ctx.save_for_forward(*inputs)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v = ctx.saved_tensors
        create_graph = torch.is_grad_enabled()
        need = ctx.needs_input_grad
        leaves = [x.detach().requires_grad_(n) for x, n in zip((q, k, v), need)]
        with torch.enable_grad():
            out = F.scaled_dot_product_attention(*leaves)
            wanted = [x for x, n in zip(leaves, need) if n]
            grads = iter(torch.autograd.grad(out, wanted, grad_out, create_graph=create_graph))
        return tuple(next(grads) if n else None for n in need)

    @staticmethod
    def jvp(ctx, dq, dk, dv):
        q, k, v = ctx.saved_tensors
        return attention_tangent(q, k, v, dq, dk, dv)


def _forward_ad_may_be_active() -> bool:
    """True inside a torch.func transform or a forward-AD dual level; True as well if these
    PyTorch internals ever move (the custom Function is correct everywhere, only slower)."""
    try:
        return (torch._C._functorch.maybe_current_level() is not None
                or fwad._current_level >= 0)
    except AttributeError:
        return True


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``softmax(q k^T / sqrt(d)) v`` with fused kernels that also works under ``torch.func.jvp``
    and ``torch.autograd.forward_ad``."""
    if not _forward_ad_may_be_active():
        # Plain SDPA keeps its fused backward (the Function's backward recomputes the forward).
        return F.scaled_dot_product_attention(q, k, v)
    return _FusedAttention.apply(q, k, v)


class SelfAttention(nn.Module):
    """Multi-head self-attention (qkv projection, fused attention, output projection)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def _split_heads(self, qkv: torch.Tensor) -> tuple[torch.Tensor, ...]:
        b, n, three_c = qkv.shape
        # [B, N, 3C] -> 3 x [B, H, N, d]
        return qkv.reshape(b, n, 3, self.num_heads, three_c // (3 * self.num_heads)) \
            .permute(2, 0, 3, 1, 4).unbind(0)

    @staticmethod
    def _merge_heads(o: torch.Tensor) -> torch.Tensor:
        b, _, n, _ = o.shape
        return o.transpose(1, 2).reshape(b, n, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, N, C] -> [B, N, C]."""
        q, k, v = self._split_heads(self.qkv(x))
        return self.proj(self._merge_heads(attention(q, k, v)))

    def forward_jvp(self, x: torch.Tensor, dx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(y [B, N, C] with graph, dy [K, N, C] without graph) for x [B, N, C] and the tangent
        dx [K, N, C] of its first K <= B rows."""
        rows = dx.shape[0]
        q, k, v = self._split_heads(self.qkv(x))
        # Plain SDPA (no forward AD here): fused forward and fused backward, no recompute.
        o = self._merge_heads(F.scaled_dot_product_attention(q, k, v))
        with torch.no_grad():
            dq, dk, dv = self._split_heads(F.linear(dx, self.qkv.weight))
            do = self._merge_heads(attention_tangent(q[:rows], k[:rows], v[:rows], dq, dk, dv))
            dy = F.linear(do, self.proj.weight)
        return self.proj(o), dy
