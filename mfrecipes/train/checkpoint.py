"""Atomic checkpoints: a plain safetensors weights file beside a small train-state file.

Layout of ``RUN_DIR/checkpoints``::

    img-000000012800/          images seen, zero-padded so names sort by progress
        weights.safetensors    raw weights as ``net/*`` and every EMA as ``ema_<decay>/*``
        train_state.pt         optimiser (torch AdamW layout), RNG states and data position of
                               every rank, counters, component states
        deepspeed/             DeepSpeed's own files, one partition per rank (engine: deepspeed)
        meta.json              images, step, the keys above, versions (written last)
    latest                     the name of the newest complete checkpoint

A checkpoint is written into a hidden temporary folder and renamed into place, and ``latest`` is
replaced atomically afterwards, so a crash at any moment leaves either the old or the new
checkpoint complete, never a half-written one. With several ranks, rank 0 names the temporary
folder, every rank writes its engine files into it, and after a barrier rank 0 adds its files and
renames. Evaluation and sampling read only ``weights.safetensors``, never an engine's format.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any

import torch

from mfrecipes.errors import CheckpointError

WEIGHTS = "weights.safetensors"
STATE = "train_state.pt"
META = "meta.json"
LATEST = "latest"


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def checkpoint_name(images: int) -> str:
    return f"img-{images:012d}"


def _fsync_tree(folder: str) -> None:
    for root, _, files in os.walk(folder):
        for fn in files:
            with open(os.path.join(root, fn), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(root)


def save_checkpoint(ckpt_root: str, *, images: int, step: int,
                    weights: dict[str, dict[str, torch.Tensor]] | None,
                    train_state: dict[str, Any] | None, meta: dict[str, Any] | None,
                    keep: int = 2, engine=None) -> str:
    """Write one checkpoint atomically; keep the newest ``keep``; return its folder.

    With an ``engine`` every rank calls this: each writes the engine's own files
    (``engine.save_native``) into the shared temporary folder; ``weights``, ``train_state`` and
    ``meta`` are needed on the main rank only.
    """
    from safetensors.torch import save_file

    name = checkpoint_name(images)
    final = os.path.join(ckpt_root, name)
    main = engine is None or engine.is_main
    tmp = os.path.join(ckpt_root, f".tmp-{name}-{os.getpid()}")
    if main:
        os.makedirs(ckpt_root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    if engine is not None:
        tmp = engine.broadcast(tmp)  # after rank 0 made it: also a barrier
        engine.save_native(tmp)
        _fsync_tree(tmp)
        engine.barrier()  # every rank's files are in place before rank 0 renames
        if not main:
            return final
    # "group/param.name": EMA group names contain dots (ema_0.9999), so "/" separates.
    flat = {f"{prefix}/{k}": v.detach().to("cpu").contiguous().clone()
            for prefix, sd in weights.items() for k, v in sd.items()}
    save_file(flat, os.path.join(tmp, WEIGHTS),
              metadata={"images": str(images), "groups": ",".join(weights)})
    torch.save(train_state, os.path.join(tmp, STATE))
    meta = dict(meta, images=images, step=step, weights=sorted(weights), complete=True)
    with open(os.path.join(tmp, META), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1)
    _fsync_tree(tmp)
    if os.path.exists(final):  # same image count written again (e.g. final == periodic)
        _remove(ckpt_root, name)
    os.rename(tmp, final)
    _fsync_dir(ckpt_root)
    atomic_write_text(os.path.join(ckpt_root, LATEST), name + "\n")
    _prune(ckpt_root, keep)
    return final


def _complete(ckpt_root: str) -> list[str]:
    names = [n for n in os.listdir(ckpt_root) if n.startswith("img-")
             and os.path.isfile(os.path.join(ckpt_root, n, META))]
    return sorted(names)


def _remove(ckpt_root: str, name: str) -> None:
    """Delete a checkpoint folder; renamed out of sight first, so a crash mid-delete never
    leaves a visible folder with files missing."""
    hidden = os.path.join(ckpt_root, f".tmp-del-{name}-{os.getpid()}")
    shutil.rmtree(hidden, ignore_errors=True)
    os.rename(os.path.join(ckpt_root, name), hidden)
    _fsync_dir(ckpt_root)
    shutil.rmtree(hidden, ignore_errors=True)


def _prune(ckpt_root: str, keep: int) -> None:
    for name in _complete(ckpt_root)[:-keep]:
        _remove(ckpt_root, name)
    for name in os.listdir(ckpt_root):  # temporaries of crashed writers
        if name.startswith(".tmp-") and not name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(os.path.join(ckpt_root, name), ignore_errors=True)


def latest_checkpoint(ckpt_root: str) -> str | None:
    """The newest complete checkpoint folder, or None when there is none."""
    if not os.path.isdir(ckpt_root):
        return None
    complete = _complete(ckpt_root)
    pointer = os.path.join(ckpt_root, LATEST)
    if os.path.isfile(pointer):
        with open(pointer, encoding="utf-8") as f:
            name = f.read().strip()
        if name in complete:
            return os.path.join(ckpt_root, name)
    return os.path.join(ckpt_root, complete[-1]) if complete else None


def load_meta(ckpt: str) -> dict:
    try:
        with open(os.path.join(ckpt, META), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"checkpoint {ckpt} has an unreadable {META} ({err}); remove "
                              f"that folder to resume from the previous checkpoint") from err


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
        raise CheckpointError(f"cannot read weights {path}: {err}") from err
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in flat.items():
        prefix, _, rest = key.partition("/")
        groups.setdefault(prefix, {})[rest] = value
    return groups


def load_train_state(ckpt: str) -> dict[str, Any]:
    path = os.path.join(ckpt, STATE)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means a damaged file
        raise CheckpointError(f"cannot read train state {path}: {type(err).__name__}: {err}; "
                              f"remove that checkpoint folder to resume from the previous "
                              f"one") from err
