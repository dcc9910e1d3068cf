"""Shared test set-up: a per-session cache directory, so tests never touch the user's cache."""
from __future__ import annotations

import importlib.util
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session", autouse=True)
def _session_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("mfr-cache")
    old = os.environ.get("MFR_CACHE_DIR")
    os.environ["MFR_CACHE_DIR"] = str(cache)
    yield str(cache)
    if old is None:
        os.environ.pop("MFR_CACHE_DIR", None)
    else:
        os.environ["MFR_CACHE_DIR"] = old


@pytest.fixture
def repo_root() -> str:
    return REPO


def load_tool(name: str):
    """Import ``tools/<name>.py`` (the tools are scripts, not a package) as a module."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
