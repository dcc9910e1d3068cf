"""From a validated Recipe to components: the only place that wires registries together."""
from __future__ import annotations

import os
from typing import Any

import attrs

from mfrecipes import contracts, plugins, registry
from mfrecipes.errors import RecipeError
from mfrecipes.recipe.schema import COMPONENT_SECTIONS, Recipe, batch_plan  # noqa: F401
from mfrecipes.run.layout import find_init_weights
from mfrecipes.validate import check_param_types


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


def check_world_size(recipe: Recipe, world_size: int) -> None:
    """Whether ``recipe`` can run on ``world_size`` ranks (``mfr check --world-size``, and
    ``mfr run`` under a launcher): the DeepSpeed engine splits the global batch over the ranks;
    the single engine trains in one process."""
    if not isinstance(world_size, int) or world_size < 1:
        raise RecipeError(f"world size must be a positive integer, got {world_size!r}",
                          path="--world-size")
    if recipe.engine != "deepspeed":
        if world_size > 1:
            raise RecipeError(f"engine {recipe.engine!r} trains in one process, but the world "
                              f"size is {world_size}; set engine: deepspeed for several ranks "
                              f"(or run one process)", path="engine")
        return
    batch_plan(recipe.train, world_size)  # stages keep the batch sizes (_STAGE_FIXED)


def _check_single(recipe: Recipe) -> dict[str, Any]:
    import torch

    for section in COMPONENT_SECTIONS:
        block = getattr(recipe, section).as_dict()
        reg = registry_for(section)
        reg.check_params(block, where=section)
        # Each parameter's type, then (attrs components) its validators, named by key path.
        factory = reg.get(block["name"])
        params = block.get("params") or {}
        check_param_types(factory, params, f"{section}.params", skip=reg.runtime_args)
        _check_attrs_params(factory, params, f"{section}.params")
    from mfrecipes.registry import LOGGERS, logger_blocks

    for path, block in logger_blocks(recipe.train.loggers):  # names, params, packages
        check_param_types(LOGGERS.get(block["name"]), block.get("params") or {},
                          f"{path}.params", skip=LOGGERS.runtime_args)
    if recipe.train.augment is not None:
        aug = registry.TRANSFORMS.build(recipe.train.augment.as_dict(), where="train.augment")
        _check_augment_dim(recipe, getattr(aug, "label_dim", None))
    ds_entry = registry.DATASETS.entry(recipe.data.name, where="data.name")
    info = _static_data_info(ds_entry.obj, recipe.data.params)
    if info is None:
        # The data's shape and classes are only known once it is read (e.g. shards without a
        # declared sample_shape): check what does not depend on them.
        sampler = _build(registry.TIMESTEP_SAMPLERS, recipe.timestep_sampler.as_dict(),
                         "timestep_sampler", device=torch.device("cpu"))
        return {"timestep_sampler": sampler}
    parts = build_light(recipe, num_classes=info.num_classes, device=torch.device("cpu"))
    with torch.device("meta"):
        build_backbone(recipe, info)
    return parts.as_dict()


def _check_augment_dim(recipe: Recipe, want: Any) -> None:
    """The transform's label count against the backbone's ``augment_dim`` parameter, without
    building it (the trainer checks the built network again); only for backbones that take the
    parameter."""
    defaults = registry.BACKBONES.entry(recipe.backbone.name, where="backbone.name").parameters()
    if want is None or "augment_dim" not in defaults:
        return
    have = (recipe.backbone.as_dict().get("params") or {}).get("augment_dim",
                                                              defaults["augment_dim"])
    if have != want:
        raise RecipeError(
            f"train.augment {recipe.train.augment.name!r} gives {want} conditioning labels but "
            f"the backbone {recipe.backbone.name!r} takes {have}; set "
            f"backbone.params.augment_dim: {want}", path="backbone.params.augment_dim")


def _check_attrs_params(factory, params: dict, where: str) -> None:
    """Run an attrs component's converters and validators on the recipe's params without
    building it (a dataset is built only by ``mfr run``: it may read or write data), so that
    an invalid value is reported at its own key path. A validator that needs the other fields
    (it reads the instance) is left to the build."""
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
        except Exception:  # noqa: BLE001 - needs the instance; the build checks it
            continue


# -- parameter types -----------------------------------------------------------------------------
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
        block["params"] = _filled(reg, block["name"], params)
    # The metric backends named in train.loggers: each as {name, params}, defaults filled in
    # (null, the default list, stays null: it depends on what is installed).
    train = out.get("train")
    if isinstance(train, dict) and isinstance(train.get("loggers"), list):
        train["loggers"] = [_filled_logger(item) for item in train["loggers"]]
    return out


def _filled(reg: registry.Registry, name: str, params: dict) -> dict:
    full = {k: _plain_default(v) for k, v in reg.entry(name).parameters().items()
            if k not in reg.runtime_args and v is not ... and _plain_default(v) is not ...}
    full.update(params)
    return full


def _filled_logger(item: Any) -> Any:
    block = {"name": item, "params": {}} if isinstance(item, str) else item
    if not isinstance(block, dict) or not isinstance(block.get("name"), str) \
            or block["name"] not in registry.LOGGERS:
        return item  # kept as written: the check reports it
    params = block.get("params") or {}
    if not isinstance(params, dict):
        return item
    return {**block, "params": _filled(registry.LOGGERS, block["name"], params)}


def _plain_default(value: Any) -> Any:
    """A default as YAML can write it (tuples become lists); ``...`` for one it cannot."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        items = [_plain_default(v) for v in value]
        return ... if any(v is ... for v in items) else items
    return ...


def _build(reg: registry.Registry, block: dict, where: str, **runtime: Any) -> Any:
    """``reg.build``; a failure whose reason starts with one parameter's name (``beta_cv must
    be in [0, 1], got 1.5``) is reported at that parameter's key path."""
    import re

    plugins.load_components()
    try:
        return reg.build(block, where=where, **runtime)
    except RecipeError as err:
        reason = err.message.split(": ", 1)[-1]
        params = block.get("params") or {}
        first = re.match(r"[A-Za-z_][A-Za-z0-9_]*", reason)
        if err.path == f"{where}.params" and first and first.group(0) in params:
            raise RecipeError(err.message, path=f"{where}.params.{first.group(0)}") from err
        raise


@attrs.frozen
class LightParts:
    """The light components of one stage (rebuilt at every stage; the backbone and data are
    built once per run)."""

    objective: contracts.Objective
    timestep_sampler: contracts.TimestepSampler
    loss_weighting: contracts.LossWeighting
    gap_schedule: contracts.GapSchedule

    def as_dict(self) -> dict[str, Any]:
        return attrs.asdict(self, recurse=False)


def component_of(recipe: Recipe, section: str) -> contracts.Who:
    """The registered component a recipe section names, for contract errors."""
    return contracts.who(COMPONENT_SECTIONS[section], getattr(recipe, section).name)


def build_light(recipe: Recipe, *, num_classes, device, probe: bool = True) -> LightParts:
    """Build the sampler, weighting, schedule and objective; with ``probe``, check the first
    three's outputs on a tiny batch (``contracts.probe_light``): a broken one is a
    ``ContractError`` here rather than a wrong loss later."""
    sampler = _build(registry.TIMESTEP_SAMPLERS, recipe.timestep_sampler.as_dict(),
                     "timestep_sampler", device=device)
    parts = LightParts(
        objective=_build(registry.OBJECTIVES, recipe.objective.as_dict(), "objective",
                         num_classes=num_classes),
        timestep_sampler=sampler,
        loss_weighting=_build(registry.LOSS_WEIGHTINGS, recipe.loss_weighting.as_dict(),
                              "loss_weighting", timestep_sampler=sampler),
        gap_schedule=_build(registry.GAP_SCHEDULES, recipe.gap_schedule.as_dict(),
                            "gap_schedule", timestep_sampler=sampler),
    )
    if probe:
        contracts.probe_light(parts.timestep_sampler, parts.loss_weighting, parts.gap_schedule,
                              names={s: component_of(recipe, s) for s in
                                     ("timestep_sampler", "loss_weighting", "gap_schedule")},
                              device=device)
    return parts


def build_backbone(recipe: Recipe, info):
    return _build(registry.BACKBONES, recipe.backbone.as_dict(), "backbone",
                  input_shape=tuple(info.sample_shape), num_classes=info.num_classes)


def build_dataset(recipe: Recipe, *, rank: int = 0, world_size: int = 1):
    from mfrecipes.data.cache import default_cache_dir

    return _build(registry.DATASETS, recipe.data.as_dict(), "data", seed=recipe.run.seed,
                  rank=rank, world_size=world_size,
                  cache_dir=os.fspath(default_cache_dir(recipe)))


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
