"""The import arrows between the packages, and the one home of the run directory's names.

Read from the source with ``ast`` (nothing is imported): every ``import`` and ``from ... import``
of a module, at any depth (imports inside functions count too).

- ``recipe/`` never imports ``train/``: the recipe builder sits below the trainer.
- In ``train/``, only ``loop.py`` (the trainer, which turns a recipe into a run) imports the
  builder ``recipe.build``; the engines, checkpoints, logs and EMAs see only the plain data types
  of ``recipe.schema``.
- ``run/layout.py`` imports no package module besides ``errors``: the builder, the trainer, the
  CLI and ``evaluate/`` all build on it.
- The file names of the run directory's records are spelled in ``run/layout.py`` only.
"""
from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "mfrecipes"

# The records of a run directory and of a checkpoint folder (see mfrecipes/run/layout.py).
RECORD_NAMES = {"recipe.resolved.yaml", "plugins.json", "env.json", "history.jsonl",
                "metrics.jsonl", "eval.jsonl", ".lock", "checkpoints", "weights.safetensors",
                "train_state.pt", "meta.json"}
# The same words for other folders than a run's: torch.hub keeps its downloads in a folder of its
# own called "checkpoints" (the FID model), and the probe-set cache writes its own meta.json.
NOT_THE_RUN = {("checkpoints", "evaluate/fid.py"), ("meta.json", "evaluate/exact.py")}


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(source: str, module: str, is_package: bool = False) -> set[str]:
    """Every module named by an import in ``source`` (``from a import b`` gives ``a`` and
    ``a.b``: ``b`` may be a submodule); relative imports are resolved against ``module``."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(source)):
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
    graph = {}
    for path in sorted(PKG.rglob("*.py")):
        name = _module_name(path)
        graph[str(path.relative_to(PKG))] = imports_of(path.read_text(encoding="utf-8"), name,
                                                       path.name == "__init__.py")
    return graph


def _under(imported: set[str], prefix: str) -> set[str]:
    return {m for m in imported if m == prefix or m.startswith(prefix + ".")}


def test_the_scanner_sees_every_kind_of_import():
    src = ("import mfrecipes.train.loop\n"
           "def f():\n    from mfrecipes.train import checkpoint as ckpt\n"
           "from ..train.log import read\n")
    got = imports_of(src, "mfrecipes.recipe.build")
    assert "mfrecipes.train.loop" in got
    assert "mfrecipes.train.checkpoint" in got          # a submodule named by from-import
    assert "mfrecipes.train.log" in got                 # relative, inside the package
    assert not imports_of("import os\nfrom typing import Any\n", "mfrecipes.x") & {"mfrecipes"}


def test_recipe_never_imports_train():
    graph = _graph()
    bad = {f: sorted(_under(imp, "mfrecipes.train")) for f, imp in graph.items()
           if f.startswith("recipe/") and _under(imp, "mfrecipes.train")}
    assert not bad, f"recipe/ imports train/: {bad}"


def test_only_the_trainer_imports_the_recipe_builder():
    graph = _graph()
    bad = {f: sorted(_under(imp, "mfrecipes.recipe.build")) for f, imp in graph.items()
           if f.startswith("train/") and f != "train/loop.py"
           and _under(imp, "mfrecipes.recipe.build")}
    assert not bad, f"train/ modules other than loop.py import recipe.build: {bad}"
    # What the rest of train/ may see of recipe/: the schema's plain data types.
    other = {f: sorted(m for m in _under(imp, "mfrecipes.recipe")
                       if m not in ("mfrecipes.recipe", "mfrecipes.recipe.schema")
                       and not m.startswith("mfrecipes.recipe.schema."))
             for f, imp in graph.items() if f.startswith("train/") and f != "train/loop.py"}
    assert not {f: m for f, m in other.items() if m}, other


def test_run_layout_builds_on_nothing_above_it():
    imported = _graph()["run/layout.py"]
    ours = {m for m in imported if m.startswith("mfrecipes")}
    assert ours <= {"mfrecipes.errors", "mfrecipes.errors.CheckpointError"}, sorted(ours)


def test_record_names_are_spelled_in_the_layout_only():
    spelled: dict[str, list[str]] = {}
    for path in sorted(PKG.rglob("*.py")):
        rel = str(path.relative_to(PKG))
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and node.value in RECORD_NAMES:
                if (node.value, rel) in NOT_THE_RUN:
                    continue
                spelled.setdefault(node.value, []).append(f"{rel}:{node.lineno}")
    outside = {name: [w for w in where if not w.startswith("run/layout.py:")]
               for name, where in spelled.items()}
    assert not {k: v for k, v in outside.items() if v}, outside
    assert set(spelled) == RECORD_NAMES  # every one of them is defined there
