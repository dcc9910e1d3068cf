"""The run directory's records: what ran (resolved recipe, plugins, environment), who writes it
(one process at a time, by an OS lock), what may differ on resume, and the resume history.
The file names are ``mfrecipes.run.layout``'s.

Every record passes through one redaction (``redact_recipe``, ``redact``, ``scrub``: they are
implemented with the storage options in ``mfrecipes.data.remote`` and reach the run directory
through this module, with ``redact_argv`` for the command line): a value under a secret-looking
key (key, secret, token, password, session, credentials...) at any depth, in the recipe and in
the command line, is written as ``***``.
"""
from __future__ import annotations

import datetime
import getpass
import json
import os
import platform
import socket
import subprocess
import sys
from typing import Any

from mfrecipes import __version__, plugins
from mfrecipes.data.remote import (REDACTED, drop_redacted, is_secret_key,  # noqa: F401
                                   redact, redact_recipe, scrub)
from mfrecipes.recipe.load import dump_yaml
from mfrecipes.run.layout import ENV, HISTORY, LOCK, PLUGINS, RESOLVED, atomic_write_text

# Keys that may differ when a run is resumed; anything else is refused with its key path.
# The image budget and the cadences of logging, checkpoints and evaluation do not touch the
# training math (evaluation never draws from the training generators); the engine, ZeRO stage,
# micro batch, compilation and device change how a step is computed, not what it computes (the
# global batch is fixed); max_nonfinite is the safety net's tolerance; logger backends only
# observe; credentials may rotate.
MAY_CHANGE = frozenset({
    "train.total_images", "train.log_every_images", "train.checkpoint_every_images",
    "train.keep_checkpoints", "train.progress_bar", "train.max_nonfinite", "train.loggers",
    "train.micro_batch_size", "train.compile", "train.compile_mode",
    "eval.every_images", "eval.at_end", "engine", "deepspeed.zero_stage",
    "run.device", "run.out_dir", "run.cache_dir"})


def git_commit() -> str | None:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _redact_arg(arg: str) -> str:
    """An override with its secret values hidden: the value of a secret-looking key path, and
    secret keys inside a whole-block value (``data.params={storage_options: {key: K}}``)."""
    import yaml

    key, eq, raw = arg.partition("=")
    if not eq or key.startswith("-") or not key:
        return scrub(arg)
    from mfrecipes.errors import RecipeError
    from mfrecipes.recipe.load import MAX_DEPTH, check_size, safe_yaml

    parts = key.strip().split(".")
    if len(parts) > MAX_DEPTH:  # refused by the loader; never walk it here
        return f"{scrub(key[:200])}...={REDACTED}"
    try:
        value = safe_yaml(raw, "override value") if raw.strip() else None
        check_size(value, "override value")
    except RecipeError:  # too deep or too large to inspect safely: hide the whole value
        return f"{scrub(key)}={REDACTED}"
    except yaml.YAMLError:
        value = raw
    nested: Any = value
    for p in reversed(parts):
        nested = {p: nested}
    red = redact_recipe(nested)
    for p in parts:
        red = red[p]
    if red == REDACTED or (red != value and not isinstance(red, str)):
        return scrub(f"{key}={red if red == REDACTED else json.dumps(red)}")
    if any(is_secret_key(p) for p in parts) and red != value:
        return f"{key}={REDACTED}"
    return scrub(arg)


def redact_argv(argv: list[str]) -> list[str]:
    return [_redact_arg(a) for a in argv]


def environment(world_size: int = 1, device: str = "cpu") -> dict:
    import torch

    env = {
        "mfrecipes": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": device,
        "world_size": world_size,
        "git_commit": git_commit(),
        "argv": redact_argv(sys.argv),
    }
    for mod in ("timm", "webdataset", "deepspeed"):
        m = sys.modules.get(mod)
        if m is not None:
            env[mod] = getattr(m, "__version__", "?")
    return env


def write_run_records(run_dir: str, resolved: dict, *, world_size: int, device: str) -> None:
    os.makedirs(run_dir, exist_ok=True)
    from mfrecipes.build import with_component_defaults

    # Every component parameter is written with its value, defaults included: the record keeps
    # its meaning when a default changes in a later version.
    resolved = with_component_defaults(resolved)

    # Credentials given in a recipe or an override never reach the disk.
    atomic_write_text(os.path.join(run_dir, RESOLVED), dump_yaml(redact_recipe(resolved)))
    atomic_write_text(os.path.join(run_dir, PLUGINS), json.dumps({
        "entry_points": [p.as_dict() for p in plugins.all_plugins()],
        "imports": plugins.imported_modules(),
    }, indent=1))
    atomic_write_text(os.path.join(run_dir, ENV),
                      json.dumps(environment(world_size, device), indent=1))


def who() -> dict:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = None
    return {"user": user, "host": socket.gethostname(), "pid": os.getpid()}


# -- one writer --------------------------------------------------------------------------------
class RunLock:
    """An exclusive OS lock (``flock``) on ``RUN_DIR/.lock``, held while a process trains.

    The kernel releases it when the process ends, however it ends (kill -9 included), so a
    stale lock never blocks a resume. The file holds the holder's pid, host and start time for
    the refusal message; it is left in place (deleting it would let two processes lock two
    different files of one name).
    """

    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, LOCK)
        self.fd: int | None = None

    def acquire(self) -> "RunLock":
        import fcntl

        from mfrecipes.errors import TrainingError

        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            try:
                holder = json.loads(os.pread(fd, 4096, 0).decode("utf-8") or "{}")
            except (OSError, ValueError):
                holder = {}
            os.close(fd)
            raise TrainingError(
                f"run directory {os.path.dirname(self.path)} is in use by pid "
                f"{holder.get('pid', '?')} on host {holder.get('host', '?')} (since "
                f"{holder.get('since', '?')}); one process writes a run at a time: wait for it "
                f"to finish or stop it, then resume with `mfr run RUN_DIR`") from err
        info = json.dumps({**who(), "since": _now()}).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, info, 0)
        os.fsync(fd)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the only descriptor releases the flock
            self.fd = None


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# -- what may differ on resume -------------------------------------------------------------
def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict) and data:
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: data}


def resume_changes(old: dict, new: dict) -> dict[str, dict]:
    """``{key path: {"from": old, "to": new}}`` between two (redacted) recipe mappings; raises
    a ``RecipeError`` naming every path that may not change on resume."""
    from mfrecipes.errors import RecipeError
    from mfrecipes.build import with_component_defaults

    # A recorded default equals an omitted one (older runs recorded only what was written).
    a = _flatten(redact_recipe(with_component_defaults(old)))
    b = _flatten(redact_recipe(with_component_defaults(new)))
    changed = {k: {"from": a.get(k), "to": b.get(k)} for k in sorted(set(a) | set(b))
               if a.get(k) != b.get(k)}
    refused = [k for k, v in changed.items() if k not in MAY_CHANGE
               and REDACTED not in (v["from"], v["to"])]
    if refused:
        shown = "; ".join(f"{k}: {changed[k]['from']!r} -> {changed[k]['to']!r}"
                          for k in refused[:12])
        raise RecipeError(
            f"the run directory holds a different recipe: {shown}"
            f"{' ...' if len(refused) > 12 else ''}. On resume only "
            f"{', '.join(sorted(MAY_CHANGE))} (and credentials) may change; start a new run "
            f"with --out DIR for the others", path=", ".join(refused))
    return changed


# What a store says when it refuses a request for want of (valid) credentials.
_AUTH_WORDS = ("credential", "access denied", "accessdenied", "forbidden", "invalidaccesskeyid",
               "signaturedoesnotmatch", "permission", "unauthorized", "403")


def load_for_resume(run_dir: str, overrides: list[str]):
    """``(Recipe, resolved mapping, credentials still missing)`` for resuming ``run_dir``.

    The record holds ``***`` for every credential (``redact_recipe``). Those entries are dropped
    before the overrides apply, so a resume logs in with the client's environment
    (``AWS_ACCESS_KEY_ID``..., fsspec's defaults) or with the same override given again
    (``data.params.storage_options.key=K``); the third value lists the dropped key paths that no
    override gave back (for ``credentials_hint``)."""
    from mfrecipes.recipe.load import apply_overrides, check_size, load_raw
    from mfrecipes.recipe.schema import Recipe

    raw, dropped = drop_redacted(load_raw(os.path.join(run_dir, RESOLVED)))
    raw = apply_overrides(raw, overrides)
    check_size(raw, "the recipe with its overrides")
    recipe = Recipe.from_dict(raw)
    data = recipe.to_dict()
    missing = [p for p in dropped if not _has_path(data, p)]
    return recipe, data, missing


def _has_path(data: Any, dotted: str) -> bool:
    node = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or node.get(part) is None:
            return False
        node = node[part]
    return True


def credentials_hint(err: Exception, missing: list[str]) -> str | None:
    """When a resume without the recorded credentials is refused by the store, the sentence
    that says why and how to give them; None when ``err`` is not such a refusal."""
    if not missing or not any(w in str(err).lower() for w in _AUTH_WORDS):
        return None
    return (f"the run directory records {', '.join(missing)} redacted (***, credentials are "
            f"never written), so this resume ran without them; give them through the "
            f"environment (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, "
            f"AWS_PROFILE, or the store's own variables) or the same override again: "
            f"mfr run RUN_DIR {' '.join(p + '=...' for p in missing)}")


def previous_recipe(run_dir: str) -> dict | None:
    """The recorded recipe of ``run_dir``, or None when it has none yet."""
    from mfrecipes.recipe.load import read_yaml

    path = os.path.join(run_dir, RESOLVED)
    return read_yaml(path) if os.path.isfile(path) else None


def append_history(run_dir: str, entry: dict) -> None:
    """One line per start or resume: time, images, what changed, who (redacted)."""
    line = json.dumps(redact({"time": _now(), **entry, "who": who(),
                              "argv": redact_argv(sys.argv)}), default=str)
    with open(os.path.join(run_dir, HISTORY), "a", encoding="utf-8") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())
