"""Registry behaviour: registration, unknown names with suggestions, duplicates, build wiring."""
from __future__ import annotations

import os
import subprocess
import sys

import attrs
import pytest

from mfrecipes.errors import RecipeError
from mfrecipes.plugins import load_components
from mfrecipes.registry import ALL_REGISTRIES, Registry, TIMESTEP_SAMPLERS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_register_and_build_passes_only_named_runtime_args():
    reg = Registry("widget", runtime_args=("device", "num_classes"))

    @reg.register("plain")
    @attrs.frozen
    class Plain:
        a: int = 1

    @reg.register("wired")
    def wired(b: int = 2, *, device=None):
        return ("wired", b, device)

    assert reg.build({"name": "plain", "params": {"a": 5}}, device="cpu", num_classes=3) == Plain(5)
    assert reg.build({"name": "wired"}, device="cpu", num_classes=3) == ("wired", 2, "cpu")


def test_unknown_name_lists_names_and_close_matches():
    load_components()
    with pytest.raises(RecipeError) as info:
        TIMESTEP_SAMPLERS.build({"name": "logit_normall", "params": {}}, where="timestep_sampler")
    msg = str(info.value)
    assert "timestep_sampler" in msg and "did you mean 'logit_normal'" in msg
    assert "available:" in msg and "uniform" in msg and "plugins loaded" in msg


def test_duplicate_names_both_origins():
    reg = Registry("widget")

    @reg.register("x")
    def first():
        return 1

    with pytest.raises(ValueError) as info:
        @reg.register("x")
        def second():
            return 2
    msg = str(info.value)
    assert "first" in msg and "second" in msg and "'x'" in msg


def test_names_must_be_snake_case():
    reg = Registry("widget")
    for bad in ("", "CamelCase", "with-dash", None):
        with pytest.raises(ValueError):
            reg.register(bad)


def test_unknown_param_suggests_and_runtime_args_are_refused():
    reg = Registry("widget", runtime_args=("device",))

    @reg.register("w")
    def w(alpha: float = 1.0, *, device=None):
        return alpha

    with pytest.raises(RecipeError) as info:
        reg.build({"name": "w", "params": {"alpah": 2.0}}, where="thing")
    assert info.value.path == "thing.params.alpah" and "did you mean 'alpha'" in str(info.value)
    with pytest.raises(RecipeError) as info:
        reg.build({"name": "w", "params": {"device": "cpu"}}, where="thing")
    assert "set by the framework" in str(info.value)


def test_every_kind_has_builtins():
    load_components()
    for kind, reg in ALL_REGISTRIES.items():
        assert reg.names(), f"no built-in {kind}"


def test_registry_declares_only_and_the_loader_loads_once():
    """Importing the registry imports no component package and no plugin loader; lookups
    before ``load_components()`` say how to load; the loader is idempotent."""
    code = """
import sys
from mfrecipes import registry
from mfrecipes.errors import RecipeError
assert "mfrecipes.plugins" not in sys.modules, "registry imported the plugin loader"
assert not any(m.startswith(("mfrecipes.objectives", "mfrecipes.backbones")) for m in sys.modules)
assert registry.OBJECTIVES.names() == []
try:
    registry.OBJECTIVES.entry("meanflow")
except RecipeError as err:
    assert "load_components()" in str(err), err
else:
    raise AssertionError("no error before loading")
from mfrecipes import plugins
first = plugins.load_components()
names = registry.OBJECTIVES.names()
assert "meanflow" in names and "flow_matching" in names, names
assert plugins.load_components() == first and registry.OBJECTIVES.names() == names
try:
    registry.OBJECTIVES.entry("meanflw")
except RecipeError as err:
    assert "load_components()" not in str(err) and "did you mean 'meanflow'" in str(err), err
print("ok")
"""
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
