"""The import arrows between the packages, and the one home of the run directory's names.

Read from the source with ``ast`` (nothing is imported): every ``import`` and ``from ... import``
of a module, at any depth (imports inside functions count too).

- ``recipe/`` (the recipe language: schema and loader) imports only ``errors`` and itself.
- ``train/`` sees of ``recipe/`` only the plain data types of ``recipe.schema``; the builder
  ``mfrecipes.build`` (recipe -> components) imports nothing of ``train/``, and in ``train/`` only
  ``loop.py`` (the trainer, which turns a recipe into a run) imports it.
- ``run/layout.py`` imports no package module besides ``errors``: the builder, the trainer, the
  CLI and ``evaluate/`` all build on it.
- The file names of the run directory's records are spelled in ``run/layout.py`` only.
"""
from __future__ import annotations

import ast
import functools
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "mfrecipes"

# The records of a run directory and of a checkpoint folder (see mfrecipes/run/layout.py).
RECORD_NAMES = {"recipe.resolved.yaml", "plugins.json", "env.json", "history.jsonl",
                "metrics.jsonl", "eval.jsonl", ".lock", "checkpoints", "weights.safetensors",
                "train_state.pt", "meta.json"}
# The same words for other folders than a run's: torch.hub keeps its downloads in a folder of its
# own called "checkpoints" (the FID model), and the probe-set cache writes its own meta.json.
NOT_THE_RUN = {("checkpoints", "evaluate/fid.py"), ("meta.json", "evaluate/exact.py")}


@functools.lru_cache(maxsize=None)
def _sources() -> tuple[tuple[str, str, ast.AST], ...]:
    """``(path relative to the package, text, tree)`` of every module, parsed once."""
    out = []
    for path in sorted(PKG.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        out.append((str(path.relative_to(PKG)), text, ast.parse(text)))
    return tuple(out)


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(source, module: str, is_package: bool = False) -> set[str]:
    """Every module named by an import in ``source`` (``from a import b`` gives ``a`` and
    ``a.b``: ``b`` may be a submodule); relative imports are resolved against ``module``."""
    out: set[str] = set()
    tree = source if isinstance(source, ast.AST) else ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                anchor = anchor if is_package else anchor[:-1]
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names)
    return out


def _graph() -> dict[str, set[str]]:
    return {rel: imports_of(tree, _module_name(PKG / rel), rel.endswith("__init__.py"))
            for rel, _, tree in _sources()}


def _under(imported: set[str], prefix: str) -> set[str]:
    return {m for m in imported if m == prefix or m.startswith(prefix + ".")}


def test_the_scanner_sees_every_kind_of_import():
    src = ("import mfrecipes.train.loop\n"
           "def f():\n    from mfrecipes.train import checkpoint as ckpt\n"
           "from ..train.log import read\n")
    got = imports_of(src, "mfrecipes.recipe.load")
    assert "mfrecipes.train.loop" in got
    assert "mfrecipes.train.checkpoint" in got          # a submodule named by from-import
    assert "mfrecipes.train.log" in got                 # relative, inside the package
    assert not imports_of("import os\nfrom typing import Any\n", "mfrecipes.x") & {"mfrecipes"}


def test_the_recipe_language_is_a_leaf():
    """recipe/ (schema and loader) imports nothing of the package but errors and itself: not
    train/, not the builder, not the registries or components."""
    graph = _graph()
    bad = {f: sorted(m for m in imp if m.startswith("mfrecipes.")
                     and not m.startswith(("mfrecipes.recipe", "mfrecipes.errors")))
           for f, imp in graph.items() if f.startswith("recipe/")}
    assert not {f: m for f, m in bad.items() if m}, bad


def test_train_sees_only_the_schema_and_only_the_trainer_builds():
    graph = _graph()
    # train/ (the trainer included) reads recipes as the schema's plain data types only
    other = {f: sorted(m for m in _under(imp, "mfrecipes.recipe")
                       if m not in ("mfrecipes.recipe.schema",)
                       and not m.startswith("mfrecipes.recipe.schema."))
             for f, imp in graph.items() if f.startswith("train/")}
    assert not {f: m for f, m in other.items() if m}, other
    # the builder (recipe -> components) is imported in train/ by the trainer only, and it
    # imports nothing of train/ (no arrow back up)
    bad = {f: sorted(_under(imp, "mfrecipes.build")) for f, imp in graph.items()
           if f.startswith("train/") and f != "train/loop.py"
           and _under(imp, "mfrecipes.build")}
    assert not bad, f"train/ modules other than loop.py import mfrecipes.build: {bad}"
    assert "mfrecipes.build" in graph["train/loop.py"]
    assert not _under(graph["build.py"], "mfrecipes.train"), sorted(graph["build.py"])


def test_run_layout_builds_on_nothing_above_it():
    imported = _graph()["run/layout.py"]
    ours = {m for m in imported if m.startswith("mfrecipes")}
    assert ours <= {"mfrecipes.errors", "mfrecipes.errors.CheckpointError"}, sorted(ours)


def test_record_names_are_spelled_in_the_layout_only():
    spelled: dict[str, list[str]] = {}
    for rel, _, tree in _sources():
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and node.value in RECORD_NAMES:
                if (node.value, rel) in NOT_THE_RUN:
                    continue
                spelled.setdefault(node.value, []).append(f"{rel}:{node.lineno}")
    outside = {name: [w for w in where if not w.startswith("run/layout.py:")]
               for name, where in spelled.items()}
    assert not {k: v for k, v in outside.items() if v}, outside
    assert set(spelled) == RECORD_NAMES  # every one of them is defined there


# -- one of each helper ------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _functions() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for rel, _, tree in _sources():
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef):
                out.setdefault(node.name, []).append(f"{rel}:{node.lineno}")
    return out


def _defined(name: str) -> list[str]:
    return _functions().get(name, [])


def test_each_helper_is_defined_once():
    where = {name: _defined(name) for name in (
        "default_cache_dir", "pick_device", "save_samples", "check_real", "check_probability",
        "check_param_types", "number", "optional_number", "integer", "one_of", "as_tuple",
        "find_init_weights", "find_checkpoint", "select_weights", "ema_key", "read_jsonl")}
    assert all(len(v) == 1 for v in where.values()), where
    home = {name: v[0].split(":")[0] for name, v in where.items()}
    assert {home[n] for n in ("check_real", "check_probability", "check_param_types", "number",
                              "integer", "one_of")} == {"validate.py"}
    assert {home[n] for n in ("find_init_weights", "find_checkpoint", "select_weights",
                              "ema_key", "read_jsonl")} == {"run/layout.py"}


def test_sample_pictures_are_drawn_by_modality_in_one_place():
    """Outside plots.py nothing calls the scatter or grid writers itself: the loop's evaluation
    and ``mfr sample`` go through ``plots.save_samples``."""
    direct = []
    for rel, _, tree in _sources():
        if rel == "plots.py":
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in (
                    "save_scatter", "labelled_grid", "save_image_grid", "save_labelled_grid"):
                direct.append(f"{rel}:{node.lineno} {node.attr}")
    assert not direct, direct
    users = {rel for rel, text, _ in _sources() if "save_samples(" in text}
    assert {"train/loop.py", "evaluate/commands.py"} <= users


def test_save_samples_dispatches_on_modality(tmp_path):
    import pytest
    import torch

    from mfrecipes import plots

    gen = torch.Generator().manual_seed(0)
    x = torch.rand(4, 1, 8, 8, generator=gen) * 2 - 1
    # 8x8 cells are enlarged 4x to 32 px, padded by 2: width = 2 + columns * 34.
    by_class = plots.save_samples(x, tmp_path / "a.png", modality="image", title="t",
                                  class_columns=4)
    square = plots.save_samples(x, tmp_path / "b.png", modality="image", title="t")
    assert by_class.shape[1] == 2 + 4 * 34 and square.shape[1] == 2 + 2 * 34
    assert (tmp_path / "a.png").stat().st_size > 0 and (tmp_path / "b.png").is_file()

    seen = []

    def decode(z):
        seen.append(z.shape)
        return x  # the "decoded" images
    lat = plots.save_samples(torch.zeros(4, 2, 3, 3), tmp_path / "c.png", modality="latent",
                             title="t", class_columns=4, decode=decode)
    assert seen == [torch.Size([4, 2, 3, 3])] and (lat == by_class).all()
    with pytest.raises(ValueError, match="decode"):
        plots.save_samples(x, tmp_path / "d.png", modality="latent", title="t")
    with pytest.raises(ValueError, match="valid: points, image, latent"):
        plots.save_samples(x, tmp_path / "e.png", modality="audio", title="t")
    pts = torch.randn(30, 2, generator=gen)
    assert plots.save_samples(pts, tmp_path / "f.png", modality="points", title="t",
                              reference=torch.randn(30, 2, generator=gen)) is None
    assert (tmp_path / "f.png").stat().st_size > 1000


def test_default_cache_dir_prefers_the_recipe_then_the_environment(tmp_path, monkeypatch):
    from pathlib import Path
    from types import SimpleNamespace

    from mfrecipes.data.cache import default_cache_dir

    monkeypatch.setenv("MFR_CACHE_DIR", str(tmp_path / "env"))
    chosen = SimpleNamespace(run=SimpleNamespace(cache_dir=str(tmp_path / "recipe")))
    unset = SimpleNamespace(run=SimpleNamespace(cache_dir=None))
    assert default_cache_dir(chosen) == tmp_path / "recipe"
    assert default_cache_dir(unset) == default_cache_dir() == tmp_path / "env"
    monkeypatch.delenv("MFR_CACHE_DIR")
    assert default_cache_dir() == Path.home() / ".cache" / "mfrecipes"


def test_pick_device_names_where_cuda_was_asked_for(monkeypatch):
    import pytest
    import torch

    from mfrecipes.devices import pick_device
    from mfrecipes.errors import RecipeError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto") == pick_device(None) == torch.device("cpu")
    assert pick_device("cpu", where="--device") == torch.device("cpu")
    for where in ("run.device", "--device"):
        with pytest.raises(RecipeError) as err:
            pick_device("cuda:0", where=where)
        assert err.value.path == where and "no CUDA device" in str(err.value)
