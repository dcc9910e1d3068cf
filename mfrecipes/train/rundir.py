"""The run directory records what ran: resolved recipe, plugins, environment."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

from mfrecipes import __version__, plugins
from mfrecipes.recipe.load import dump_yaml
from mfrecipes.train.checkpoint import atomic_write_text

RESOLVED = "recipe.resolved.yaml"


def git_commit() -> str | None:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _redact_arg(arg: str) -> str:
    """Hide the value of a storage-options override (it may be a credential)."""
    key, eq, _ = arg.partition("=")
    return f"{key}=***" if eq and "storage_options" in key else arg


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
        "argv": [_redact_arg(a) for a in sys.argv],
    }
    for mod in ("timm", "webdataset", "deepspeed"):
        m = sys.modules.get(mod)
        if m is not None:
            env[mod] = getattr(m, "__version__", "?")
    return env


def write_run_records(run_dir: str, resolved: dict, *, world_size: int, device: str) -> None:
    os.makedirs(run_dir, exist_ok=True)
    from mfrecipes.data.remote import redact_recipe
    from mfrecipes.recipe.build import with_component_defaults

    # Every component parameter is written with its value, defaults included: the record keeps
    # its meaning when a default changes in a later version.
    resolved = with_component_defaults(resolved)

    # Credentials given in a recipe (data.params.storage_options) never reach the disk.
    atomic_write_text(os.path.join(run_dir, RESOLVED), dump_yaml(redact_recipe(resolved)))
    atomic_write_text(os.path.join(run_dir, "plugins.json"), json.dumps({
        "entry_points": [p.as_dict() for p in plugins.all_plugins()],
        "imports": plugins.imported_modules(),
    }, indent=1))
    atomic_write_text(os.path.join(run_dir, "env.json"),
                      json.dumps(environment(world_size, device), indent=1))
