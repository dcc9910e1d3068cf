"""Atomic checkpoints: a plain safetensors weights file beside a small train-state file.

The layout of ``RUN_DIR/checkpoints`` (folder and file names) and the read-only lookups
(newest complete checkpoint, verification) are ``mfrecipes.run.layout``.

A checkpoint is written into a hidden temporary folder and renamed into place, and ``latest`` is
replaced atomically afterwards, so a crash at any moment leaves either the old or the new
checkpoint complete, never a half-written one. With several ranks, rank 0 names the temporary
folder, every rank writes its engine files into it, and after a barrier rank 0 adds its files and
renames. Evaluation and sampling read only ``weights.safetensors``, never an engine's format.

Nothing here unpickles more than tensors: ``train_state.pt`` is read with ``weights_only=True``.
``verify_checkpoint`` checks a folder against its checksums before a resume trusts it; a write
that fails (a full disk) removes its own temporary folder and says which checkpoint is intact.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
from typing import Any

import torch

from mfrecipes.errors import CheckpointError
# The layout of a checkpoint folder and the read-only lookups live with the run directory's
# other names; this module writes, prunes, sets aside and loads.
from mfrecipes.run.layout import (DAMAGED, LATEST, META, STATE, WEIGHTS, complete_names,
                                  atomic_write_text, checkpoint_name, file_digest, fsync_dir,
                                  latest_checkpoint)

# Keys a train state must hold, and their types (a damaged or foreign file fails here).
# The random streams are "streams" (one generator per purpose); older checkpoints hold one
# "generator" tensor instead.
_STATE_KEYS = {"images": int, "step": int, "nonfinite": int, "engine": dict}


def _fsync_tree(folder: str) -> None:
    for root, _, files in os.walk(folder):
        for fn in files:
            with open(os.path.join(root, fn), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(root)


def save_checkpoint(ckpt_root: str, *, images: int, step: int,
                    weights: dict[str, dict[str, torch.Tensor]] | None,
                    train_state: dict[str, Any] | None, meta: dict[str, Any] | None,
                    keep: int = 2, engine=None) -> str:
    """Write one checkpoint atomically; keep the newest ``keep``; return its folder.

    With an ``engine`` every rank calls this: each writes the engine's own files
    (``engine.save_native``) into the shared temporary folder; ``weights``, ``train_state`` and
    ``meta`` are needed on the main rank only.
    """
    name = checkpoint_name(images)
    final = os.path.join(ckpt_root, name)
    main = engine is None or engine.is_main
    tmp = os.path.join(ckpt_root, f".tmp-{name}-{os.getpid()}")
    failure = None
    if main:
        try:
            os.makedirs(ckpt_root, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        except OSError as err:
            failure = _one_line(err)
    if engine is not None:
        tmp, failure = engine.broadcast((tmp, failure))  # after rank 0 made it: also a barrier
        if failure is None:
            try:
                engine.save_native(tmp)
                _fsync_tree(tmp)
            except Exception as err:  # noqa: BLE001 - every rank must learn of it, not hang
                failure = f"rank {engine.rank}: {_one_line(err)}"
        # Every rank's files are in place (or one failed) before rank 0 goes on.
        failure = next((f for f in engine.gather(failure) if f), None)
        if failure is None and main:
            failure = _write_plain(tmp, images, step, weights, train_state, meta)
        failure = engine.broadcast(failure)
    elif failure is None:
        failure = _write_plain(tmp, images, step, weights, train_state, meta)
    if failure is not None:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(_write_failed(ckpt_root, name, failure))
    if not main:
        return final
    try:
        if os.path.exists(final):  # same image count written again (e.g. final == periodic)
            _remove(ckpt_root, name)
        os.rename(tmp, final)
        fsync_dir(ckpt_root)
        atomic_write_text(os.path.join(ckpt_root, LATEST), name + "\n")
    except OSError as err:
        raise CheckpointError(_write_failed(ckpt_root, name, _one_line(err))) from err
    _prune(ckpt_root, keep)
    return final


def _one_line(err: BaseException, limit: int = 240) -> str:
    text = " ".join(f"{type(err).__name__}: {err}".split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _write_plain(tmp: str, images: int, step: int, weights, train_state, meta) -> str | None:
    """The main rank's files, checksums in ``meta.json`` last; a failure as one line."""
    from safetensors.torch import save_file

    try:
        # "group/param.name": EMA group names contain dots (ema_0.9999), so "/" separates.
        flat = {f"{prefix}/{k}": v.detach().to("cpu").contiguous().clone()
                for prefix, sd in weights.items() for k, v in sd.items()}
        save_file(flat, os.path.join(tmp, WEIGHTS),
                  metadata={"images": str(images), "groups": ",".join(weights)})
        torch.save(train_state, os.path.join(tmp, STATE))
        files = {fn: file_digest(os.path.join(tmp, fn)) for fn in (WEIGHTS, STATE)}
        meta = dict(meta, images=images, step=step, weights=sorted(weights), files=files,
                    complete=True)
        with open(os.path.join(tmp, META), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=1)
        _fsync_tree(tmp)
    except Exception as err:  # noqa: BLE001 - SafetensorError, OSError (a full disk), ...
        return _one_line(err)
    return None


def _write_failed(ckpt_root: str, name: str, failure: str) -> str:
    previous = latest_checkpoint(ckpt_root) if os.path.isdir(ckpt_root) else None
    intact = (f"the previous checkpoint {os.path.basename(previous)} is intact" if previous
              else "no earlier checkpoint exists")
    hint = ("free disk space, then " if any(w in failure for w in (
        "No space left", "quota", "File too large")) else "")
    return (f"cannot write checkpoint {name} in {ckpt_root} ({failure}); nothing partial was "
            f"left, {intact}; {hint}resume with `mfr run RUN_DIR`")


def _remove(ckpt_root: str, name: str) -> None:
    """Delete a checkpoint folder; renamed out of sight first, so a crash mid-delete never
    leaves a visible folder with files missing."""
    hidden = os.path.join(ckpt_root, f".tmp-del-{name}-{os.getpid()}")
    shutil.rmtree(hidden, ignore_errors=True)
    os.rename(os.path.join(ckpt_root, name), hidden)
    fsync_dir(ckpt_root)
    shutil.rmtree(hidden, ignore_errors=True)


def _prune(ckpt_root: str, keep: int) -> None:
    for name in complete_names(ckpt_root)[:-keep]:
        _remove(ckpt_root, name)
    for name in os.listdir(ckpt_root):  # temporaries of crashed writers
        if name.startswith(".tmp-") and not name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(os.path.join(ckpt_root, name), ignore_errors=True)


def set_aside(ckpt: str) -> str:
    """Rename a damaged checkpoint folder out of the way (``damaged-img-...``); never delete."""
    root, name = os.path.split(os.path.normpath(ckpt))
    target = os.path.join(root, DAMAGED + name)
    n = 1
    while os.path.exists(target):
        n += 1
        target = os.path.join(root, f"{DAMAGED}{name}.{n}")
    os.rename(ckpt, target)
    fsync_dir(root)
    return target


def load_weights(ckpt: str) -> dict[str, dict[str, torch.Tensor]]:
    """``{"net": state_dict, "ema_0.9999": state_dict, ...}`` from a checkpoint folder or file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = ckpt if ckpt.endswith(".safetensors") else os.path.join(ckpt, WEIGHTS)
    if not os.path.isfile(path):
        raise CheckpointError(f"no weights file at {path}; a checkpoint folder holds {WEIGHTS}")
    try:
        flat = load_file(path)
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"damaged checkpoint file {path}: cannot read weights "
                              f"({_one_line(err)})") from err
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in flat.items():
        prefix, _, rest = key.partition("/")
        groups.setdefault(prefix, {})[rest] = value
    return groups


def load_train_state(ckpt: str) -> dict[str, Any]:
    """The train state, tensors and plain containers only (``weights_only=True``: a pickle
    that names any other object is refused, never run); its layout is checked too."""
    path = os.path.join(ckpt, STATE)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means a damaged file
        why = ("it names objects other than tensors, which are never unpickled"
               if isinstance(err, pickle.UnpicklingError) else _one_line(err))
        raise CheckpointError(f"damaged checkpoint file {path}: cannot read the train state "
                              f"({why})") from err
    if not isinstance(state, dict):
        raise CheckpointError(f"damaged checkpoint file {path}: holds a "
                              f"{type(state).__name__}, not a train state")
    for key, kind in _STATE_KEYS.items():
        if not isinstance(state.get(key), kind):
            raise CheckpointError(f"damaged checkpoint file {path}: {key!r} is missing or not "
                                  f"a {kind.__name__}")
    streams = state.get("streams")
    if not (isinstance(streams, dict) and all(isinstance(v, torch.Tensor)
                                              for v in streams.values())
            or isinstance(state.get("generator"), torch.Tensor)):
        raise CheckpointError(f"damaged checkpoint file {path}: no random stream state "
                              f"('streams' of tensors, or an older 'generator' tensor)")
    ranks = state.get("ranks")
    if ranks is not None and not (isinstance(ranks, list) and all(
            isinstance(r, dict) and isinstance(r.get("data_position"), int)
            and isinstance(r.get("torch_rng"), torch.Tensor) for r in ranks)):
        raise CheckpointError(f"damaged checkpoint file {path}: 'ranks' is not a list of rank "
                              f"states")
    return state
