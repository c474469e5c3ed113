"""The architecture the folders show: stage two reads nothing of stage one but the cache, the cache contract
depends on neither stage, recipes stand on pipeline/ and not on each other, there is no import circle, and each
on-disk contract is named by its owner alone. Imports are followed transitively, including the ones inside
functions."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mdkd"
REPOSITORY = PACKAGE.parent
# The stages that run other stages, and the entry points through which they may: nothing else of a recipe.
ORCHESTRATORS = {"mdkd.stages.sweep", "mdkd.stages.demo"}
ENTRY_POINTS = {"run", "run_many"}


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


@pytest.mark.parametrize("module", _modules_under("pipeline/teacher_pass"))
def test_the_teacher_pass_reaches_no_distillation(module):
    leaked = sorted(m for m in _closure(module) if m.startswith("mdkd.pipeline.distill"))
    assert not leaked, f"{module} reaches stage two through {leaked}"


def _stage_modules() -> list[str]:
    return [m for m in _modules_under("stages") if not m.endswith("__init__")]


@pytest.mark.parametrize("module", sorted(set(_stage_modules()) - ORCHESTRATORS))
def test_a_recipe_imports_no_other_recipe(module):
    leaked = sorted(m for m in _closure(module) if m.startswith("mdkd.stages.") and m != module)
    assert not leaked, f"{module} reaches the recipes {leaked}"


def _stage_uses(module: str) -> set[str]:
    """`stage.attribute` for every other stage an orchestrator imports (`from mdkd.stages import x` or
    `from mdkd.stages.x import name`), so that the test sees which parts of a recipe it touches."""
    tree = ast.parse(_module_file(module).read_text(encoding="utf-8"))
    aliases, used = {}, set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "mdkd.stages":
            aliases.update({alias.asname or alias.name: alias.name for alias in node.names})
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mdkd.stages."):
            used.update(f"{node.module.rsplit('.', 1)[1]}.{alias.name}" for alias in node.names)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            used.add(f"{aliases[node.value.id]}.{node.attr}")
    return used


@pytest.mark.parametrize("module", sorted(ORCHESTRATORS))
def test_an_orchestrator_runs_other_stages_through_their_entry_points_alone(module):
    uses = _stage_uses(module)
    assert uses, f"{module} runs no other stage: it is no orchestrator"
    beyond = sorted(use for use in uses if use.split(".")[1] not in ENTRY_POINTS)
    assert not beyond, f"{module} uses {beyond} of other recipes (only their {sorted(ENTRY_POINTS)})"


def test_no_import_circle():
    assert "a" in _closure_without({"a": {"b"}, "b": {"a"}}, "a")  # the check sees a circle when there is one
    every = [m for m in _modules_under("") if _module_file(m) is not None]
    graph = {m: _direct_imports(m) - {m} for m in every}
    circles = [m for m in every if m in _closure_without(graph, m)]
    assert not circles, f"these modules reach themselves through their imports: {circles}"


def _closure_without(graph: dict[str, set[str]], start: str) -> set[str]:
    """Every module reachable from `start` through at least one import."""
    seen, todo = set(), list(graph.get(start, ()))
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(graph.get(name, ()))
    return seen


# Each on-disk contract has one owner; no other code (mdkd/, bench/, examples/) names its files. A file name
# counts where a string in code (not a docstring or help text) spells it, or where a path is built with `/ "name"`.
RUN_FILES = ("run.json", "metrics.jsonl", "eval.json", "heldout.json", "teachers.json")
RUN_FOLDERS = ("student", "vocab", "checkpoints")
CACHE_FILES = ("manifest.json", ".progress", "part-")
OWNERS = {
    "run": ({"mdkd/pipeline/distill/run.py"}, RUN_FILES, RUN_FOLDERS),
    "cache": ({f"mdkd/pipeline/cache/{name}" for name in ("manifest.py", "writer.py", "reader.py")}, CACHE_FILES, ()),
}


def _code_files() -> list[Path]:
    return sorted(path for folder in ("mdkd", "bench", "examples") for path in (REPOSITORY / folder).rglob("*.py"))


def _named_files(path: Path, names: tuple[str, ...], folders: tuple[str, ...]) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    # A command's help text tells users about the files, as docstrings tell readers.
    docstrings |= {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.keyword) and node.arg == "help"}
    pattern = re.compile("|".join(rf"(?<![\w.-]){re.escape(name)}" for name in names))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            found += [f"line {node.lineno}: {node.value!r}"] if pattern.search(node.value) else []
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) and isinstance(node.right, ast.Constant):
            found += [f"line {node.lineno}: / {node.right.value!r}"] if node.right.value in folders else []
    return found


@pytest.mark.parametrize("contract", sorted(OWNERS))
def test_only_the_owner_names_a_contracts_files(contract):
    owners, names, folders = OWNERS[contract]
    offenders = {
        path.relative_to(REPOSITORY).as_posix(): found
        for path in _code_files()
        if path.relative_to(REPOSITORY).as_posix() not in owners and (found := _named_files(path, names, folders))
    }
    assert not offenders, f"the {contract} files are named outside their owner {sorted(owners)}: {offenders}"


def test_the_file_name_check_sees_a_named_file(tmp_path):
    """A check that cannot fail is no check: a path built with the metrics file's name, or with `/ "student"`,
    is found; the same names in a docstring are not."""
    sample = tmp_path / "sample.py"
    sample.write_text(
        '"""Reads metrics.jsonl."""\nMETRICS = "metrics.jsonl"\n\n\ndef f(run):\n    return run / "student"\n',
        encoding="utf-8",
    )
    assert _named_files(sample, RUN_FILES, RUN_FOLDERS) == ["line 2: 'metrics.jsonl'", "line 6: / 'student'"]
