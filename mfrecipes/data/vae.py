"""The SD-VAE between images and latents: load it, encode images to posteriors, decode latents.

Latent datasets hold the VAE posterior of each image (mean and std, unscaled); training sees
``latent_scale * (mean + std * n)`` (mfrecipes/METHOD.md, section 9). Generated latents are decoded
with ``decode_latents``: divide by the scale, run the decoder, images in [-1, 1]. diffusers is
imported only here, and only when a VAE is loaded (``pip install 'mfrecipes[vae]'``).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from mfrecipes.data.base import DataInfo
from mfrecipes.errors import DataError

SD_VAE = "stabilityai/sd-vae-ft-mse"
SD_SCALE = 0.18215


def _autoencoder_kl():
    try:
        from diffusers import AutoencoderKL
    except ImportError as err:
        raise DataError(f"latent datasets need diffusers for the VAE ({err}); install it with "
                        f"pip install 'mfrecipes[vae]'") from err
    return AutoencoderKL


@functools.lru_cache(maxsize=4)
def _load(id_or_path: str, device: str, dtype: torch.dtype):
    cls = _autoencoder_kl()
    try:
        vae = cls.from_pretrained(id_or_path, torch_dtype=dtype, low_cpu_mem_usage=False)
    except (OSError, ValueError, RuntimeError) as err:
        raise DataError(f"cannot load the VAE {id_or_path!r}: {type(err).__name__}: {err}; "
                        f"valid: a folder written by AutoencoderKL.save_pretrained, or a hub id "
                        f"such as {SD_VAE!r} (downloaded once, needs network access)",
                        path="vae") from err
    vae.requires_grad_(False)
    return vae.eval().to(device)


def load_vae(id_or_path: str, device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32):
    """A diffusers ``AutoencoderKL`` in eval mode without gradients (cached: shared, read-only).

    ``id_or_path``: a local ``save_pretrained`` folder or a hub id (``stabilityai/sd-vae-ft-mse``).
    """
    if not id_or_path:
        raise DataError("no VAE given: the dataset's manifest names none; pass a VAE id or "
                        f"path (e.g. {SD_VAE!r})", path="vae")
    return _load(str(id_or_path), str(torch.device(device)), dtype)


@torch.no_grad()
def encode_images(vae, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior ``(mean, std)`` each ``[B, C, h, w]`` float32 (on ``x``'s device), unscaled, of
    images ``x [B, 3, H, W]`` in [-1, 1]."""
    p = next(vae.parameters())
    dist = vae.encode(x.to(p.device, p.dtype)).latent_dist
    return dist.mean.float().to(x.device), dist.std.float().to(x.device)


@torch.no_grad()
def decode_latents(z: torch.Tensor, info: DataInfo, *, vae=None, batch_size: int = 16,
                   device: Optional[str | torch.device] = None) -> torch.Tensor:
    """Images ``[N, 3, H, W]`` float32 in [-1, 1] on the CPU from scaled latents
    ``z [N, *info.sample_shape]`` (as the model generates them, ``latent_scale`` times the VAE's).

    ``vae``: an ``AutoencoderKL``; None loads ``info.vae`` onto ``device`` (default: ``z``'s).
    Decodes ``batch_size`` latents at a time; the result for all N is held on the CPU, so
    callers with many samples decode in chunks.
    """
    if info.modality != "latent" or info.latent_scale is None:
        raise DataError(f"decode_latents needs a latent dataset with a latent scale; "
                        f"{info.name!r} is {info.modality!r} (scale {info.latent_scale})")
    if tuple(z.shape[1:]) != tuple(info.sample_shape):
        raise ValueError(f"latents of shape {tuple(z.shape)} do not match the dataset's "
                         f"sample shape {tuple(info.sample_shape)}")
    if vae is None:
        vae = load_vae(info.vae, device if device is not None else z.device)
    p = next(vae.parameters())
    out = []
    for chunk in z.split(batch_size):
        latent = chunk.to(p.device, torch.float32) / info.latent_scale
        images = vae.decode(latent.to(p.dtype)).sample
        out.append(images.float().clamp_(-1, 1).cpu())
    if not out:
        return torch.empty((0, 3, 0, 0))
    return torch.cat(out)
