"""Imports flow one way: connectors -> harmonize -> twin_store -> flows."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["connectors", "harmonize", "twin_store", "flows"]


def imported_stages(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        found |= {n.split(".")[0] for n in names} & set(STAGES)
    return found


def test_no_stage_imports_a_later_stage() -> None:
    violations = []
    for rank, stage in enumerate(STAGES):
        for path in (ROOT / stage).rglob("*.py"):
            for target in imported_stages(path):
                if STAGES.index(target) > rank:
                    violations.append(f"{path.relative_to(ROOT)} imports {target}")
    assert violations == []


def test_the_checker_sees_imports(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("import flows.sync\nfrom twin_store import connect\nimport os\n")
    assert imported_stages(module) == {"flows", "twin_store"}
