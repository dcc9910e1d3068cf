"""Non-leaking augmentation for image training (the EDM scheme, Karras et al. 2022): geometric,
and colour when asked for.

Each transform is applied to a sample independently with probability ``p``; its parameters are
returned as conditioning labels, zero when the transform was not applied. The network sees the
labels (``augment_labels`` of the U-Net), so it learns the augmented images as a separate,
labelled distribution; sampling passes no labels (the same as zeros: the label projection has no
bias), which asks for the un-augmented distribution, and augmented images do not leak into it.

The six geometric labels, in order (``LABELS``):

0. ``xflip``: 1 when the image was mirrored left-right;
1. ``translate_x``, 2. ``translate_y``: the integer shift in pixels divided by the width / height
   (the shift is a uniform draw in ``[-translate, translate]`` of the size, rounded); the image is
   extended by reflection at the border;
3. ``scale``: log2 of the isotropic scale factor, ``N(0, scale_std^2)``;
4. ``rotate``: the rotation angle divided by pi, uniform in ``[-rotate_max, rotate_max]`` / pi
   (positive: counter-clockwise as displayed, row 0 on top; +90 degrees is
   ``torch.rot90(x, 1, dims=(-2, -1))``);
5. ``aniso``: log2 of the anisotropic factor (x stretched by ``2^a``, y by ``2^-a``),
   ``N(0, aniso_std^2)``.

Flip and integer translation are exact pixel moves. Scaling, rotation and the anisotropic stretch
are composed into one affine map and resampled once (bilinear, reflection at the border), only on
the rows that drew at least one of them; every other row is returned bit for bit.

Colour (``colour: true``) appends six labels (``COLOUR_LABELS``), so ``label_dim`` is 12:

6. ``brightness``: ``b ~ N(0, brightness_std^2)``, added to every channel;
7. ``contrast``: log2 of the factor ``c``, ``N(0, contrast_std^2)``; every channel is multiplied
   by ``c``, i.e. scaled about 0, the mid grey of data in [-1, 1] (not about the image's mean:
   the transform stays one colour matrix for every pixel);
8. ``luma_flip``: 1 when the luma was negated (a fair coin when the transform is drawn): the
   reflection ``I - 2 v v^T`` through the plane orthogonal to the grey axis, which maps each
   pixel's luma ``l`` to ``-l`` and keeps its chroma;
9. ``hue_cos``, 10. ``hue_sin``: ``cos(theta) - 1`` and ``sin(theta)`` of a rotation about the
   grey axis by ``theta`` uniform in ``[-hue_max, hue_max]`` (both zero for no rotation;
   positive angles turn red towards green: +120 degrees moves R to G, G to B, B to R);
11. ``saturation``: log2 of the factor ``s``, ``N(0, saturation_std^2)``; the chroma (the part of
    each pixel orthogonal to the grey axis) is multiplied by ``s``, the luma kept (``s = 0``
    would give grey).

Here the grey axis is ``v = (1, 1, 1) / sqrt(3)`` and a pixel's luma is the mean of its three
channels (the grey axis of the colour cube, not a perceptual weighting). The five are composed in
that order (brightness first, saturation last) into one affine colour matrix per image, applied
to the RGB vector of every pixel after the geometric part; rows that drew none of them are
returned bit for bit. An image with one channel gets only brightness and contrast (its labels
8-11 stay zero); other channel counts are refused with ``colour: true``.

All draws come from the ``generator`` passed in (the trainer's ``augment`` stream): the same
number of draws per batch whatever ``p`` is (12 per row, 22 with colour; the colour draws follow
the geometric ones, so the geometric labels are the same with or without colour), and the
stream's position depends only on the batch count.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from mfrecipes.registry import TRANSFORMS

__all__ = ["LABELS", "COLOUR_LABELS", "EdmAugment", "geometric", "colour",
           "colour_matrix", "translate_reflect", "LabelChannels"]

LABELS = ("xflip", "translate_x", "translate_y", "scale", "rotate", "aniso")
COLOUR_LABELS = ("brightness", "contrast", "luma_flip", "hue_cos", "hue_sin", "saturation")


def _check(name: str, value, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value!r}")
    return float(value)


def _reflect_index(i: torch.Tensor, n: int) -> torch.Tensor:
    """Reflection without repeating the edge (..., 2, 1, [0, 1, ..., n-1], n-2, ...)."""
    if n == 1:
        return torch.zeros_like(i)
    period = 2 * (n - 1)
    i = torch.remainder(i, period)
    return torch.where(i >= n, period - i, i)


def translate_reflect(x: torch.Tensor, tx: torch.Tensor, ty: torch.Tensor) -> torch.Tensor:
    """``out[b, :, i, j] = x[b, :, reflect(i - ty[b]), reflect(j - tx[b])]``: an integer shift
    right by ``tx`` and down by ``ty`` pixels with the border extended by reflection."""
    b, _, h, w = x.shape
    rows = _reflect_index(torch.arange(h, device=x.device)[None, :] - ty[:, None].long(), h)
    cols = _reflect_index(torch.arange(w, device=x.device)[None, :] - tx[:, None].long(), w)
    idx_r = rows[:, None, :, None].expand(b, x.shape[1], h, w)
    out = torch.gather(x, 2, idx_r)
    idx_c = cols[:, None, None, :].expand(b, x.shape[1], h, w)
    return torch.gather(out, 3, idx_c)


def geometric(x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Apply the transforms that ``labels [B, 6]`` describe (see the module docstring) to
    ``x [B, C, H, W]``; rows whose continuous labels (3-5) are all zero are not resampled."""
    if x.ndim != 4 or labels.shape != (x.shape[0], len(LABELS)):
        raise ValueError(f"need x [B, C, H, W] and labels [B, {len(LABELS)}], got "
                         f"{tuple(x.shape)} and {tuple(labels.shape)}")
    _, _, h, w = x.shape
    flip = labels[:, 0] != 0
    out = torch.where(flip[:, None, None, None], x.flip(-1), x)
    tx = torch.round(labels[:, 1] * w)
    ty = torch.round(labels[:, 2] * h)
    if bool((tx != 0).any() or (ty != 0).any()):
        out = translate_reflect(out, tx, ty)
    cont = (labels[:, 3:] != 0).any(dim=1)
    if bool(cont.any()):
        rows = cont.nonzero().flatten()
        lab = labels[rows].double()
        s = torch.exp2(lab[:, 3])
        a = torch.exp2(lab[:, 5])
        theta = lab[:, 4] * math.pi
        cos, sin = torch.cos(theta), torch.sin(theta)
        # Output pixel p maps to input pixel M^-1 p (normalised coordinates, centre 0): the image
        # is rotated by theta, then scaled by s (x by s a, y by s / a). In pixel units, so that a
        # rotation of a non-square image stays a rotation.
        sx, sy = s * a, s / a
        inv = torch.zeros(len(rows), 2, 2, dtype=torch.float64, device=x.device)
        inv[:, 0, 0] = cos / sx
        inv[:, 0, 1] = -sin / sy
        inv[:, 1, 0] = sin / sx
        inv[:, 1, 1] = cos / sy
        # normalised -> pixels (x: w / 2, y: h / 2) -> inverse map -> normalised
        to_px = torch.tensor([w / 2.0, h / 2.0], dtype=torch.float64, device=x.device)
        theta_mat = inv * to_px[None, None, :] / to_px[None, :, None]
        affine = torch.cat([theta_mat, theta_mat.new_zeros(len(rows), 2, 1)], dim=2)
        grid = F.affine_grid(affine, [len(rows), x.shape[1], h, w], align_corners=False)
        sub = F.grid_sample(out[rows].double(), grid, mode="bilinear",
                            padding_mode="reflection", align_corners=False)
        out = out.clone()
        out[rows] = sub.to(x.dtype)
    return out


def colour_matrix(labels: torch.Tensor) -> torch.Tensor:
    """``[B, 4, 4]`` float64: the affine colour map (homogeneous RGB) that the colour labels
    ``[B, 6]`` (``COLOUR_LABELS``) describe, brightness applied first and saturation last."""
    if labels.ndim != 2 or labels.shape[1] != len(COLOUR_LABELS):
        raise ValueError(f"need colour labels [B, {len(COLOUR_LABELS)}], got {tuple(labels.shape)}")
    lab = labels.double()
    n, dev = lab.shape[0], lab.device
    eye = torch.eye(4, dtype=torch.float64, device=dev).expand(n, 4, 4)
    v = torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=torch.float64, device=dev) / math.sqrt(3.0)
    vv = torch.outer(v, v).expand(n, 4, 4)
    # brightness: + b on R, G, B
    bright = eye.clone()
    bright[:, :3, 3] = lab[:, 0:1]
    # contrast: R, G, B times c
    c = torch.exp2(lab[:, 1])
    contrast = eye.clone()
    contrast[:, 0, 0] = contrast[:, 1, 1] = contrast[:, 2, 2] = c
    # luma flip: reflection with normal v
    flip = eye - 2.0 * vv * lab[:, 2, None, None]
    # hue: rotation by theta about v (Rodrigues), on the RGB block
    theta = torch.atan2(lab[:, 4], lab[:, 3] + 1.0)
    cos, sin = torch.cos(theta), torch.sin(theta)
    cross = torch.zeros(n, 4, 4, dtype=torch.float64, device=dev)   # [v]_x, v = (1, 1, 1)/sqrt 3
    k = 1.0 / math.sqrt(3.0)
    cross[:, 0, 1], cross[:, 0, 2] = -k, k
    cross[:, 1, 0], cross[:, 1, 2] = k, -k
    cross[:, 2, 0], cross[:, 2, 1] = -k, k
    eye3 = torch.diag(torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=torch.float64, device=dev))
    hue = (cos[:, None, None] * eye3 + sin[:, None, None] * cross
           + (1.0 - cos)[:, None, None] * vv)
    hue[:, 3, 3] = 1.0
    # saturation: chroma (the part orthogonal to v) times s
    s = torch.exp2(lab[:, 5])
    sat = vv + (eye - vv) * s[:, None, None]
    return sat @ hue @ flip @ contrast @ bright


def colour(x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Apply the colour transforms that ``labels [B, 6]`` (``COLOUR_LABELS``) describe to
    ``x [B, C, H, W]``, C = 3 (RGB) or 1 (brightness and contrast only: labels 2-5 must be zero);
    rows whose labels are all zero are returned bit for bit."""
    if x.ndim != 4 or labels.shape != (x.shape[0], len(COLOUR_LABELS)):
        raise ValueError(f"need x [B, C, H, W] and colour labels [B, {len(COLOUR_LABELS)}], got "
                         f"{tuple(x.shape)} and {tuple(labels.shape)}")
    c = x.shape[1]
    if c not in (1, 3):
        raise ValueError(f"colour augmentation needs 1 or 3 channels, got {c}")
    if c == 1 and bool((labels[:, 2:] != 0).any()):
        raise ValueError("a 1-channel image takes only brightness and contrast (labels 0-1)")
    rows = (labels != 0).any(dim=1).nonzero().flatten()
    if len(rows) == 0:
        return x
    m = colour_matrix(labels[rows])
    sub = x[rows].double()
    if c == 3:
        new = torch.einsum("bij,bjhw->bihw", m[:, :3, :3], sub) + m[:, :3, 3, None, None]
    else:  # m restricted to the grey line: c (x + b)
        new = m[:, 0, 0, None, None, None] * sub + m[:, 0, 3, None, None, None]
    out = x.clone()
    out[rows] = new.to(x.dtype)
    return out


@TRANSFORMS.register("edm_augment")
class EdmAugment:
    """Non-leaking EDM augmentation: geometric (6 labels); colour too with colour: true (12).

    Geometric: x-flip, integer translation, isotropic scaling, rotation, anisotropic scaling.
    Colour (``colour: true``, RGB; a 1-channel image gets brightness and contrast only):
    brightness, contrast, luma flip, hue rotation, saturation. Each transform is applied with
    probability p per sample; its parameters are the conditioning labels (zero where not
    applied), ``label_dim`` of them: the backbone's ``augment_dim``. The label layout and each
    transform's definition are in the module documentation of ``mfrecipes.data.augment``.

    Parameters
    ----------
    p: probability of each transform, per sample (EDM uses 0.12 for CIFAR-10).
    translate: the largest integer shift, as a fraction of the image size (0.125).
    scale_std: standard deviation of log2 of the isotropic scale (0.2).
    rotate_max: the largest rotation angle in degrees (180: any angle).
    aniso_std: standard deviation of log2 of the anisotropic factor (0.2).
    colour: add the colour transforms and their 6 labels (false: the 6 geometric labels only).
    brightness_std: standard deviation of the added brightness (0.2).
    contrast_std: standard deviation of log2 of the contrast factor (0.5).
    hue_max: the largest hue rotation in degrees (180: any angle).
    saturation_std: standard deviation of log2 of the saturation factor (1.0).
    """

    def __init__(self, p: float = 0.12, translate: float = 0.125, scale_std: float = 0.2,
                 rotate_max: float = 180.0, aniso_std: float = 0.2, colour: bool = False,
                 brightness_std: float = 0.2, contrast_std: float = 0.5, hue_max: float = 180.0,
                 saturation_std: float = 1.0):
        self.p = _check("p", p, 0.0, 1.0)
        self.translate = _check("translate", translate, 0.0, 0.5)
        self.scale_std = _check("scale_std", scale_std, 0.0, 2.0)
        self.rotate_max = _check("rotate_max", rotate_max, 0.0, 180.0)
        self.aniso_std = _check("aniso_std", aniso_std, 0.0, 2.0)
        if not isinstance(colour, bool):
            raise ValueError(f"colour must be true or false, got {colour!r}")
        self.colour = colour
        self.brightness_std = _check("brightness_std", brightness_std, 0.0, 2.0)
        self.contrast_std = _check("contrast_std", contrast_std, 0.0, 2.0)
        self.hue_max = _check("hue_max", hue_max, 0.0, 180.0)
        self.saturation_std = _check("saturation_std", saturation_std, 0.0, 4.0)
        self.label_dim = len(LABELS) + (len(COLOUR_LABELS) if colour else 0)

    def __repr__(self) -> str:
        text = (f"EdmAugment(p={self.p}, translate={self.translate}, scale_std={self.scale_std}, "
                f"rotate_max={self.rotate_max}, aniso_std={self.aniso_std}")
        if self.colour:
            text += (f", colour=True, brightness_std={self.brightness_std}, contrast_std="
                     f"{self.contrast_std}, hue_max={self.hue_max}, saturation_std="
                     f"{self.saturation_std}")
        return text + ")"

    def check_channels(self, channels: int) -> None:
        """Refuse a channel count the colour transforms do not define (only with colour)."""
        if self.colour and channels not in (1, 3):
            raise ValueError(f"colour: true needs RGB (3 channels) or grey (1) images, got "
                             f"{channels} channels; valid: colour: false for other data")

    def draw(self, batch: int, h: int, w: int, generator: Optional[torch.Generator] = None,
             channels: int = 3) -> torch.Tensor:
        """``labels [B, label_dim]`` (float32, CPU): the parameters of each row, zeros where a
        transform was not drawn. Always 5 + 7 numbers per row from ``generator``, and 5 + 5
        more with colour; with ``channels`` 1 the luma flip, hue and saturation labels are zero
        (their numbers are still drawn)."""
        apply = torch.rand(batch, 5, generator=generator) < self.p
        flip = (torch.rand(batch, generator=generator) < 0.5).float()
        shift = (torch.rand(batch, 2, generator=generator) * 2 - 1) * self.translate
        tx = torch.round(shift[:, 0] * w) / w
        ty = torch.round(shift[:, 1] * h) / h
        scale = torch.randn(batch, generator=generator) * self.scale_std
        rotate = (torch.rand(batch, generator=generator) * 2 - 1) * (self.rotate_max / 180.0)
        aniso = torch.randn(batch, generator=generator) * self.aniso_std
        labels = torch.stack([flip, tx, ty, scale, rotate, aniso], dim=1)
        mask = torch.stack([apply[:, 0], apply[:, 1], apply[:, 1], apply[:, 2], apply[:, 3],
                            apply[:, 4]], dim=1)
        labels = torch.where(mask, labels, torch.zeros_like(labels))
        if not self.colour:
            return labels
        self.check_channels(channels)
        apply = torch.rand(batch, 5, generator=generator) < self.p
        if channels == 1:
            apply[:, 2:] = False
        bright = torch.randn(batch, generator=generator) * self.brightness_std
        contrast = torch.randn(batch, generator=generator) * self.contrast_std
        luma = (torch.rand(batch, generator=generator) < 0.5).float()
        theta = ((torch.rand(batch, generator=generator, dtype=torch.float64) * 2 - 1)
                 * (self.hue_max / 180.0 * math.pi))
        sat = torch.randn(batch, generator=generator) * self.saturation_std
        col = torch.stack([bright, contrast, luma, (torch.cos(theta) - 1).float(),
                           torch.sin(theta).float(), sat], dim=1)
        mask = torch.stack([apply[:, 0], apply[:, 1], apply[:, 2], apply[:, 3], apply[:, 3],
                            apply[:, 4]], dim=1)
        col = torch.where(mask, col, torch.zeros_like(col))
        return torch.cat([labels, col], dim=1)

    def __call__(self, x: torch.Tensor, generator: Optional[torch.Generator] = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [B, C, H, W] -> (augmented x, labels [B, label_dim])``, labels on x's device and
        dtype: the geometric part, then the colour part."""
        if x.ndim != 4:
            raise ValueError(f"edm_augment needs image batches [B, C, H, W], got shape "
                             f"{tuple(x.shape)}")
        labels = self.draw(x.shape[0], x.shape[2], x.shape[3], generator, channels=x.shape[1])
        labels = labels.to(device=x.device, dtype=x.dtype)
        if self.p == 0:
            return x, labels
        n = len(LABELS)
        out = geometric(x, labels[:, :n])
        if self.colour:
            out = colour(out, labels[:, n:])
        return out, labels


class LabelChannels(torch.nn.Module):
    """The network for an augmented step: its input carries the labels as extra channels.

    The trainer appends the ``[B, A]`` labels to both ``x`` and the noise as ``A`` constant
    planes. On the linear path ``z_t = (1 - t) x + t e`` those planes stay the labels exactly
    (two equal values interpolated) and ``v = e - x`` is zero there, for every row subset an
    objective takes and every time it evaluates the net at. This module reads the labels off the
    planes, calls ``net(z, t, h, y, augment_labels=labels)`` on the image channels and returns
    zero velocity on the label planes, so every error, target and JVP tangent over them is zero
    (the tangent of the labels is ``v = 0`` there) and no objective needs to know about labels.
    """

    def __init__(self, net: torch.nn.Module, image_channels: int):
        super().__init__()
        self.net = net
        self.image_channels = int(image_channels)

    def forward(self, z: torch.Tensor, t: torch.Tensor, h: torch.Tensor,
                y: Optional[torch.Tensor] = None) -> torch.Tensor:
        c = self.image_channels
        labels = z[:, c:].mean(dim=(2, 3))
        u = self.net(z[:, :c], t, h, y, augment_labels=labels)
        return torch.cat([u, u.new_zeros(u.shape[0], z.shape[1] - c, *u.shape[2:])], dim=1)

    @staticmethod
    def planes(x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``x [B, C, H, W]`` with ``labels [B, A]`` appended as A constant planes."""
        b, _, h, w = x.shape
        return torch.cat([x, labels.to(x.dtype)[:, :, None, None].expand(b, -1, h, w)], dim=1)
