"""DDPM++ U-Net ("SongUNet": Song et al. 2021, as configured by EDM, Karras et al. 2022) conditioned
on (t, h = t - r, y), as MeanFlow trains it on CIFAR-10.

Layout (EDM's DDPM++ description, written here from the papers): a 3x3 input conv, then per
resolution level ``num_blocks`` residual blocks (the first level at ``model_channels``, each level
at ``model_channels * channel_mult[level]``), a down-sampling residual block between levels,
self-attention (one head) in the blocks at the resolutions in ``attn_resolutions``; the decoder
mirrors it with ``num_blocks + 1`` blocks per level, each taking one encoder activation as a
concatenated skip, two middle blocks (the first with attention) at the lowest resolution and an
up-sampling block between levels; the output is GroupNorm, SiLU, 3x3 conv at full resolution.
Every residual block is GN-SiLU-conv, add the embedding's per-channel bias, GN-SiLU-dropout-conv,
(1x1-projected) shortcut, all scaled by sqrt(1/2); attention adds its own sqrt(1/2)-scaled
residual. Down/up-sampling is a 2x2 box filter (average pooling / nearest), resample filter [1, 1].

Conditioning, the MeanFlow change: t and h each get their own positional (sin-cos) embedding of
``model_channels * channel_mult_noise`` channels; the two are concatenated, an optional class
embedding and an optional augmentation-label projection (``augment_dim``, EDM's non-leaking
augmentation parameters; zeros at sampling time) are added, and a two-layer SiLU MLP maps the sum
to ``model_channels * channel_mult_emb`` channels, the per-block bias. Times are raw values in
[0, 1], as the other backbones take them. Labels follow the project's convention: index
``num_classes`` is the null class of classifier-free guidance.

Initialisation as EDM's DDPM++: Xavier-uniform weights, zero biases, the second conv of every block
and the attention output at gain 1e-5 (blocks start near identity), attention qkv at sqrt(0.2),
output conv at 0.2.

Registered names: ``unet`` (every size parameter exposed; defaults are the CIFAR-10 setting),
``unet_cifar10`` (the official MeanFlow CIFAR-10 network), ``unet_tiny`` for tests and CPU runs.
The tangent of MeanFlow's JVP goes through ``torch.func.jvp`` (attention keeps its fused kernels
under forward-mode AD, see ``attention.py``).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from mfrecipes.backbones.attention import attention
from mfrecipes.registry import BACKBONES

__all__ = ["SongUNet", "UNetBlock", "positional_embedding", "UNET_SIZES", "unet"]

_GN_EPS = 1e-6
_SKIP_SCALE = math.sqrt(0.5)


def positional_embedding(t: torch.Tensor, channels: int, max_positions: float = 10000.0
                         ) -> torch.Tensor:
    """t [B] -> [B, channels]: ``[cos(t f_k), sin(t f_k)]``, ``f_k = max_positions^(-k / (n-1))``
    for k = 0..n-1, n = channels / 2 (EDM's positional embedding: both ends of the frequency range
    included)."""
    half = channels // 2
    dtype = torch.promote_types(t.dtype, torch.float32)
    k = torch.arange(half, dtype=dtype, device=t.device) / max(half - 1, 1)
    args = t.to(dtype)[:, None] * (1.0 / max_positions) ** k[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


def _group_norm(channels: int) -> nn.GroupNorm:
    # at most 32 groups, at least 4 channels per group (EDM's rule)
    return nn.GroupNorm(min(32, channels // 4), channels, eps=_GN_EPS)


def _xavier(module: nn.Module, gain: float = 1.0) -> nn.Module:
    nn.init.xavier_uniform_(module.weight, gain=gain)
    if getattr(module, "bias", None) is not None:
        nn.init.zeros_(module.bias)
    return module


def _resample(x: torch.Tensor, up: bool, down: bool) -> torch.Tensor:
    """The [1, 1] resample filter: nearest 2x up-sampling or 2x2 average pooling."""
    if up:
        return F.interpolate(x, scale_factor=2, mode="nearest")
    if down:
        return F.avg_pool2d(x, 2)
    return x


class UNetBlock(nn.Module):
    """Residual block with embedding bias, optional 2x resampling and optional attention."""

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, *,
                 up: bool = False, down: bool = False, attention: bool = False,
                 dropout: float = 0.0):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.up, self.down = up, down
        self.norm0 = _group_norm(in_channels)
        self.conv0 = _xavier(nn.Conv2d(in_channels, out_channels, 3, padding=1))
        self.affine = _xavier(nn.Linear(emb_channels, out_channels))
        self.norm1 = _group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv1 = _xavier(nn.Conv2d(out_channels, out_channels, 3, padding=1), gain=1e-5)
        self.skip = None
        if in_channels != out_channels or up or down:
            self.skip = _xavier(nn.Conv2d(in_channels, out_channels, 1))
        self.attention = attention
        if attention:  # one head over all channels
            self.norm2 = _group_norm(out_channels)
            self.qkv = _xavier(nn.Conv2d(out_channels, 3 * out_channels, 1), gain=math.sqrt(0.2))
            self.proj = _xavier(nn.Conv2d(out_channels, out_channels, 1), gain=1e-5)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """x [B, in, H, W], emb [B, emb_channels] -> [B, out, H', W']."""
        shortcut = _resample(x, self.up, self.down)
        x = self.conv0(_resample(F.silu(self.norm0(x)), self.up, self.down))
        x = F.silu(self.norm1(x + self.affine(emb)[:, :, None, None].to(x.dtype)))
        x = self.conv1(self.dropout(x))
        x = (x + (shortcut if self.skip is None else self.skip(shortcut))) * _SKIP_SCALE
        if self.attention:
            b, c, hh, ww = x.shape
            q, k, v = self.qkv(self.norm2(x)).reshape(b, 3, 1, c, hh * ww).transpose(-1, -2) \
                .unbind(1)  # 3 x [B, 1 head, N, C]
            a = attention(q, k, v).transpose(-1, -2).reshape(b, c, hh, ww)
            x = (self.proj(a) + x) * _SKIP_SCALE
        return x


class SongUNet(nn.Module):
    """DDPM++ U-Net predicting the average velocity u(z, t, h, y), z [B, C, H, W]."""

    def __init__(self, input_shape: Sequence[int], num_classes: Optional[int] = None, *,
                 model_channels: int = 128, channel_mult: Sequence[int] = (2, 2, 2),
                 channel_mult_emb: int = 4, channel_mult_noise: int = 2, num_blocks: int = 4,
                 attn_resolutions: Sequence[int] = (16,), dropout: float = 0.2,
                 augment_dim: int = 0):
        super().__init__()
        input_shape = tuple(input_shape)
        if len(input_shape) != 3:
            raise ValueError(f"the unet backbone needs image-shaped input (C, H, W), got "
                             f"input_shape {input_shape}; for 2-D points use the 'mlp' backbone")
        channels, height, width = input_shape
        levels = len(channel_mult)
        if levels < 1 or any(int(m) < 1 for m in channel_mult):
            raise ValueError(f"channel_mult must be a non-empty list of ints >= 1, got "
                             f"{list(channel_mult)}")
        if height % 2 ** (levels - 1) or width % 2 ** (levels - 1):
            raise ValueError(f"input size {height}x{width} is not divisible by 2^{levels - 1} "
                             f"for {levels} resolution levels; use fewer channel_mult entries")
        for name, value in (("model_channels", model_channels), ("num_blocks", num_blocks),
                            ("channel_mult_emb", channel_mult_emb),
                            ("channel_mult_noise", channel_mult_noise)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if model_channels % 4:
            raise ValueError(f"model_channels must be divisible by 4 (GroupNorm), got "
                             f"{model_channels}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        if not isinstance(augment_dim, int) or augment_dim < 0:
            raise ValueError(f"augment_dim must be an int >= 0, got {augment_dim!r}")
        if num_classes is not None and (isinstance(num_classes, bool)
                                        or not isinstance(num_classes, int) or num_classes < 1):
            raise ValueError(f"num_classes must be a positive int or None, got {num_classes!r}")
        self.input_shape = input_shape
        self.num_classes = num_classes
        self.augment_dim = augment_dim
        emb_ch = model_channels * channel_mult_emb
        self.noise_channels = model_channels * channel_mult_noise
        cond_ch = 2 * self.noise_channels  # [pe(t), pe(h)]

        # -- mapping network
        self.map_label = nn.Embedding(num_classes + 1, cond_ch) if num_classes else None
        self.map_augment = (_xavier(nn.Linear(augment_dim, cond_ch, bias=False))
                            if augment_dim else None)
        self.map_layer0 = _xavier(nn.Linear(cond_ch, emb_ch))
        self.map_layer1 = _xavier(nn.Linear(emb_ch, emb_ch))

        block = dict(emb_channels=emb_ch, dropout=dropout)
        attn_at = set(int(r) for r in attn_resolutions)
        # -- encoder: every module's output is kept as a skip
        self.enc = nn.ModuleList()
        cout = channels
        for level, mult in enumerate(channel_mult):
            res = height >> level
            if level == 0:
                self.enc.append(_xavier(nn.Conv2d(cout, model_channels, 3, padding=1)))
                cout = model_channels
            else:
                self.enc.append(UNetBlock(cout, cout, down=True, **block))
            for _ in range(num_blocks):
                self.enc.append(UNetBlock(cout, model_channels * mult,
                                          attention=res in attn_at, **block))
                cout = model_channels * mult
        skips = [model_channels] + [m.out_channels for m in self.enc[1:]]

        # -- decoder: blocks whose input is wider than the running activation take a skip
        self.dec = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = height >> level
            if level == levels - 1:
                self.dec.append(UNetBlock(cout, cout, attention=True, **block))
                self.dec.append(UNetBlock(cout, cout, **block))
            else:
                self.dec.append(UNetBlock(cout, cout, up=True, **block))
            for idx in range(num_blocks + 1):
                cin = cout + skips.pop()
                cout = model_channels * mult
                self.dec.append(UNetBlock(cin, cout, attention=idx == num_blocks
                                          and res in attn_at, **block))
        self.out_norm = _group_norm(cout)
        self.out_conv = _xavier(nn.Conv2d(cout, channels, 3, padding=1), gain=0.2)

    def embed(self, t: torch.Tensor, h: torch.Tensor, y: Optional[torch.Tensor],
              augment_labels: Optional[torch.Tensor]) -> torch.Tensor:
        """The per-block conditioning [B, emb_channels]."""
        w = self.map_layer0.weight
        emb = torch.cat([positional_embedding(t, self.noise_channels),
                         positional_embedding(h, self.noise_channels)], dim=1).to(w.dtype)
        if self.map_label is None:
            if y is not None:
                raise ValueError("this backbone is unconditional (num_classes=None) but got "
                                 "labels y; pass y=None or build it with num_classes")
        else:
            if y is None:  # unconditional sample from a conditional model: the null class
                y = torch.full(t.shape, self.num_classes, dtype=torch.long, device=t.device)
            emb = emb + self.map_label(y)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels.to(w.dtype))
        elif augment_labels is not None:
            raise ValueError("augment_labels given but the backbone has augment_dim 0; build it "
                             "with augment_dim set to the augmentation's label count")
        return F.silu(self.map_layer1(F.silu(self.map_layer0(emb))))

    def forward(self, z: torch.Tensor, t: torch.Tensor, h: torch.Tensor,
                y: Optional[torch.Tensor] = None,
                augment_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """z [B, C, H, W], t and h [B] in [0, 1], y [B] long or None, augment_labels
        [B, augment_dim] or None (no augmentation) -> u [B, C, H, W]."""
        emb = self.embed(t, h, y, augment_labels)
        x, skips = z, []
        for i, module in enumerate(self.enc):
            x = module(x) if i == 0 else module(x, emb)
            skips.append(x)
        for module in self.dec:
            if x.shape[1] != module.in_channels:
                x = torch.cat([x, skips.pop()], dim=1)
            x = module(x, emb)
        return self.out_conv(F.silu(self.out_norm(x)))


@BACKBONES.register("unet")
def unet(model_channels: int = 128, channel_mult: Sequence[int] = (2, 2, 2),
         channel_mult_emb: int = 4, channel_mult_noise: int = 2, num_blocks: int = 4,
         attn_resolutions: Sequence[int] = (16,), dropout: float = 0.2, augment_dim: int = 0,
         *, input_shape: Sequence[int], num_classes: Optional[int] = None) -> SongUNet:
    """DDPM++ U-Net with every size parameter exposed (defaults: CIFAR-10 without augmentation)."""
    return SongUNet(input_shape, num_classes, model_channels=model_channels,
                    channel_mult=tuple(channel_mult), channel_mult_emb=channel_mult_emb,
                    channel_mult_noise=channel_mult_noise, num_blocks=num_blocks,
                    attn_resolutions=tuple(attn_resolutions), dropout=dropout,
                    augment_dim=augment_dim)


# name -> settings; "cifar10" is the official MeanFlow CIFAR-10 network, "tiny" for tests.
UNET_SIZES: dict[str, dict] = {
    "cifar10": dict(model_channels=128, channel_mult=(2, 2, 2), channel_mult_emb=4,
                    channel_mult_noise=2, num_blocks=4, attn_resolutions=(16,), dropout=0.2,
                    augment_dim=6),
    "tiny": dict(model_channels=16, channel_mult=(1, 2), channel_mult_emb=2,
                 channel_mult_noise=1, num_blocks=1, attn_resolutions=(16,), dropout=0.0,
                 augment_dim=0),
}
_SUMMARIES = {
    "cifar10": "DDPM++ U-Net, CIFAR-10 (MeanFlow): 128 ch x [2, 2, 2], 4 blocks, attention at "
               "16x16, noise mult 2, dropout 0.2, augment_dim 6; 55.93M parameters unconditional.",
    "tiny": "DDPM++ U-Net for tests and CPU runs: 16 ch x [1, 2], 1 block, attention at 16x16.",
}


def _register_size(size: str) -> None:
    settings = UNET_SIZES[size]
    name = f"unet_{size}"

    def factory(augment_dim: int = settings["augment_dim"], *, input_shape: Sequence[int],
                num_classes: Optional[int] = None) -> SongUNet:
        return SongUNet(input_shape, num_classes, **{**settings, "augment_dim": augment_dim})

    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = _SUMMARIES[size]
    BACKBONES.register(name)(factory)


for _size in UNET_SIZES:
    _register_size(_size)
