"""Write-on-first-use shard folders in a cache directory, atomically, validated on reuse.

``ensure_cached(cache_dir, "digits-r8", build, expect_total=1797)`` returns the folder
``<cache_dir>/digits-r8/`` holding ``shard-000000.tar``... and ``manifest.json``. The first use
writes into a hidden temporary folder beside it and renames it into place, so a reader never sees
half a folder; when two processes race, the second rename fails, and the loser checks and uses
the winner's folder. A folder that fails validation (no or unreadable manifest, wrong total,
missing or resized shard) is moved aside and rebuilt, with a warning.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
import warnings
from pathlib import Path
from typing import Callable, Optional

from mfrecipes.data.manifest import FILENAME, Manifest
from mfrecipes.errors import DataError


class CacheRebuildWarning(UserWarning):
    """A cached shard folder was invalid and is being rebuilt."""


def default_cache_dir(recipe=None) -> Path:
    """The cache folder of every download, shard set and metric model: the recipe's
    ``run.cache_dir`` when given and set, else ``$MFR_CACHE_DIR``, else ``~/.cache/mfrecipes``.
    (The one definition: the builder, the loop, ``evaluate/`` and the metric models use it.)"""
    chosen = getattr(getattr(recipe, "run", None), "cache_dir", None)
    if chosen:
        return Path(chosen).expanduser()
    env = os.environ.get("MFR_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mfrecipes"


def problem(folder: Path, expect_total: int) -> Optional[str]:
    """Why ``folder`` is not a valid cached shard folder, or None if it is."""
    path = folder / FILENAME
    if not path.is_file():
        return f"{path} is missing"
    try:
        manifest = Manifest.from_json(json.loads(path.read_text()), where=str(path))
    except (OSError, ValueError, DataError) as err:
        return f"{path} is unreadable ({err})"
    if manifest.total != expect_total:
        return f"{path} counts {manifest.total} samples, expected {expect_total}"
    for s in manifest.shards:
        shard = folder / s.name
        size = shard.stat().st_size if shard.is_file() else None
        if size is None:
            return f"{shard} is missing"
        if s.bytes is not None and size != s.bytes:
            return f"{shard} has {size} bytes, the manifest says {s.bytes}"
    return None


def ensure_cached(cache_dir: str | os.PathLike | None, name: str,
                  build: Callable[[str], Manifest], *, expect_total: int) -> Path:
    """The valid folder ``<cache_dir>/<name>``, written by ``build(tmp_folder)`` if needed."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    folder = root / name
    why = problem(folder, expect_total)
    if why is None:
        return folder
    if folder.exists():
        warnings.warn(f"rebuilding cached shards {folder}: {why}", CacheRebuildWarning,
                      stacklevel=3)
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root))
    except OSError as err:
        raise DataError(f"cannot write the dataset cache: {err}; set cache_dir or "
                        f"MFR_CACHE_DIR to a writable folder", path=str(root)) from err
    stale = root / f".{name}.stale-{uuid.uuid4().hex[:8]}"
    try:
        build(str(tmp))
        if (bad := problem(tmp, expect_total)) is not None:
            raise RuntimeError(f"freshly built shards failed validation: {bad}")
        if folder.exists():
            if problem(folder, expect_total) is None:  # another process finished first
                return folder
            try:
                os.rename(folder, stale)
            except FileNotFoundError:
                pass
        try:
            os.rename(tmp, folder)
        except OSError:
            # Lost a race: another process renamed its folder into place in between.
            if problem(folder, expect_total) is None:
                return folder
            raise
        return folder
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(stale, ignore_errors=True)
