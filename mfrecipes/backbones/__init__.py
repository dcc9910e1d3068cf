"""Backbones: u(z, t, h, y) networks. Importing this package registers ``mlp``, ``dit`` and the
DiT sizes ``dit_{s,b,m,l,xl}_{2,4,8}``, ``dit_tiny_{2,4}``."""
from mfrecipes.backbones import dit, mlp  # noqa: F401  (registration on import)
from mfrecipes.backbones.dit import DiT
from mfrecipes.backbones.mlp import MLP

__all__ = ["DiT", "MLP"]
