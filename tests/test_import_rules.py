"""The dependency rules of ARCHITECTURE.md that import-linter cannot say simply.

import-linter (run by the test command) forbids engine -> platform SDKs,
databases and vector stores, and persistence -> adapters. This test adds:
only ``engine/providers/`` imports LLM SDKs and pybreaker, and in
``adapters/`` only the composition root and the CLI import ``persistence``.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LLM_SDKS = {"openai", "aioboto3", "aiobotocore", "botocore", "boto3", "pybreaker"}
# adapters/wiring/: the composition root (build.py with its scale-out and platform parts)
COMPOSITION_ROOT = ROOT / "adapters" / "wiring"


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


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


def test_rules_see_the_code() -> None:
    # Guard against the walk silently finding nothing (a moved tree passes vacuously).
    assert len(list((ROOT / "engine").rglob("*.py"))) >= 3
    assert "engine" in _imports(COMPOSITION_ROOT / "settings.py")
