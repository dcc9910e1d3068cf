"""The method page the code cites: it ships with the package, every cited section exists, and
every equation number names its paper."""
from __future__ import annotations

import fnmatch
import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
METHOD = ROOT / "mfrecipes" / "METHOD.md"
# Where the project cites the method page or equations (source, tools, plugins, docs, recipes).
CITING_DIRS = ("mfrecipes", "tools", "plugins", "datasets", "recipes")
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml"}
# Papers an equation number may belong to; one of them must be named on the citing line or the
# line before it.
PAPERS = re.compile(r"Kim et al\.|Geng et al\.|MeanFlow,|Lu & Wang|Hsu & Wood|Zhang et al\.|"
                    r"Hang et al\.")
EQ = re.compile(r"\bEqs?\.\s*(\d+)")
# Files being edited elsewhere; a citation in them that needs fixing is listed here, by name.
ALLOWED: frozenset[str] = frozenset()
KIM_EQUATIONS = 9  # Kim et al. 2025 number nine equations (Eqs. 1-9)


def _files(suffixes):
    for d in CITING_DIRS:
        base = ROOT / d
        if not base.is_dir():
            continue
        for path in sorted(base.rglob("*")):
            if path.is_file() and path.suffix in suffixes and path != METHOD \
                    and "__pycache__" not in path.parts:
                yield path


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _headings() -> set[int]:
    return {int(m.group(1)) for m in re.finditer(r"^## (\d+)\. ", METHOD.read_text(), re.M)}


def _section_numbers(after: str) -> list[int]:
    """The section numbers right after a METHOD.md mention: "section 5", "sections 3, 5 and 9"."""
    m = re.match(r",?\s*sections?\s+(\d+(?:\s*(?:,|and|-)\s*\d+)*)", after)
    return [] if m is None else [int(n) for n in re.findall(r"\d+", m.group(1))]


def test_method_page_has_sections_1_to_12():
    assert _headings() == set(range(1, 13))


def test_every_cited_section_exists_and_names_the_shipped_page():
    headings, bad, cites = _headings(), [], 0
    for path in _files(TEXT_SUFFIXES):
        if _rel(path) in ALLOWED:
            continue
        text = path.read_text(errors="replace")
        for m in re.finditer(r"(\S*)METHOD\.md", text):
            line = text.count("\n", 0, m.start()) + 1
            where = f"{_rel(path)}:{line}"
            if not m.group(1).endswith("mfrecipes/"):
                bad.append(f"{where}: cite the page as mfrecipes/METHOD.md, got "
                           f"{m.group(0)!r}")
                continue
            # A citation may wrap onto the next line ("METHOD.md,\n# section 5").
            after = re.sub(r"\s*\n\s*(#\s*)?", " ", text[m.end():m.end() + 80])
            numbers = _section_numbers(after)
            if not numbers:
                bad.append(f"{where}: METHOD.md cited without a section number")
            for n in numbers:
                cites += 1
                if n not in headings:
                    bad.append(f"{where}: section {n} is not a heading of mfrecipes/METHOD.md")
    assert not bad, "\n".join(bad)
    assert cites > 10  # the scan found the code's citations (a broken regex would find none)


def test_every_equation_number_names_its_paper():
    bad, seen = [], 0
    for path in _files({".py"}):
        if _rel(path) in ALLOWED:
            continue
        lines = path.read_text(errors="replace").splitlines()
        for i, line in enumerate(lines):
            for m in EQ.finditer(line):
                seen += 1
                context = (lines[i - 1] if i else "") + "\n" + line
                if not PAPERS.search(context):
                    bad.append(f"{_rel(path)}:{i + 1}: {line.strip()}")
                # Kim et al. 2025 has Eqs. 1-9: a larger number cited to it is wrong.
                if "Kim et al." in line[:m.start()] and int(m.group(1)) > KIM_EQUATIONS:
                    bad.append(f"{_rel(path)}:{i + 1}: Kim et al. 2025 has no Eq. "
                               f"{m.group(1)}")
    assert not bad, "equation numbers without their paper:\n" + "\n".join(bad)
    assert seen > 10


@pytest.mark.parametrize("text, expect", [
    (", section 5)", [5]), (", sections 3, 5 and 9): x", [3, 5, 9]), (" section 10.", [10]),
    (" (the page)", []),
])
def test_section_parser(text, expect):
    assert _section_numbers(text) == expect


def test_equation_check_catches_an_unnamed_citation():
    # The check itself: a bare "Eq. 4" is flagged, a named one is not.
    for text, flagged in [("x = 1  # target (Eq. 4)", True),
                          ("x = 1  # target (Kim et al. 2025, Eq. 4)", False)]:
        assert bool(EQ.search(text)) and (not PAPERS.search(text)) == flagged


def test_method_page_is_package_data():
    assert METHOD.is_file()
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    setuptools = config["tool"]["setuptools"]
    assert "METHOD.md" in setuptools["package-data"]["mfrecipes"]
    assert any(fnmatch.fnmatch("mfrecipes", pat) for pat in setuptools["packages"]["find"]["include"])


def test_method_page_mentions_no_private_material():
    # The page is the project's own: no reference notes, no paper files, no machine paths.
    text = METHOD.read_text()
    for word in ("shared/", "notes/", "papers/", ".txt", "/work"):
        assert word not in text, word


@pytest.mark.slow
def test_built_wheel_contains_the_method_page(tmp_path):
    # Build a wheel from a copy of the package sources (no network, no build isolation) and look.
    import shutil
    import subprocess
    import sys
    import zipfile
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "mfrecipes", src / "mfrecipes",
                    ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps",
                    "--no-build-isolation", "-q", "-w", str(out)], check=True, timeout=600)
    (wheel,) = out.glob("mfrecipes-*.whl")
    assert "mfrecipes/METHOD.md" in zipfile.ZipFile(wheel).namelist()


def test_no_citation_of_pages_the_package_does_not_ship():
    # Readers have the package and the repository, not the team's design or reference notes.
    bad = []
    for path in _files(TEXT_SUFFIXES):
        if _rel(path) in ALLOWED:
            continue
        for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if re.search(r"\b(DESIGN|STYLE)\.md\b|\bnotes/\w+\.md\b", line):
                bad.append(f"{_rel(path)}:{i}: {line.strip()}")
    assert not bad, "\n".join(bad)
