"""Backbones: u(z, t, h, y) networks. Importing this package registers ``mlp``, ``dit`` and the
DiT sizes ``dit_{s,b,m,l,xl}_{2,4,8}``, ``dit_tiny_{2,4}``, and the DDPM++ U-Net ``unet``,
``unet_cifar10``, ``unet_tiny``."""
from mfrecipes.backbones import dit, mlp, unet  # noqa: F401  (registration on import)
from mfrecipes.backbones.dit import DiT
from mfrecipes.backbones.mlp import MLP
from mfrecipes.backbones.unet import SongUNet

__all__ = ["DiT", "MLP", "SongUNet"]
