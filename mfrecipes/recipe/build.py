"""From a validated Recipe to components: the only place that wires registries together."""
from __future__ import annotations

import os
from typing import Any

import attrs

from mfrecipes import plugins, registry
from mfrecipes.errors import RecipeError
from mfrecipes.recipe.schema import COMPONENT_SECTIONS, Recipe


def default_cache_dir(recipe: Recipe | None = None) -> str:
    if recipe is not None and recipe.run.cache_dir:
        return os.path.expanduser(recipe.run.cache_dir)
    return os.path.expanduser(os.environ.get("MFR_CACHE_DIR", "~/.cache/mfrecipes"))


def load_imports(recipe: Recipe) -> None:
    if recipe.imports:
        plugins.import_modules(list(recipe.imports), base_dir=os.getcwd())


def registry_for(section: str) -> registry.Registry:
    return registry.ALL_REGISTRIES[COMPONENT_SECTIONS[section]]


def check_recipe(recipe: Recipe) -> dict[str, Any]:
    """Everything checkable without data or accelerators (``mfr check``).

    Component names and params are checked against their registries; the light components
    (sampler, weighting, schedule, objective) are built, and the backbone is built on the meta
    device, so parameter validators run too. Returns the built light components.
    """
    import torch

    load_imports(recipe)
    registry.ensure_builtins()
    for section in COMPONENT_SECTIONS:
        block = getattr(recipe, section).as_dict()
        registry_for(section).check_params(block, where=section)
    ds_entry = registry.DATASETS.entry(recipe.data.name, where="data.name")
    info = _static_data_info(ds_entry.obj, recipe.data.params)
    if info is None:
        # The data's shape and classes are only known once it is read (e.g. shards without a
        # declared sample_shape): check what does not depend on them.
        sampler = registry.TIMESTEP_SAMPLERS.build(recipe.timestep_sampler.as_dict(),
                                                   where="timestep_sampler",
                                                   device=torch.device("cpu"))
        return {"timestep_sampler": sampler}
    parts = build_light(recipe, num_classes=info.num_classes, device=torch.device("cpu"))
    with torch.device("meta"):
        build_backbone(recipe, info)
    return parts


def _static_data_info(factory, params):
    """A dataset may expose ``static_info(**params)`` so that checks need no data on disk."""
    fn = getattr(factory, "static_info", None)
    if fn is None:
        return None
    try:
        return fn(**params)
    except (ValueError, TypeError) as err:
        raise RecipeError(str(err), path="data.params") from err


def build_light(recipe: Recipe, *, num_classes, device) -> dict[str, Any]:
    sampler = registry.TIMESTEP_SAMPLERS.build(recipe.timestep_sampler.as_dict(),
                                               where="timestep_sampler", device=device)
    return {
        "objective": registry.OBJECTIVES.build(recipe.objective.as_dict(), where="objective",
                                               num_classes=num_classes),
        "timestep_sampler": sampler,
        "loss_weighting": registry.LOSS_WEIGHTINGS.build(
            recipe.loss_weighting.as_dict(), where="loss_weighting", timestep_sampler=sampler),
        "gap_schedule": registry.GAP_SCHEDULES.build(
            recipe.gap_schedule.as_dict(), where="gap_schedule", timestep_sampler=sampler),
    }


def build_backbone(recipe: Recipe, info):
    return registry.BACKBONES.build(recipe.backbone.as_dict(), where="backbone",
                                    input_shape=tuple(info.sample_shape),
                                    num_classes=info.num_classes)


def build_dataset(recipe: Recipe, *, rank: int = 0, world_size: int = 1):
    return registry.DATASETS.build(recipe.data.as_dict(), where="data", seed=recipe.run.seed,
                                   rank=rank, world_size=world_size,
                                   cache_dir=default_cache_dir(recipe))


def describe(component: Any) -> str:
    """A one-line description for logs: attrs repr, or the class name for modules."""
    if attrs.has(type(component)):
        return repr(component)
    return type(component).__name__
