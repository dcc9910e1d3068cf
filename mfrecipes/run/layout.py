"""The run directory's layout: the name of every record, and where the weights are.

A run directory ``RUN_DIR`` holds::

    recipe.resolved.yaml   the recipe as it ran, every component default written out, redacted
    plugins.json           the plugins and recipe modules the run imported
    env.json               versions, device, world size, git commit, the (redacted) command line
    history.jsonl          one line per start or resume: what changed, who
    metrics.jsonl          the training record (the ``jsonl`` logger)
    eval.jsonl             the records of ``mfr eval``
    .lock                  the writer's OS lock (one process trains a run at a time)
    samples/               sample files of the evaluations and of ``mfr sample``
    checkpoints/
        img-000000012800/          images seen, zero-padded so names sort by progress
            weights.safetensors    raw weights as ``net/*`` and every EMA as ``ema_<decay>/*``
            train_state.pt         optimiser, RNG states, data position, counters
            deepspeed/             DeepSpeed's own files (engine: deepspeed)
            meta.json              images, step, versions, sizes and SHA-256 of the two files
        latest                     the name of the newest complete checkpoint
        damaged-img-.../           a checkpoint that failed verification, set aside (kept)

This module spells those names and finds weights (the newest complete or verified checkpoint,
an EMA group, ``init_from``); it reads, and writes only through ``atomic_write_text``. It
imports nothing from ``recipe/`` or ``train/``: both build on it. Writing checkpoints is
``mfrecipes.train.checkpoint``; the other records are ``mfrecipes.run.records``.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
from typing import Any, Optional

from mfrecipes.errors import CheckpointError

# -- the records -------------------------------------------------------------------------------
RESOLVED = "recipe.resolved.yaml"
PLUGINS = "plugins.json"
ENV = "env.json"
HISTORY = "history.jsonl"
METRICS = "metrics.jsonl"
EVAL = "eval.jsonl"
LOCK = ".lock"
SAMPLES = "samples"
CHECKPOINTS = "checkpoints"

# -- one checkpoint folder ---------------------------------------------------------------------
WEIGHTS = "weights.safetensors"
STATE = "train_state.pt"
META = "meta.json"
LATEST = "latest"
DAMAGED = "damaged-"
PREFIX = "img-"
# Weights groups: the raw (trained) weights, and one per EMA decay.
RAW = "net"
EMA_PREFIX = "ema_"


def checkpoints_dir(run_dir: str) -> str:
    return os.path.join(run_dir, CHECKPOINTS)


def samples_dir(run_dir: str) -> str:
    return os.path.join(run_dir, SAMPLES)


def ema_key(decay: float) -> str:
    """Stable name of one EMA in checkpoints and logs: ``ema_0.9999``."""
    return f"{EMA_PREFIX}{decay:g}"


def is_ema(group: str) -> bool:
    return group.startswith(EMA_PREFIX)


def file_digest(path: str) -> dict[str, Any]:
    """``{"bytes": size, "sha256": hex}`` of a file, read in 8 MiB chunks."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
            size += len(chunk)
    return {"bytes": size, "sha256": h.hexdigest()}

def fsync_dir(path: str) -> None:
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
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.remove(tmp)  # a full disk leaves the old file and no half-written one
        raise
    fsync_dir(os.path.dirname(os.path.abspath(path)))

def disk_full(err: BaseException) -> bool:
    return isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)

def checkpoint_name(images: int) -> str:
    return f"{PREFIX}{images:012d}"

def complete_names(ckpt_root: str) -> list[str]:
    """The names of the complete checkpoints (``meta.json`` written last) in progress order."""
    names = [n for n in os.listdir(ckpt_root) if n.startswith(PREFIX)
             and os.path.isfile(os.path.join(ckpt_root, n, META))]
    return sorted(names)

def latest_checkpoint(ckpt_root: str) -> str | None:
    """The newest complete checkpoint folder, or None when there is none."""
    if not os.path.isdir(ckpt_root):
        return None
    complete = complete_names(ckpt_root)
    pointer = os.path.join(ckpt_root, LATEST)
    try:
        with open(pointer, encoding="utf-8") as f:
            name = f.read().strip()
    except (OSError, ValueError):  # missing, or not text: the folder names decide
        name = None
    if name in complete:
        return os.path.join(ckpt_root, name)
    return os.path.join(ckpt_root, complete[-1]) if complete else None

def checkpoints_newest_first(ckpt_root: str) -> list[str]:
    """Every complete checkpoint folder, newest first (the one ``latest`` names leads)."""
    if not os.path.isdir(ckpt_root):
        return []
    names = complete_names(ckpt_root)[::-1]
    first = latest_checkpoint(ckpt_root)
    if first is not None:
        names.remove(os.path.basename(first))
        names.insert(0, os.path.basename(first))
    return [os.path.join(ckpt_root, n) for n in names]

def load_meta(ckpt: str) -> dict:
    path = os.path.join(ckpt, META)
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError) as err:  # ValueError: bad JSON, or bytes that are not UTF-8
        raise CheckpointError(f"damaged checkpoint file {path}: not readable JSON ({err}); "
                              f"resume uses the previous checkpoint") from err
    if not isinstance(meta, dict):
        raise CheckpointError(f"damaged checkpoint file {path}: holds a {type(meta).__name__}, "
                              f"not the checkpoint's record")
    return meta

def verify_checkpoint(ckpt: str) -> dict:
    """The checkpoint's ``meta.json`` once its files match it: sizes and SHA-256 checksums,
    and the image count in the folder's name. A mismatch is a ``CheckpointError`` of one line
    naming the file. (Checkpoints written before checksums existed are checked for presence.)"""
    meta = load_meta(ckpt)
    where = os.path.join(ckpt, META)
    name = os.path.basename(os.path.normpath(ckpt))
    images = meta.get("images")
    if not isinstance(images, int) or (name.startswith(PREFIX) and
                                       name != checkpoint_name(images)):
        raise CheckpointError(f"inconsistent checkpoint {where}: images {images!r} does not "
                              f"match the folder name {name}")
    files = meta.get("files")
    if files is not None and not isinstance(files, dict):
        raise CheckpointError(f"damaged checkpoint file {where}: 'files' is not a mapping")
    for fn in (WEIGHTS, STATE):
        path = os.path.join(ckpt, fn)
        if not os.path.isfile(path):
            raise CheckpointError(f"damaged checkpoint: {path} is missing")
        want = (files or {}).get(fn)
        if files is None:
            continue
        if not isinstance(want, dict):
            raise CheckpointError(f"damaged checkpoint file {where}: no checksum for {fn}")
        size = os.path.getsize(path)
        if size != want.get("bytes"):
            raise CheckpointError(f"damaged checkpoint file {path}: {size} bytes, "
                                  f"{want.get('bytes')} were written (truncated or changed)")
        if file_digest(path)["sha256"] != want.get("sha256"):
            raise CheckpointError(f"damaged checkpoint file {path}: its SHA-256 checksum does "
                                  f"not match the one written with it")
    return meta


# -- reading the JSON-lines records ---------------------------------------------------------
def read_jsonl(path: str) -> list[dict]:
    """The records of a JSON-lines file (missing file: none; a line cut by a crash: skipped)."""
    out = []
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
    return out


# -- metric backends -----------------------------------------------------------------------------


# -- finding weights ---------------------------------------------------------------------------
def newest_verified(run_dir: str) -> Optional[tuple[str, dict]]:
    """``(folder, meta)`` of the newest checkpoint of ``run_dir`` whose files match their
    checksums, or None when none does."""
    for folder in checkpoints_newest_first(checkpoints_dir(run_dir)):
        try:
            return folder, verify_checkpoint(folder)
        except CheckpointError:
            continue
    return None


def find_checkpoint(run_dir: str, checkpoint: Optional[str] = None) -> str:
    """The checkpoint folder: ``checkpoint`` (a folder, or a name under RUN_DIR/checkpoints) or,
    by default, the newest complete one."""
    root = checkpoints_dir(run_dir)
    if checkpoint is None:
        folder = latest_checkpoint(root)
        if folder is None:
            raise CheckpointError(f"run {run_dir} has no complete checkpoint under {root}; train "
                                  f"it first (mfr run) or pass --checkpoint FOLDER")
        return folder
    for cand in (checkpoint, os.path.join(root, checkpoint)):
        if os.path.isfile(os.path.join(cand, WEIGHTS)):
            return cand
    names = sorted(n for n in os.listdir(root) if n.startswith(PREFIX)) \
        if os.path.isdir(root) else []
    raise CheckpointError(f"checkpoint {checkpoint!r} not found (no {WEIGHTS}); valid: a "
                          f"checkpoint folder, or one of {names or 'none'} under {root}")


def select_weights(groups: dict[str, dict], which: str, *, order: Optional[list] = None
                   ) -> str:
    """The weights group for ``which``: ``ema`` (the first EMA, in ``order`` when given),
    ``raw`` (the trained weights, group ``net``) or an exact group name such as ``ema_0.999``."""
    emas = [k for k in (order or sorted(groups)) if is_ema(k) and k in groups]
    if which == "ema":
        if not emas:
            raise CheckpointError(f"the checkpoint holds no EMA weights (groups: "
                                  f"{', '.join(sorted(groups))}); use --weights raw")
        return emas[0]
    if which in ("raw", RAW):
        return RAW
    if which in groups:
        return which
    raise CheckpointError(f"no weights {which!r} in the checkpoint; valid: ema, raw, "
                          f"{', '.join(sorted(k for k in groups if k != RAW))}")


def find_init_weights(where: str) -> str:
    """The weights file behind ``init_from.path``: a run directory, a checkpoint folder or a
    file."""
    if os.path.isfile(where) and where.endswith(".safetensors"):
        return where
    if os.path.isfile(os.path.join(where, WEIGHTS)):
        return os.path.join(where, WEIGHTS)
    latest = latest_checkpoint(checkpoints_dir(where))
    if latest is not None:
        return os.path.join(latest, WEIGHTS)
    raise CheckpointError(f"no weights at {where!r}: expected a run directory with "
                          f"{CHECKPOINTS}/, a checkpoint folder holding {WEIGHTS}, or a "
                          f".safetensors file", path="init_from.path")
