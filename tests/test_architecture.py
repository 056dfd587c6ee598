"""The house rules a reviewer would check by eye: imports flow one way (connectors -> harmonize
-> twin_store -> flows), no module imports itself back through others, modules stay small
enough to read top to bottom, and tests import only `tests.support`, never each other."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["connectors", "harmonize", "twin_store", "flows"]
MAX_LINES = 500
ONE_COHESIVE_THING = {
    "harmonize/sql_on_fhir/fhirpath.py": "the FHIRPath compiler",
    "connectors/genomics/vcf_checks.py": "the VCF specification's rules",
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules() -> dict[str, Path]:
    return {module_name(p): p for stage in STAGES for p in sorted((ROOT / stage).rglob("*.py"))}


def imported(path: Path, known: set[str]) -> set[str]:
    """The modules `path` imports anywhere (at the top, in functions, under TYPE_CHECKING):
    `from a import b` imports `a.b` where that is a module, else `a`."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if submodule in known else node.module)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    return {name: imported(path, set(modules)) & set(modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected set of modules (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            members = []
            while True:
                member = stack.pop()
                members.append(member)
                if member == node:
                    break
            if len(members) > 1 or node in graph.get(node, ()):
                found.append(sorted(members))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_stage_imports_a_later_stage() -> None:
    violations = [
        f"{name} imports {target}"
        for name, targets in import_graph().items()
        for target in targets
        if STAGES.index(target.split(".")[0]) > STAGES.index(name.split(".")[0])
    ]
    assert violations == []


def test_no_module_imports_itself_back() -> None:
    assert cycles(import_graph()) == []


def test_the_cycle_finder_sees_a_circle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_checker_sees_imports(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text(
        "import flows.sync\nfrom twin_store import connect, runs\ndef f():\n    import harmonize.x\n"
    )
    known = {"twin_store.runs", "flows.sync"}
    assert imported(module, known) == {"flows.sync", "twin_store", "twin_store.runs", "harmonize.x"}


@pytest.mark.parametrize("name", sorted(package_modules()))
def test_modules_stay_readable(name: str) -> None:
    path = package_modules()[name]
    lines = len(path.read_text().splitlines())
    if str(path.relative_to(ROOT)) in ONE_COHESIVE_THING:
        return
    assert lines <= MAX_LINES, f"{path.relative_to(ROOT)} has {lines} lines; split it by concern"


def test_tests_import_only_the_support_package() -> None:
    offenders = []
    for path in sorted((ROOT / "tests").rglob("*.py")):
        for target in imported(path, set()):
            if target.startswith("tests.") and not target.startswith("tests.support"):
                offenders.append(f"{path.relative_to(ROOT)} imports {target}")
    assert offenders == []
