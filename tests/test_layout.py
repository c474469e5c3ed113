"""The architecture the folders show: stage two reads nothing of stage one but the cache, and the cache contract
depends on neither stage. Imports are followed transitively, including the ones inside functions."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mdkd"


def _module_file(name: str) -> Path | None:
    relative = Path(*name.split("."))
    for candidate in (PACKAGE.parent / relative.with_suffix(".py"), PACKAGE.parent / relative / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _direct_imports(name: str) -> set[str]:
    """mdkd modules that module `name` imports anywhere in its body."""
    found = set()
    for node in ast.walk(ast.parse(_module_file(name).read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return {m for m in found if m.startswith("mdkd") and _module_file(m) is not None}


def _closure(start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(_direct_imports(name))
    return seen


def _modules_under(folder: str) -> list[str]:
    root = PACKAGE / folder
    return sorted(".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts) for p in root.rglob("*.py"))


@pytest.mark.parametrize("module", _modules_under("pipeline/distill") + ["mdkd.stages.train"])
def test_stage_two_imports_nothing_of_the_teacher_pass(module):
    leaked = sorted(m for m in _closure(module) if m.startswith("mdkd.pipeline.teacher_pass"))
    assert not leaked, f"{module} reaches stage one through {leaked}"


@pytest.mark.parametrize("module", _modules_under("pipeline/cache"))
def test_the_cache_contract_depends_on_neither_stage(module):
    leaked = sorted(
        m for m in _closure(module) if m.startswith(("mdkd.pipeline.teacher_pass", "mdkd.pipeline.distill"))
    )
    assert not leaked, f"{module} reaches a stage through {leaked}"


@pytest.mark.parametrize("module", [m for m in _modules_under("pipeline") if not m.endswith("__init__")])
def test_reusable_machinery_imports_no_demo_or_stage_code(module):
    leaked = sorted(m for m in _closure(module) if m.startswith(("mdkd.demo", "mdkd.stages", "mdkd.cli")))
    assert not leaked, f"{module} reaches {leaked}"


def test_the_walk_sees_imports_inside_functions():
    """A check that cannot fail is no check: the CLI imports every stage inside its commands, and `mdkd eval`
    reads raw text with stage one's corpus reader."""
    reached = _closure("mdkd.cli")
    assert "mdkd.stages.train" in reached and "mdkd.pipeline.teacher_pass.corpus" in reached
