"""Trained models outside their run directory: ``mfr export`` and ``mfrecipes.load_pretrained``.

An exported model is a self-describing folder that needs neither the recipe nor the data::

    config.json          format, backbone name and its full parameters (defaults filled in), the
                         input shape and classes it was built for, the data's facts (modality,
                         sample shape, classes, latent scale, VAE id), the weights group, images
                         seen, the recipe's name and objective, the mfrecipes version
    model.safetensors    one set of weights (an EMA by default), the backbone's own parameter
                         names, no prefix: ``net.load_state_dict(load_file(...))`` works as is
    README.md            a short model card: recipe, images seen, the last quality figures, how
                         to load and sample

:func:`load_pretrained` reads such a folder, or a run directory directly (its latest checkpoint,
or the one named), and returns a :class:`Pretrained`: the network in eval mode and the data's
facts, which is all :func:`mfrecipes.generate` needs.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Optional, Union

import attrs

from mfrecipes.errors import CheckpointError

__all__ = ["Pretrained", "export_run", "load_pretrained", "CONFIG", "MODEL", "CARD", "FORMAT"]

CONFIG = "config.json"
MODEL = "model.safetensors"
CARD = "README.md"
FORMAT = "mfrecipes-model"
FORMAT_VERSION = 1


@attrs.frozen
class Pretrained:
    """A network ready to sample and the facts about its data. Unpacks as ``net, info``."""

    net: Any = attrs.field(repr=False)          # torch.nn.Module, eval mode, no grad
    info: Any                                   # mfrecipes.data.base.DataInfo
    config: dict = attrs.field(repr=False)      # the exported config.json (or its equivalent)
    source: str = ""

    def __iter__(self):
        return iter((self.net, self.info))

    def generate(self, n: int, **kwargs):
        """``mfrecipes.generate(self, n, **kwargs)``: ``(x, y)``."""
        from mfrecipes.generate import generate_from

        return generate_from(self, n, **kwargs)


# ---------------------------------------------------------------------------------- export

def _plain(value: Any) -> Any:
    """JSON-able copy (tuples become lists); None when the value has no plain form."""
    if isinstance(value, (bool, int, str)) or value is None:
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return repr(value)


def _info_dict(info) -> dict:
    return {"name": info.name, "modality": info.modality,
            "sample_shape": list(info.sample_shape), "num_classes": info.num_classes,
            "latent_scale": info.latent_scale, "vae": info.vae}


def _last_quality(run_dir: str, images: int) -> tuple[Optional[int], dict]:
    """The newest ``eval/...`` figures up to ``images`` (metrics.jsonl, then eval.jsonl of that
    checkpoint): ``(images they were measured at, {key: value})``."""
    from mfrecipes.run.layout import EVAL, METRICS, read_jsonl

    at, figures = None, {}
    for rec in read_jsonl(os.path.join(run_dir, METRICS)):
        ev = {k: v for k, v in rec.items() if k.startswith("eval/")}
        if ev and rec.get("images", 0) <= images:
            at, figures = rec.get("images"), ev
    for rec in read_jsonl(os.path.join(run_dir, EVAL)):
        if rec.get("images") == images:
            ev = {k: v for k, v in rec.items() if k.startswith("eval/")}
            if ev:
                at = images
                figures = {**figures, **ev}
    return at, figures


def _card(config: dict, quality_at: Optional[int], quality: dict) -> str:
    info = config["data"]
    lines = [
        "---", "library_name: mfrecipes", "tags: [meanflow, one-step-generation]", "---", "",
        f"# {config['recipe']}", "",
        f"A one-step generative model trained with mfrecipes ({config['objective']} objective) "
        f"on `{info['name']}` ({info['modality']}, samples of shape {info['sample_shape']}"
        + (f", {info['num_classes']} classes" if info["num_classes"] else ", unconditional")
        + ").", "",
        f"- backbone: `{config['backbone']['name']}` {json.dumps(config['backbone']['params'])}",
        f"- weights: `{config['weights']}` after {config['images']:,} images seen",
    ]
    if info["modality"] == "latent":
        lines.append(f"- latents of VAE `{info['vae']}`, scale {info['latent_scale']}")
    lines += ["", "## Quality", ""]
    if quality:
        lines += [f"At {quality_at:,} images:", "", "| metric | value |", "|---|---|"]
        lines += [f"| `{k}` | {v:.6g} |" if isinstance(v, (int, float)) else f"| `{k}` | {v} |"
                  for k, v in sorted(quality.items())]
    else:
        lines.append("No evaluation was recorded for this checkpoint.")
    lines += ["", "## Use", "", "```python", "import mfrecipes", "",
              "model = mfrecipes.load_pretrained(\"PATH/TO/THIS/FOLDER\")",
              "x, y = mfrecipes.generate(model, 16, nfe=1, seed=0)   # x [16, "
              + ", ".join(map(str, info["sample_shape"])) + "]", "```", ""]
    return "\n".join(lines)


def _backbone(recipe) -> dict:
    """Name, every parameter (defaults filled in) and the registered one-line description
    (which spells out the sizes of a named preset such as ``dit_b_4``)."""
    from mfrecipes import registry
    from mfrecipes.plugins import load_components

    load_components()
    entry = registry.BACKBONES.entry(recipe.backbone.name, where="backbone.name")
    full = {k: v for k, v in entry.parameters().items()
            if k not in registry.BACKBONES.runtime_args and v is not ...}
    full.update(recipe.backbone.params)
    return {"name": recipe.backbone.name, "params": _plain(full),
            "description": entry.summary()}


def export_run(run_dir: Union[str, os.PathLike], out: Union[str, os.PathLike], *,
               weights: str = "ema", checkpoint: Optional[str] = None) -> dict:
    """Write ``out/{config.json, model.safetensors, README.md}`` from one checkpoint of a run;
    ``weights`` is ``ema`` (the first EMA), ``raw`` or a group such as ``ema_0.9999``.
    Returns the config. Files are written under temporary names and renamed, so an export cut
    short leaves no half-written model."""
    from safetensors.torch import save_file

    from mfrecipes import __version__
    from mfrecipes.evaluate.load import load_run
    from mfrecipes.run.layout import atomic_write_text

    run_dir, out = os.fspath(run_dir), os.fspath(out)
    if os.path.abspath(out) == os.path.abspath(run_dir):
        raise CheckpointError("--out must be a new folder, not the run directory itself",
                              path="--out")
    if os.path.isfile(out):
        raise CheckpointError(f"--out {out} is a file; give a folder", path="--out")
    run = load_run(run_dir, checkpoint=checkpoint, weights=weights, device="cpu")
    recipe, info = run.recipe, run.info
    config = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "mfrecipes_version": __version__,
        "backbone": _backbone(recipe),
        "input_shape": list(info.sample_shape), "num_classes": info.num_classes,
        "data": _info_dict(info),
        "weights": run.weights, "images": run.images, "checkpoint": run.checkpoint_name,
        "recipe": recipe.run.name, "objective": recipe.objective.name,
        "parameters": sum(p.numel() for p in run.net.parameters()),
    }
    quality_at, quality = _last_quality(run_dir, run.images)
    config["quality"] = {"images": quality_at, **_plain(quality)} if quality else None
    os.makedirs(out, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in run.net.state_dict().items()}
    tmp = os.path.join(out, f".{MODEL}.{os.getpid()}.tmp")
    save_file(state, tmp, metadata={"format": FORMAT, "weights": run.weights,
                                    "images": str(run.images)})
    os.replace(tmp, os.path.join(out, MODEL))
    atomic_write_text(os.path.join(out, CARD), _card(config, quality_at, quality))
    atomic_write_text(os.path.join(out, CONFIG), json.dumps(config, indent=1) + "\n")
    return config


# ------------------------------------------------------------------------------------ load

def _info_from(config: dict, where: str):
    from mfrecipes.data.base import DataInfo

    d = config.get("data")
    try:
        return DataInfo(name=d["name"], modality=d["modality"], sample_shape=d["sample_shape"],
                        num_classes=d.get("num_classes"), latent_scale=d.get("latent_scale"),
                        vae=d.get("vae"))
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{where}: 'data' must hold name, modality and sample_shape "
                              f"({err})") from err


def _load_export(folder: str, device) -> Pretrained:
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from mfrecipes import registry

    where = os.path.join(folder, CONFIG)
    try:
        with open(where, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot read {where}: {err}") from err
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise CheckpointError(f"{where} is not an exported mfrecipes model (expected "
                              f"\"format\": \"{FORMAT}\"); export one with `mfr export RUN_DIR "
                              f"--out DIR`")
    if int(config.get("format_version", 0)) > FORMAT_VERSION:
        raise CheckpointError(f"{where} has format_version {config['format_version']}; this "
                              f"mfrecipes reads up to {FORMAT_VERSION}: upgrade mfrecipes")
    info = _info_from(config, where)
    bb = config.get("backbone") or {}
    from mfrecipes.plugins import load_components

    load_components()
    with torch.random.fork_rng(devices=[]):  # building must not disturb the caller's RNG
        net = registry.BACKBONES.build({"name": bb.get("name"), "params": bb.get("params") or {}},
                                       where=f"{where}: backbone",
                                       input_shape=tuple(config["input_shape"]),
                                       num_classes=config.get("num_classes"))
    path = os.path.join(folder, MODEL)
    try:
        state = load_file(path)
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"cannot read weights {path}: {err}") from err
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{path} does not fit backbone {bb.get('name')!r} of {where}: "
                              f"{err}") from err
    net = net.to(device).float().eval().requires_grad_(False)
    return Pretrained(net=net, info=info, config=config, source=folder)


def load_pretrained(path: Union[str, os.PathLike], *, device="cpu", weights: str = "ema",
                    checkpoint: Optional[str] = None) -> Pretrained:
    """The network and data facts of an exported folder (``mfr export``) or of a run directory.

    ``weights`` and ``checkpoint`` choose among a run directory's checkpoints and weight groups
    (``ema``, ``raw``, ``ema_<decay>``); an exported folder holds one set and ignores them.
    """
    path = os.fspath(path)
    if os.path.isfile(os.path.join(path, CONFIG)):
        return _load_export(path, device)
    from mfrecipes.evaluate.load import load_run
    from mfrecipes.run.layout import RESOLVED

    if not os.path.isfile(os.path.join(path, RESOLVED)):
        raise CheckpointError(f"{path!r} is neither an exported model (no {CONFIG}) nor a run "
                              f"directory (no {RESOLVED})")
    run = load_run(path, checkpoint=checkpoint, weights=weights, device=device)
    config = {"format": FORMAT, "backbone": _backbone(run.recipe),
              "data": _info_dict(run.info), "weights": run.weights, "images": run.images,
              "checkpoint": run.checkpoint_name, "recipe": run.recipe.run.name,
              "objective": run.recipe.objective.name}
    return Pretrained(net=run.net, info=run.info, config=config, source=path)
