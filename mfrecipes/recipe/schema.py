"""The recipe schema: one frozen attrs class per top-level section, validated on construction.

``Recipe.from_dict`` turns a merged YAML mapping into typed sections. Every error names the dotted
key path (``train.lr``) and what would be valid; component blocks (``{name, params}``) are checked
against their registry by ``mfrecipes.build.check_recipe``.
"""
from __future__ import annotations

import difflib
import math
import typing
from typing import Any, Literal, Optional, Union

import attrs

from mfrecipes.errors import RecipeError

COMPONENT_SECTIONS = {
    "data": "dataset",
    "backbone": "backbone",
    "objective": "objective",
    "timestep_sampler": "timestep_sampler",
    "loss_weighting": "loss_weighting",
    "gap_schedule": "gap_schedule",
}


def _positive(inst, attribute, value):
    if value is not None and value <= 0:
        raise ValueError(f"must be > 0, got {value!r}")


def _non_negative(inst, attribute, value):
    if value is not None and value < 0:
        raise ValueError(f"must be >= 0, got {value!r}")


def _unit_interval_open(inst, attribute, value):
    for v in (value if isinstance(value, tuple) else (value,)):
        if not 0.0 < v < 1.0:
            raise ValueError(f"each value must be in (0, 1), got {v!r}")


class FieldError(ValueError):
    """A check across fields (``__attrs_post_init__``) that names the key to blame."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def _at_most(hi):
    def check(inst, attribute, value):
        if value is not None and value > hi:
            raise ValueError(f"must be <= {hi}, got {value!r}")
    return check


def _seed(inst, attribute, value):
    if not 0 <= value <= MAX_SEED:
        raise ValueError(f"a seed must be an integer in [0, {MAX_SEED}], got {value!r}")


# The largest seed: the loop derives generator seeds from it (seed * 1_000_003 + ...), which must
# stay within torch's 64-bit seeds.
MAX_SEED = 2**32 - 1
# Integers beyond 2**53 are no count of images, steps or samples (and lose exactness as floats).
MAX_INT = 2**53
MAX_BATCH = 2**24


def _betas(inst, attribute, value):
    if len(value) != 2 or not all(0.0 <= b < 1.0 for b in value):
        raise ValueError(f"must be two numbers in [0, 1), got {list(value)!r}")


@attrs.frozen(kw_only=True)
class RunCfg:
    name: str = "run"
    seed: int = attrs.field(default=0, validator=_seed)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Default run directory: runs/<name>; `mfr run ... --out DIR` overrides it.
    out_dir: Optional[str] = None
    # Where embedded datasets cache their shards (default: $MFR_CACHE_DIR or ~/.cache/mfrecipes).
    cache_dir: Optional[str] = None


def _unit_interval(inst, attribute, value):
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"must be in [0, 1], got {value!r}")


@attrs.frozen(kw_only=True)
class LrScheduleCfg:
    """The learning rate as a function of the images seen, a factor on ``train.lr``.

    ``constant``: train.lr throughout. ``cosine``: from the end of the warm-up to
    ``train.total_images`` the factor falls as ``f + (1 - f) (1 + cos(pi p)) / 2`` (p in [0, 1]
    the progress, f = ``final_ratio``). Both start with a linear warm-up over ``warmup_images``
    (0: none), the factor after a step's batch being ``min(1, images / warmup_images)``. A pure
    function of the image count: resuming gives the same rates without saved scheduler state.
    """

    kind: Literal["constant", "cosine"] = "constant"
    warmup_images: int = attrs.field(default=0, validator=_non_negative)
    final_ratio: float = attrs.field(default=0.0, validator=_unit_interval)

    def factor(self, images: int, total_images: int) -> float:
        """The factor for the step whose batch brings the count to ``images``."""
        warm = min(1.0, images / self.warmup_images) if self.warmup_images else 1.0
        if self.kind == "constant":
            return warm
        span = total_images - self.warmup_images
        p = min(1.0, max(0.0, (images - self.warmup_images) / span)) if span > 0 else 1.0
        return warm * (self.final_ratio
                       + (1.0 - self.final_ratio) * 0.5 * (1.0 + math.cos(math.pi * p)))


@attrs.frozen(kw_only=True)
class TrainCfg:
    total_images: int = attrs.field(validator=_positive)
    global_batch_size: int = attrs.field(default=256, validator=[_positive, _at_most(MAX_BATCH)])
    # Per-process micro batch; None = global batch / world size (no accumulation).
    micro_batch_size: Optional[int] = attrs.field(default=None,
                                                  validator=[_positive, _at_most(MAX_BATCH)])
    # AdamW steps are about lr in size whatever the gradient: beyond 1 no weight survives a step.
    lr: float = attrs.field(default=1e-4, validator=[_positive, _at_most(1.0)])
    lr_schedule: LrScheduleCfg = attrs.field(factory=LrScheduleCfg)
    betas: tuple[float, float] = attrs.field(default=(0.9, 0.95), validator=_betas)
    weight_decay: float = attrs.field(default=0.0, validator=_non_negative)
    grad_clip: Optional[float] = attrs.field(default=None, validator=_positive)
    ema_decays: tuple[float, ...] = attrs.field(default=(0.9999,), validator=_unit_interval_open)

    def __attrs_post_init__(self):
        if not self.ema_decays:
            raise FieldError("ema_decays",
                             "ema_decays must list at least one decay in (0, 1), e.g. [0.9999]")
        # AdamW multiplies the weights by (1 - lr * weight_decay) each step.
        if self.lr * self.weight_decay >= 1.0:
            raise FieldError("weight_decay",
                             f"weight_decay {self.weight_decay} with lr {self.lr} would zero or "
                             f"flip every weight each step (lr * weight_decay must be < 1)")
        if (self.micro_batch_size is not None
                and self.global_batch_size % self.micro_batch_size):
            raise FieldError("micro_batch_size",
                             f"micro_batch_size {self.micro_batch_size} does not divide "
                             f"global_batch_size {self.global_batch_size}; valid: a divisor "
                             f"of it (global = micro x accumulation steps x world size)")
    precision: Literal["fp32", "bf16"] = "fp32"
    # torch.compile the backbone's forward and forward_jvp (train/compile.py); the first steps
    # pay the compilation (minutes), the EMA and sampling stay eager.
    compile: bool = False
    compile_mode: Literal["default", "reduce-overhead", "max-autotune",
                          "max-autotune-no-cudagraphs"] = "default"
    log_every_images: int = attrs.field(default=10_000, validator=_positive)
    checkpoint_every_images: Optional[int] = attrs.field(default=None, validator=_positive)
    keep_checkpoints: int = attrs.field(default=2, validator=_positive)
    # A non-finite loss (or gradient) is never stepped on; the run stops after this many.
    max_nonfinite: int = attrs.field(default=10, validator=_non_negative)
    progress_bar: bool = True
    # Metric backends (the LOGGERS registry): names or {name, params} blocks; must include
    # jsonl. None = jsonl, plus tensorboard when it is installed. Checked by `mfr check`.
    loggers: Optional[tuple[Union[str, "ComponentCfg"], ...]] = None
    # A training-time data transform (the TRANSFORMS registry), e.g. {name: edm_augment, params:
    # {p: 0.12}}: its labels reach the backbone's augment_labels (data/augment.py).
    augment: Optional["ComponentCfg"] = None

    def lr_at(self, images: int) -> float:
        """train.lr times the schedule's factor for the step that ends at ``images``."""
        return self.lr * self.lr_schedule.factor(images, self.total_images)


@attrs.frozen(kw_only=True)
class EvalCfg:
    every_images: Optional[int] = attrs.field(default=None, validator=_positive)
    nfe: tuple[int, ...] = (1, 2)
    num_samples: int = attrs.field(default=1000, validator=[_positive, _at_most(10**7)])
    grid_size: int = attrs.field(default=64, validator=[_positive, _at_most(10**5)])
    at_end: bool = True
    seed: int = attrs.field(default=0, validator=_seed)

    def __attrs_post_init__(self):
        if not self.nfe or any(not 1 <= k <= 1000 for k in self.nfe):
            raise ValueError(f"nfe must be a non-empty list of integers in [1, 1000], got "
                             f"{list(self.nfe)}")


@attrs.frozen(kw_only=True)
class DeepSpeedCfg:
    zero_stage: int = 2
    bf16: bool = False
    # Anything else goes straight into the DeepSpeed config (batch sizes are derived from train:).
    config: dict = attrs.field(factory=dict)

    def __attrs_post_init__(self):
        if self.zero_stage == 3:
            raise ValueError(
                "ZeRO stage 3 is not supported: it partitions parameters and gathers them inside "
                "the forward, which torch.func transforms (the MeanFlow JVP) cannot trace. Use "
                "zero_stage 1 or 2 (optimizer/gradient sharding) instead")
        if self.zero_stage not in (0, 1, 2):
            raise ValueError(f"zero_stage must be 0, 1 or 2, got {self.zero_stage!r}")
        for key in ("train_batch_size", "train_micro_batch_size_per_gpu",
                    "gradient_accumulation_steps"):
            if key in self.config:
                raise ValueError(f"config.{key} is derived from train.global_batch_size and "
                                 f"train.micro_batch_size; set those instead")


@attrs.frozen(kw_only=True)
class ComponentCfg:
    name: str
    params: dict = attrs.field(factory=dict)

    def as_dict(self) -> dict:
        return {"name": self.name, "params": dict(self.params)}


@attrs.frozen(kw_only=True)
class StageCfg:
    """One stage of a multi-stage run: its image budget and the overrides it applies."""

    name: str
    images: int = attrs.field(validator=_positive)
    overrides: dict = attrs.field(factory=dict)


@attrs.frozen(kw_only=True)
class InitFromCfg:
    """Initialise the backbone (and its EMAs) from another run's weights."""

    path: str                                     # run directory, checkpoint folder or .safetensors
    weights: Literal["ema", "raw"] = "ema"
    ema: Optional[str] = None                     # which EMA (e.g. "ema_0.9999"); default: first


@attrs.frozen(kw_only=True)
class Recipe:
    run: RunCfg = attrs.field(factory=RunCfg)
    imports: tuple[str, ...] = ()
    data: ComponentCfg
    backbone: ComponentCfg
    objective: ComponentCfg = attrs.field(factory=lambda: ComponentCfg(name="meanflow"))
    timestep_sampler: ComponentCfg = attrs.field(
        factory=lambda: ComponentCfg(name="logit_normal"))
    loss_weighting: ComponentCfg = attrs.field(factory=lambda: ComponentCfg(name="adaptive"))
    gap_schedule: ComponentCfg = attrs.field(factory=lambda: ComponentCfg(name="constant"))
    train: TrainCfg
    engine: Literal["single", "deepspeed"] = "single"
    deepspeed: DeepSpeedCfg = attrs.field(factory=DeepSpeedCfg)
    eval: EvalCfg = attrs.field(factory=EvalCfg)
    init_from: Optional[InitFromCfg] = None
    stages: tuple[StageCfg, ...] = ()

    @classmethod
    def from_dict(cls, d: Any) -> "Recipe":
        return _build(cls, d, "")

    def to_dict(self) -> dict:
        return _to_plain(self)


# -- generic typed construction with dotted-path errors ------------------------------------------

def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin is Union:
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (tuple, list):
        args = typing.get_args(tp)
        inner = _type_name(args[0]) if args else "any"
        return f"list of {inner}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _convert(tp, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if attrs.has(tp):
        return _build(tp, value, path)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise RecipeError(f"invalid value {value!r}; valid: "
                              f"{', '.join(repr(c) for c in choices)}", path=path)
        return value
    if origin is Union:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(a, value, path)
            except RecipeError as err:
                errors.append(err)
        if len(errors) == 1 and type(value) is not str:  # Optional[X]: X's own message says more
            raise errors[0]
        raise RecipeError(f"expected {_type_name(tp)}, got {value!r}", path=path)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise RecipeError(f"expected {_type_name(tp)}, got {value!r}", path=path)
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, f"{path}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise RecipeError(f"expected a list of {len(args)} values, got {value!r}", path=path)
        return tuple(_convert(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if tp is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"expected a mapping, got {value!r}", path=path)
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"expected true or false, got {value!r}", path=path)
        return value
    if tp is int:
        # YAML writes 1e6 as a float; accept integral floats for image counts.
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"expected an integer, got {value!r}", path=path)
        if abs(value) > MAX_INT:
            raise RecipeError(f"{value} is beyond any value of this field (valid: integers "
                              f"of magnitude <= 2**53)", path=path)
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"expected a number, got {value!r}", path=path)
        try:
            value = float(value)
        except OverflowError as err:
            raise RecipeError(f"{value} is beyond the range of a float", path=path) from err
        if not math.isfinite(value):
            raise RecipeError(f"expected a finite number, got {value!r}", path=path)
        return value
    if tp is str:
        if not isinstance(value, str):
            raise RecipeError(f"expected a string, got {value!r}", path=path)
        return value
    raise TypeError(f"schema type {tp!r} not handled")  # a bug in the schema, not user input


def _build(cls, d: Any, path: str):
    if isinstance(d, cls):
        return d
    if not isinstance(d, dict):
        raise RecipeError(f"expected a mapping, got {d!r}", path=path or None)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in attrs.fields(cls)}
    unknown = [k for k in d if k not in fields]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(str(key), list(fields), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise RecipeError(f"unknown key {key!r}{hint}\n  valid keys: {', '.join(fields)}",
                          path=_join(path, str(key)))
    kwargs = {}
    for name, f in fields.items():
        if name in d:
            kwargs[name] = _convert(hints[name], d[name], _join(path, name))
        elif f.default is attrs.NOTHING:
            raise RecipeError(f"missing required key {name!r}", path=_join(path, name))
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as err:
        # attrs validators raise with the attribute; find which one by re-validating each field.
        bad = getattr(err, "field", None) or _failing_field(cls, kwargs)
        raise RecipeError(str(err), path=_join(path, bad) if bad else (path or None)) from err


def _failing_field(cls, kwargs) -> Optional[str]:
    for f in attrs.fields(cls):
        if f.validator is not None and f.name in kwargs:
            try:
                f.validator(None, f, kwargs[f.name])
            except (ValueError, TypeError):
                return f.name
    if "zero_stage" in kwargs and cls is DeepSpeedCfg:
        return "zero_stage" if kwargs["zero_stage"] not in (0, 1, 2) else "config"
    if cls is EvalCfg:
        return "nfe"
    return None


def _to_plain(obj: Any) -> Any:
    if attrs.has(type(obj)):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in attrs.fields(type(obj))}
    if isinstance(obj, tuple):
        return [_to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_plain(v) for v in obj]
    return obj


def batch_plan(cfg: "TrainCfg", world_size: int, path: str = "train") -> tuple[int, int]:
    """``(micro batch per rank, accumulation steps)`` of a data-parallel run of ``world_size``
    ranks; global batch = micro x accumulation steps x world size. Without
    ``micro_batch_size`` each rank takes global / world size in one micro batch. A split that
    does not come out even is a ``RecipeError`` naming the key and the nearest valid sizes."""
    g, mb = cfg.global_batch_size, cfg.micro_batch_size
    unit = world_size if mb is None else mb * world_size
    if g % unit == 0:
        return (g // world_size, 1) if mb is None else (mb, g // unit)
    near = [v for v in (g // unit * unit, (g // unit + 1) * unit) if v > 0]
    what = (f"the world size {world_size} (train.micro_batch_size unset: each rank takes "
            f"global / world size)" if mb is None else
            f"the world size {world_size} x micro_batch_size {mb} (global = micro x "
            f"accumulation steps x world size)")
    hint = ", or set train.micro_batch_size" if mb is None else ""
    raise RecipeError(f"{path}.global_batch_size {g} is not divisible by {what}; valid global "
                      f"batch sizes near it: {', '.join(map(str, near))} (any multiple of "
                      f"{unit}){hint}", path=f"{path}.global_batch_size")
