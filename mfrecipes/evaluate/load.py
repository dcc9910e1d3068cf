"""A trained network from a run directory: its recipe, its data, one checkpoint's weights.

Sampling and evaluation read only the plain ``weights.safetensors`` of a checkpoint (never an
engine's format), so they work whatever engine or world size trained the run.
"""
from __future__ import annotations

import os
from typing import Any, Optional, Union

import attrs
import torch
from torch import nn

from mfrecipes.data.base import DataInfo
from mfrecipes.errors import CheckpointError, RecipeError
# Finding weights in a run directory is the run directory's own business.
from mfrecipes.run.layout import RESOLVED, find_checkpoint, select_weights

__all__ = ["LoadedRun", "load_run", "select_weights", "find_checkpoint", "run_data"]


@attrs.frozen
class LoadedRun:
    """One network ready to sample: ``net`` holds the ``weights`` group (``net`` = raw weights,
    ``ema_<decay>``) of checkpoint folder ``checkpoint``, trained for ``images`` images."""

    run_dir: str
    checkpoint: str
    weights: str
    images: int
    info: DataInfo
    recipe: Any = attrs.field(repr=False)
    net: nn.Module = attrs.field(repr=False)
    dataset: Any = attrs.field(default=None, repr=False)   # built only when the info needed it

    @property
    def checkpoint_name(self) -> str:
        return os.path.basename(os.path.normpath(self.checkpoint))

    def get_dataset(self):
        """The run's dataset (built on first use: embedded sets are cheap, shards read a
        manifest)."""
        if self.dataset is None:
            from mfrecipes.build import build_dataset

            object.__setattr__(self, "dataset", build_dataset(self.recipe))
        return self.dataset


def _read_recipe(run_dir: str, *, allow_imports: bool = False):
    """The run's recipe. Its ``imports:`` are code named by the run directory: they are
    imported only with ``allow_imports`` (``--allow-imports``), else refused unless this
    process imported them already."""
    from mfrecipes import plugins
    from mfrecipes.recipe import load_recipe
    from mfrecipes.build import load_imports

    path = os.path.join(run_dir, RESOLVED)
    if not os.path.isfile(path):
        raise RecipeError(f"{run_dir!r} is not a run directory (no {RESOLVED}); pass the folder "
                          f"`mfr run` wrote (e.g. runs/<name>)")
    recipe, _ = load_recipe(path)
    pending = [m for m in recipe.imports if m not in plugins.imported_modules()]
    if pending and not allow_imports:
        raise RecipeError(f"run {run_dir} names modules to import ({', '.join(pending)}): code "
                          f"from the run directory, not imported by default; pass "
                          f"--allow-imports if you trust this run", path="imports")
    load_imports(recipe)  # a recipe's own modules register its components
    plugins.load_components()
    return recipe


def run_data(recipe) -> tuple[DataInfo, Any]:
    """``(info, dataset or None)``: the static description when the dataset class gives one
    (embedded sets, shards with a declared shape), else the built dataset's."""
    from mfrecipes import registry
    from mfrecipes.build import build_dataset

    factory = registry.DATASETS.entry(recipe.data.name, where="data.name").obj
    static = getattr(factory, "static_info", None)
    info = None
    if static is not None:
        try:
            info = static(**recipe.data.params)
        except (TypeError, ValueError):
            info = None
    # Latent sets: the VAE and scale usually live in the shards' manifest.
    if info is None or info.modality == "latent":
        dataset = build_dataset(recipe)
        return dataset.info, dataset
    return info, None


def load_run(run_dir: Union[str, os.PathLike], *, checkpoint: Optional[str] = None,
             weights: str = "ema", device: Union[str, torch.device] = "cpu") -> LoadedRun:
    """Build the run's backbone and load one checkpoint's ``weights`` (``ema``, ``raw`` or a
    group name) onto ``device`` in eval mode."""
    from mfrecipes.build import build_backbone
    from mfrecipes.run.layout import load_meta
    from mfrecipes.train import checkpoint as ckpt

    run_dir = os.fspath(run_dir)
    recipe = _read_recipe(run_dir)
    folder = find_checkpoint(run_dir, checkpoint)
    meta = load_meta(folder)
    groups = ckpt.load_weights(folder)
    key = select_weights(groups, weights, order=meta.get("ema"))
    info, dataset = run_data(recipe)
    shape = meta.get("sample_shape")
    if shape is not None and tuple(shape) != tuple(info.sample_shape):
        raise CheckpointError(f"checkpoint {folder} was trained on samples of shape {shape}, but "
                              f"the run's data now gives {list(info.sample_shape)}")
    with torch.random.fork_rng(devices=[]):  # building must not disturb the caller's RNG
        net = build_backbone(recipe, info)
    try:
        net.load_state_dict(groups[key], strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"weights {key!r} of {folder} do not fit the run's backbone "
                              f"{recipe.backbone.name!r}: {err}") from err
    net = net.to(device).float().eval().requires_grad_(False)
    return LoadedRun(run_dir=run_dir, checkpoint=folder, weights=key,
                     images=int(meta.get("images", 0)), info=info, recipe=recipe, net=net,
                     dataset=dataset)
