"""Which torch device a run, a sampler or an evaluation uses (the one ``pick_device``)."""
from __future__ import annotations

from typing import Optional

import torch

from mfrecipes.errors import RecipeError


def pick_device(name: Optional[str], *, where: str = "run.device") -> torch.device:
    """``auto`` (or None): CUDA when available, else the CPU; otherwise the named device. A CUDA
    device asked for where there is none is a ``RecipeError`` at ``where`` (the recipe key or
    the command-line option that named it)."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RecipeError(f"{where} is {name!r} but no CUDA device is available; use 'auto' or "
                          f"'cpu'", path=where)
    return torch.device(name)
