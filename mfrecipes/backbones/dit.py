"""DiT (Peebles & Xie 2023) conditioned on (t, h = t - r, y), as MeanFlow uses it.

Patchify (timm PatchEmbed) + fixed 2-D sin-cos positions, adaLN-Zero blocks (attention + timm
Mlp with tanh-GELU), a final adaLN + linear layer, unpatchify. No learned sigma: the output has the
input's channels. Zero-init as in DiT: every adaLN modulation and the final linear start at 0, so
the untrained network outputs 0.

Registered names: ``dit`` (every size parameter exposed) and the paper's sizes ``dit_{s,b,m,l,xl}_
{2,4,8}``, plus ``dit_tiny_{2,4}`` for tests and CPU runs.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from mfrecipes.backbones import tangents
from mfrecipes.backbones.attention import SelfAttention
from mfrecipes.backbones.embedders import ConditionEmbedder
from mfrecipes.backbones.tangents import check_leading_rows
from mfrecipes.registry import BACKBONES

__all__ = ["DiT", "DiTBlock", "FinalLayer", "sincos_pos_embed_2d", "DIT_SIZES", "dit"]

_LN_EPS = 1e-6


def _gelu_tanh() -> nn.Module:
    return nn.GELU(approximate="tanh")


def _sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """pos [M] -> [M, dim]: ``[sin(pos w_k), cos(pos w_k)]``, ``w_k = 10000^(-k / (dim/2))``."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64, device=pos.device)
                            / (dim / 2))
    out = pos.double()[:, None] * omega[None]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_pos_embed_2d(dim: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """Fixed 2-D sin-cos positional embedding [grid_h * grid_w, dim] (row-major tokens): the first
    half of the channels encodes the column, the second half the row (as MAE and DiT)."""
    if dim % 4:
        raise ValueError(f"hidden size must be divisible by 4 for 2-D sin-cos positions, got {dim}")
    rows, cols = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")
    emb = torch.cat([_sincos_1d(dim // 2, cols.reshape(-1)),
                     _sincos_1d(dim // 2, rows.reshape(-1))], dim=1)
    return emb.float()


def _rows(k: int, *tensors: Optional[torch.Tensor]) -> list[Optional[torch.Tensor]]:
    """The first k rows of each tensor (None stays None)."""
    return [None if a is None else a[:k] for a in tensors]


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation: x [B, N, C], shift and scale [B, C]."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class DiTBlock(nn.Module):
    """adaLN-Zero block: x + gate * Attn(mod(LN(x))), then x + gate * Mlp(mod(LN(x)))."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=_LN_EPS)
        self.attn = SelfAttention(hidden_size, num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=_LN_EPS)
        from timm.layers import Mlp  # imported on first build: timm pulls in torchvision (~2 s)

        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), act_layer=_gelu_tanh)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x [B, N, C], c [B, C] -> [B, N, C]."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = \
            self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(_modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(_modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x

    def forward_jvp(self, x, dx, c, dc_act):
        """(x_out [B, N, C] with graph, dx_out [K, N, C] without graph) from x [B, N, C],
        c [B, C] and the tangents dx [K, N, C] and dc_act [K, C] (of silu(c), the adaLN input,
        shared by every block) of the first K <= B rows."""
        k = dx.shape[0]
        mod = self.adaLN_modulation(c)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=1)
        with torch.no_grad():
            dmod = tangents.linear(self.adaLN_modulation[1], dc_act)
        dshift_msa, dscale_msa, dgate_msa, dshift_mlp, dscale_mlp, dgate_mlp = dmod.chunk(6, dim=1)

        # attention branch
        xn, mu, rstd = tangents.layer_norm_primal(x, _LN_EPS)
        a_in = _modulate(xn, shift_msa, scale_msa)
        with torch.no_grad():
            dxn = tangents.layer_norm(x[:k], dx, _LN_EPS, xn[:k], *_rows(k, rstd, mu))
            da_in = tangents.modulate(xn[:k], dxn, scale_msa[:k], dscale_msa, dshift_msa)
        a, da = self.attn.forward_jvp(a_in, da_in)
        x_mid = x + gate_msa.unsqueeze(1) * a
        with torch.no_grad():
            dx_mid = tangents.gated_residual(dx, gate_msa[:k], dgate_msa, a[:k], da)

        # MLP branch (fc1 -> tanh-GELU -> fc2)
        xn, mu, rstd = tangents.layer_norm_primal(x_mid, _LN_EPS)
        m_in = _modulate(xn, shift_mlp, scale_mlp)
        pre = self.mlp.fc1(m_in)
        m = self.mlp.fc2(self.mlp.act(pre))
        out = x_mid + gate_mlp.unsqueeze(1) * m
        with torch.no_grad():
            dxn = tangents.layer_norm(x_mid[:k], dx_mid, _LN_EPS, xn[:k], *_rows(k, rstd, mu))
            dm_in = tangents.modulate(xn[:k], dxn, scale_mlp[:k], dscale_mlp, dshift_mlp)
            dm = tangents.linear(self.mlp.fc2, tangents.gelu_tanh(
                pre[:k], tangents.linear(self.mlp.fc1, dm_in)))
            dout = tangents.gated_residual(dx_mid, gate_mlp[:k], dgate_mlp, m[:k], dm)
        return out, dout


class FinalLayer(nn.Module):
    """adaLN (shift, scale) + linear to patch_size^2 * out_channels per token."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=_LN_EPS)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(_modulate(self.norm_final(x), shift, scale))

    def forward_jvp(self, x, dx, c, dc_act):
        """As ``DiTBlock.forward_jvp``: tangents dx [K, N, C], dc_act [K, C] of the first K rows."""
        k = dx.shape[0]
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        xn, mu, rstd = tangents.layer_norm_primal(x, _LN_EPS)
        out = self.linear(_modulate(xn, shift, scale))
        with torch.no_grad():
            dshift, dscale = tangents.linear(self.adaLN_modulation[1], dc_act).chunk(2, dim=1)
            dxn = tangents.layer_norm(x[:k], dx, _LN_EPS, xn[:k], *_rows(k, rstd, mu))
            dxm = tangents.modulate(xn[:k], dxn, scale[:k], dscale, dshift)
            dout = tangents.linear(self.linear, dxm)
        return out, dout


class DiT(nn.Module):
    """Diffusion Transformer predicting the average velocity u(z, t, h, y), z [B, C, H, W]."""

    jvp_leading_rows = True  # forward_jvp accepts tangents for only the first K rows

    def __init__(self, input_shape: Sequence[int], num_classes: Optional[int] = None, *,
                 depth: int = 12, hidden_size: int = 768, num_heads: int = 12,
                 patch_size: int = 2, mlp_ratio: float = 4.0):
        super().__init__()
        input_shape = tuple(input_shape)
        if len(input_shape) != 3:
            raise ValueError(f"DiT needs image-shaped input (C, H, W), got input_shape "
                             f"{input_shape}; for 2-D points use the 'mlp' backbone")
        check_size("depth", depth, 1, 1024)
        check_size("hidden_size", hidden_size, 1, 65536)
        check_size("num_heads", num_heads, 1, 4096)
        check_size("patch_size", patch_size, 1, 1024)
        if isinstance(mlp_ratio, bool) or not isinstance(mlp_ratio, (int, float)) \
                or not 0 < mlp_ratio <= 64:
            raise ValueError(f"mlp_ratio must be a number in (0, 64], got {mlp_ratio!r}")
        channels, height, width = input_shape
        if height % patch_size or width % patch_size:
            raise ValueError(f"input size {height}x{width} is not divisible by patch_size "
                             f"{patch_size}; valid patch sizes divide both sides")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        self.input_shape = input_shape
        self.num_classes = num_classes
        self.patch_size = patch_size
        self.grid = (height // patch_size, width // patch_size)

        from timm.layers import PatchEmbed

        self.x_embedder = PatchEmbed((height, width), patch_size, channels, hidden_size, bias=True)
        self.cond = ConditionEmbedder(hidden_size, num_classes)
        # Fixed (not learned) positions; a buffer, so it follows .to(device) but is not trained.
        self.register_buffer("pos_embed", sincos_pos_embed_2d(hidden_size, *self.grid)[None],
                             persistent=False)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio)
                                     for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's initialisation: xavier linears, N(0, 0.02) embedders, adaLN-Zero."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        for emb in (self.cond.t_embedder, self.cond.h_embedder):
            nn.init.normal_(emb.mlp[0].weight, std=0.02)
            nn.init.normal_(emb.mlp[2].weight, std=0.02)
        if self.cond.y_embedder is not None:
            nn.init.normal_(self.cond.y_embedder.embedding_table.weight, std=0.02)
        # adaLN-Zero: every residual branch and the output start at 0.
        for mod in [b.adaLN_modulation[-1] for b in self.blocks] + [
                self.final_layer.adaLN_modulation[-1], self.final_layer.linear]:
            nn.init.zeros_(mod.weight)
            nn.init.zeros_(mod.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, p*p*C] -> [B, C, H, W]."""
        p, (gh, gw), c = self.patch_size, self.grid, self.input_shape[0]
        x = x.reshape(x.shape[0], gh, gw, p, p, c)
        return torch.einsum("bhwpqc->bchpwq", x).reshape(x.shape[0], c, gh * p, gw * p)

    def forward(self, z: torch.Tensor, t: torch.Tensor, h: torch.Tensor,
                y: Optional[torch.Tensor] = None) -> torch.Tensor:
        """z [B, C, H, W], t and h [B] in [0, 1], y [B] long or None -> u [B, C, H, W]."""
        x = self.x_embedder(z) + self.pos_embed.to(z.dtype)  # [B, N, hidden]
        c = self.cond(t, h, y)  # [B, hidden]
        for block in self.blocks:
            x = block(x, c)
        return self.unpatchify(self.final_layer(x, c))

    def forward_jvp(self, z: torch.Tensor, t: torch.Tensor, h: torch.Tensor,
                    y: Optional[torch.Tensor], dz: torch.Tensor, dt, dh
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(u, du): u [B, C, H, W] = forward(z, t, h, y) with its autograd graph; du [K, C, H, W]
        is the derivative of u along (dz, dt, dh) for the first K = len(dz) <= B rows, computed
        in closed form without a graph (``jvp_leading_rows``).

        One pass carries both streams layer by layer, each layer's tangent computed in closed
        form right after its primal (cheaper than ``torch.func.jvp``; attention stays fused).
        The primal runs on all B rows, so rows that need no derivative share its matmuls.
        dt and dh are numbers or [K] tensors; MeanFlow passes (dz, dt, dh) = (v, 1, 1).
        Both streams could share one matmul by stacking them along the batch, but that measured
        no faster than two back-to-back matmuls with the same weight, and costs a copy."""
        k = check_leading_rows(z, dz)
        dt, dh = tangents.as_time_tangent(dt, t[:k]), tangents.as_time_tangent(dh, h[:k])
        x = self.x_embedder(z) + self.pos_embed.to(z.dtype)
        with torch.no_grad():
            proj = self.x_embedder.proj
            dx = F.conv2d(dz, proj.weight, None, stride=proj.stride).flatten(2).transpose(1, 2)
        c, dc = self.cond.forward_jvp(t, h, y, dt, dh)
        with torch.no_grad():  # the adaLN input silu(c) is the same in every block
            dc_act = tangents.silu(c[:k], dc)
        for block in self.blocks:
            x, dx = block.forward_jvp(x, dx, c, dc_act)
        out, dout = self.final_layer.forward_jvp(x, dx, c, dc_act)
        return self.unpatchify(out), self.unpatchify(dout)


def check_size(name: str, value, lo: int, hi: int) -> None:
    """A size parameter must be an integer in [lo, hi]: a huge depth would build for ever."""
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}")


@BACKBONES.register("dit")
def dit(depth: int = 12, hidden_size: int = 768, num_heads: int = 12, patch_size: int = 2,
        mlp_ratio: float = 4.0, *, input_shape: Sequence[int],
        num_classes: Optional[int] = None) -> DiT:
    """DiT with every size parameter exposed (defaults: DiT-B/2)."""
    return DiT(input_shape, num_classes, depth=depth, hidden_size=hidden_size,
               num_heads=num_heads, patch_size=patch_size, mlp_ratio=mlp_ratio)


# size -> (depth, hidden_size, num_heads): DiT paper Table 1, M from MeanFlow, tiny for tests.
DIT_SIZES: dict[str, tuple[int, int, int]] = {
    "s": (12, 384, 6),
    "b": (12, 768, 12),
    "m": (16, 1024, 16),
    "l": (24, 1024, 16),
    "xl": (28, 1152, 16),
    "tiny": (4, 128, 4),
}
_PATCHES = {"tiny": (2, 4)}


def _register_size(size: str, patch_size: int) -> None:
    depth, hidden_size, num_heads = DIT_SIZES[size]
    name = f"dit_{size}_{patch_size}"

    def factory(*, input_shape: Sequence[int], num_classes: Optional[int] = None) -> DiT:
        return DiT(input_shape, num_classes, depth=depth, hidden_size=hidden_size,
                   num_heads=num_heads, patch_size=patch_size)

    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = (f"DiT-{size.upper()}/{patch_size}: depth {depth}, hidden {hidden_size}, "
                       f"{num_heads} heads, patch {patch_size}.")
    BACKBONES.register(name)(factory)


for _size in DIT_SIZES:
    for _patch in _PATCHES.get(_size, (2, 4, 8)):
        _register_size(_size, _patch)
