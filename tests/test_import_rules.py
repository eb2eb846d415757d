"""The dependency rules of ARCHITECTURE.md that import-linter cannot say simply.

import-linter (run by the test command, contracts in ``pyproject.toml``)
keeps the rooms apart: engine -> no platform SDK or storage, persistence ->
never adapters, one store room never imports another, the adapters' layers
(cli > wiring > platforms | ops > chat), platforms independent of each
other, only ``adapters/wiring/`` reaching storage, and no import circle
between siblings. This test adds: only ``engine/providers/`` imports LLM
SDKs and pybreaker, only the composition root imports ``persistence``
(checked file by file, so a lazy import inside a function counts too), and
the size limits that keep every room findable.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("adapters", "engine", "persistence")
LLM_SDKS = {"openai", "aioboto3", "aiobotocore", "botocore", "boto3", "pybreaker"}
COMPOSITION_ROOT = ROOT / "adapters" / "wiring"
# A room past ~10 modules is split; a module past ~400 lines is split (docs/development.md
# "Development"). The margins allow "about", not a new habit.
MAX_MODULES_PER_FOLDER = 10
MAX_LINES_PER_MODULE = 420


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


def _modules() -> list[Path]:
    return [p for package in PACKAGES for p in (ROOT / package).rglob("*.py")
            if "migrations" not in p.relative_to(ROOT).parts]


def test_only_providers_import_llm_sdks() -> None:
    offenders = [
        (str(p.relative_to(ROOT)), sorted(_imports(p) & LLM_SDKS))
        for p in (ROOT / "engine").rglob("*.py")
        if "providers" not in p.relative_to(ROOT / "engine").parts
        and _imports(p) & LLM_SDKS
    ]
    assert offenders == []


def test_only_composition_root_imports_persistence() -> None:
    offenders = [
        str(p.relative_to(ROOT))
        for p in (ROOT / "adapters").rglob("*.py")
        if not p.is_relative_to(COMPOSITION_ROOT) and "persistence" in _imports(p)
    ]
    assert offenders == []


def test_no_room_holds_more_than_about_ten_modules() -> None:
    crowded = {}
    for folder in {p.parent for p in _modules()}:
        count = len([p for p in folder.glob("*.py")
                     if p.name not in ("__init__.py", "__main__.py")])
        if count > MAX_MODULES_PER_FOLDER:
            crowded[str(folder.relative_to(ROOT))] = count
    assert crowded == {}, "split these folders into rooms named for what they own"


def test_no_module_is_longer_than_about_four_hundred_lines() -> None:
    long = {str(p.relative_to(ROOT)): n for p in _modules()
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES_PER_MODULE}
    assert long == {}, "split these modules"


def test_every_room_is_a_package() -> None:
    # A folder without __init__.py is a namespace package: mypy, setuptools'
    # find and import-linter each treat it differently. Every room has one.
    folders = {p.parent for p in _modules()}
    assert sorted(str(f.relative_to(ROOT)) for f in folders
                  if not (f / "__init__.py").is_file()) == []


def test_rules_see_the_code() -> None:
    # Guard against the walk silently finding nothing (a moved tree passes vacuously).
    assert len(list((ROOT / "engine").rglob("*.py"))) >= 3
    assert len(_modules()) >= 60
    assert "engine" in _imports(COMPOSITION_ROOT / "settings.py")
    assert "persistence" in _imports(COMPOSITION_ROOT / "build.py")
