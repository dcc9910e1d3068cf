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


def check_recipe(recipe: Recipe, *, for_run: bool = False) -> dict[str, Any]:
    """Everything checkable without data or accelerators (``mfr check``).

    Component names and params are checked against their registries; the light components
    (sampler, weighting, schedule, objective) are built, and the backbone is built on the meta
    device, so parameter validators run too. Returns the built light components.

    ``init_from`` may name a run that an earlier recipe has yet to produce: that is a warning for
    a plain check and an error when ``for_run`` (training is about to start).
    """
    load_imports(recipe)
    plugins.load_components()
    parts = _check_single(recipe)
    plan = stage_plan(recipe)
    if len(plan) > 1:
        for i, stage in enumerate(plan):
            try:
                _check_single(stage.recipe)
            except RecipeError as err:
                raise RecipeError(err.message, path=f"stages[{i}] ({stage.name}): {err.path}"
                                  ) from err
    if recipe.init_from is not None:
        from mfrecipes.errors import CheckpointError

        try:
            find_init_weights(recipe.init_from.path)
        except CheckpointError as err:
            if for_run:
                raise
            import warnings

            warnings.warn(f"{err} (it must exist when training starts)", stacklevel=2)
    return parts


def _check_single(recipe: Recipe) -> dict[str, Any]:
    import torch

    for section in COMPONENT_SECTIONS:
        block = getattr(recipe, section).as_dict()
        registry_for(section).check_params(block, where=section)
    from mfrecipes.train.log import logger_blocks

    logger_blocks(recipe.train.loggers)  # names, params, installed packages
    ds_entry = registry.DATASETS.entry(recipe.data.name, where="data.name")
    _check_attrs_params(ds_entry.obj, recipe.data.params, "data.params")
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


def _check_attrs_params(factory, params: dict, where: str) -> None:
    """Run an attrs component's converters and validators on the recipe's params without
    building it (a dataset is built only by ``mfr run``: it may read or write data)."""
    if not (isinstance(factory, type) and attrs.has(factory)):
        return
    for f in attrs.fields(factory):
        if f.name not in params or not f.init:
            continue
        value = params[f.name]
        try:
            if f.converter is not None:
                value = f.converter(value)
            if f.validator is not None:
                f.validator(None, f, value)
        except (ValueError, TypeError) as err:
            raise RecipeError(f"invalid {f.name}: {err}", path=f"{where}.{f.name}") from err


def _static_data_info(factory, params):
    """A dataset may expose ``static_info(**params)`` so that checks need no data on disk."""
    fn = getattr(factory, "static_info", None)
    if fn is None:
        return None
    try:
        return fn(**params)
    except (ValueError, TypeError) as err:
        raise RecipeError(str(err), path="data.params") from err


def with_component_defaults(resolved: dict) -> dict:
    """A copy of a resolved recipe mapping in which every component block lists all of its
    component's parameters, the defaults filled in (``mfr show``, ``recipe.resolved.yaml``), so
    a recorded run keeps its meaning when a default changes. Runtime arguments and required
    parameters without a value are not added; a block naming an unknown component is kept as
    written (the check reports it)."""
    import copy

    plugins.load_components()
    out = copy.deepcopy(resolved)
    for section in COMPONENT_SECTIONS:
        block = out.get(section)
        if not isinstance(block, dict) or not isinstance(block.get("name"), str):
            continue
        reg = registry_for(section)
        if block["name"] not in reg:
            continue
        params = block.get("params") or {}
        if not isinstance(params, dict):
            continue
        full = {k: _plain_default(v) for k, v in reg.entry(block["name"]).parameters().items()
                if k not in reg.runtime_args and v is not ... and _plain_default(v) is not ...}
        full.update(params)
        block["params"] = full
    return out


def _plain_default(value: Any) -> Any:
    """A default as YAML can write it (tuples become lists); ``...`` for one it cannot."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        items = [_plain_default(v) for v in value]
        return ... if any(v is ... for v in items) else items
    return ...


def build_light(recipe: Recipe, *, num_classes, device) -> dict[str, Any]:
    plugins.load_components()
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
    plugins.load_components()
    return registry.BACKBONES.build(recipe.backbone.as_dict(), where="backbone",
                                    input_shape=tuple(info.sample_shape),
                                    num_classes=info.num_classes)


def build_dataset(recipe: Recipe, *, rank: int = 0, world_size: int = 1):
    plugins.load_components()
    return registry.DATASETS.build(recipe.data.as_dict(), where="data", seed=recipe.run.seed,
                                   rank=rank, world_size=world_size,
                                   cache_dir=default_cache_dir(recipe))


def describe(component: Any) -> str:
    """A one-line description for logs: attrs repr, or the class name for modules."""
    if attrs.has(type(component)):
        return repr(component)
    return type(component).__name__


# Keys a stage may not override: they define the run itself, or the weights carried across stages.
_STAGE_FIXED = ("run", "stages", "init_from", "backbone", "engine", "deepspeed", "data",
                "imports", "train.total_images", "train.ema_decays", "train.global_batch_size",
                "train.micro_batch_size")


@attrs.frozen
class Stage:
    name: str
    start: int          # images seen when the stage begins
    end: int            # images seen when it ends
    recipe: Recipe      # the recipe with the stage's overrides applied


def stage_plan(recipe: Recipe) -> list[Stage]:
    """The stages of a run in image order; a recipe without ``stages`` is one stage."""
    from mfrecipes.recipe.load import apply_overrides

    total = recipe.train.total_images
    if not recipe.stages:
        return [Stage("main", 0, total, recipe)]
    budget = sum(s.images for s in recipe.stages)
    if budget != total:
        raise RecipeError(f"the stages' images add up to {budget}, but train.total_images is "
                          f"{total}; make them equal", path="stages")
    base = recipe.to_dict()
    plan, start = [], 0
    for i, st in enumerate(recipe.stages):
        where = f"stages[{i}].overrides"
        for key in st.overrides:
            if any(key == f or key.startswith(f + ".") for f in _STAGE_FIXED):
                raise RecipeError(f"a stage cannot override {key!r} (fixed for the whole run: "
                                  f"{', '.join(_STAGE_FIXED)})", path=f"{where}.{key}")
        texts = [f"{k}={_yaml_value(v)}" for k, v in st.overrides.items()]
        try:
            stage_recipe = Recipe.from_dict(apply_overrides(base, texts))
        except RecipeError as err:
            raise RecipeError(err.message, path=f"{where}: {err.path}" if err.path else where
                              ) from err
        plan.append(Stage(st.name, start, start + st.images, stage_recipe))
        start += st.images
    names = [s.name for s in plan]
    if len(set(names)) != len(names):
        raise RecipeError(f"stage names must be unique, got {names}", path="stages")
    return plan


def _yaml_value(v: Any) -> str:
    import json

    return json.dumps(v)  # JSON is YAML: lists, numbers, strings and nulls round-trip


def find_init_weights(path: str) -> str:
    """The weights file behind ``init_from.path``: a run directory, a checkpoint folder or a file."""
    import os

    from mfrecipes.errors import CheckpointError
    from mfrecipes.train import checkpoint as ckpt

    where = "init_from.path"
    if os.path.isfile(path) and path.endswith(".safetensors"):
        return path
    if os.path.isfile(os.path.join(path, ckpt.WEIGHTS)):
        return os.path.join(path, ckpt.WEIGHTS)
    latest = ckpt.latest_checkpoint(os.path.join(path, "checkpoints"))
    if latest is not None:
        return os.path.join(latest, ckpt.WEIGHTS)
    raise CheckpointError(f"no weights at {path!r}: expected a run directory with checkpoints/, a "
                          f"checkpoint folder holding {ckpt.WEIGHTS}, or a .safetensors file",
                          path=where)
