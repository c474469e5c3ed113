"""Render docs/configuration.md from the config models, so the reference cannot drift from the code.

The page is docs/configuration.template.md with each line `<!-- fields: ModelName -->` replaced by that model's
table: one row per field with its key, type, default, constraint (from the field's ge/gt/le/lt/min_length/pattern)
and meaning (its `description`). A field whose type holds a nested model links to the section that model's table
sits in, so every model reachable from `CacheConfig` and `TrainConfig` needs a placeholder. Everything else on the
page (intro, strictness, examples, the cache identity, ...) is prose in the template.

    python -m mdkd.pipeline.config_reference          # write docs/configuration.md
    python -m mdkd.pipeline.config_reference --check  # exit 1 if docs/configuration.md is out of date

It reads and writes the docs/ folder of the source checkout, so it is a tool for an editable install.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import types
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from mdkd.pipeline.distill.config import TrainConfig
from mdkd.pipeline.teacher_pass.config import CacheConfig

DOCS = Path(__file__).resolve().parents[2] / "docs"
TEMPLATE = DOCS / "configuration.template.md"
PAGE = DOCS / "configuration.md"
ROOTS: tuple[type[BaseModel], ...] = (CacheConfig, TrainConfig)
REGENERATE = "python -m mdkd.pipeline.config_reference"

_PLACEHOLDER = re.compile(r"^<!-- fields: (\w+) -->$")
_SCALARS = {str: ("string", "strings"), int: ("int", "ints"), float: ("float", "floats"), bool: ("bool", "bools")}


def _nested_models(annotation: Any) -> Iterator[type[BaseModel]]:
    """The models named anywhere in a type, e.g. `CorpusSource` in `list[CorpusSource]`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation
    for arg in get_args(annotation):
        yield from _nested_models(arg)


def walk_models(roots: Iterable[type[BaseModel]] = ROOTS) -> list[type[BaseModel]]:
    """Every model reachable from `roots` through its fields' types, each once, parents before children."""
    seen: dict[type[BaseModel], None] = {}

    def visit(model: type[BaseModel]) -> None:
        if model in seen:
            return
        seen[model] = None
        for field in model.model_fields.values():
            for child in _nested_models(field.annotation):
                visit(child)

    for root in roots:
        visit(root)
    return list(seen)


def _one_of(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " or " + parts[-1]


def _alternatives(annotation: Any, anchors: dict[type[BaseModel], str], plural: bool) -> list[str]:
    if get_origin(annotation) in (Union, types.UnionType):
        return [part for arg in get_args(annotation) for part in _alternatives(arg, anchors, plural)]
    return [_phrase(annotation, anchors, plural)]


def _phrase(annotation: Any, anchors: dict[type[BaseModel], str], plural: bool) -> str:
    origin, args = get_origin(annotation), get_args(annotation)
    if annotation is type(None):
        return "null"
    if annotation in _SCALARS:
        return _SCALARS[annotation][plural]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return f"[{'mappings' if plural else 'mapping'}](#{anchors[annotation]})"
    if origin is Literal:
        return ", ".join(f"`{value}`" for value in args)
    if origin is list:
        return "list of " + render_type(args[0], anchors, plural=True)
    if origin is dict:
        noun = "mappings" if plural else "mapping"
        if args[1] is Any:
            return noun
        value = _alternatives(args[1], anchors, plural=False)
        shown = _one_of(value) if len(value) == 1 else f"({_one_of(value)})"
        return f"{noun}: {render_type(args[0], anchors)} → {shown}"
    raise TypeError(f"no readable form for the type {annotation!r}: teach config_reference._phrase about it")


def render_type(annotation: Any, anchors: dict[type[BaseModel], str], plural: bool = False) -> str:
    """A field type in words: `int | None` is "int or null", a nested model a link to its table."""
    return _one_of(_alternatives(annotation, anchors, plural))


def render_default(field: FieldInfo) -> str:
    """`required`, `null`, "all defaults" for a nested model left as is, or the value as it would be written in YAML."""
    if field.is_required():
        return "required"
    default = field.get_default(call_default_factory=True)
    if default is None:
        return "null"
    if isinstance(default, BaseModel):
        changed = default.model_dump(mode="json", exclude_defaults=True)
        return f"`{json.dumps(changed)}`" if changed else "all defaults"
    if isinstance(default, str):
        return f"`{default}`"
    return f"`{json.dumps(default)}`"


def render_constraint(field: FieldInfo) -> str:
    """The checks pydantic runs on the value alone, e.g. "0 < x < 1", "≥ 8", "at least 1", "matches `REGEX`"."""
    lower = upper = None
    parts = []
    for item in field.metadata:
        if isinstance(item, annotated_types.Ge):
            lower = ("≥", "≤", item.ge)
        elif isinstance(item, annotated_types.Gt):
            lower = (">", "<", item.gt)
        elif isinstance(item, annotated_types.Le):
            upper = ("≤", item.le)
        elif isinstance(item, annotated_types.Lt):
            upper = ("<", item.lt)
        elif isinstance(item, annotated_types.MinLen):
            parts.append(f"at least {item.min_length}")
        elif getattr(item, "pattern", None) is not None:
            parts.append(f"matches `{item.pattern}`")
        else:
            raise TypeError(f"no readable form for the constraint {item!r}: teach config_reference about it")
    if lower and upper:
        bound = f"{lower[2]:g} {lower[1]} x {upper[0]} {upper[1]:g}"
    elif lower:
        bound = f"{lower[0]} {lower[2]:g}"
    elif upper:
        bound = f"{upper[0]} {upper[1]:g}"
    else:
        bound = ""
    return ", ".join(filter(None, [bound, *parts]))


def render_table(model: type[BaseModel], anchors: dict[type[BaseModel], str]) -> str:
    """The `key | type | default | constraint | meaning` table of one model's fields, in declaration order."""
    rows = ["| key | type | default | constraint | meaning |", "| --- | --- | --- | --- | --- |"]
    for name, field in model.model_fields.items():
        if not (field.description or "").strip():
            raise ValueError(f"{model.__name__}.{name} has no description: give it Field(..., description=...)")
        cells = [
            f"`{name}`",
            render_type(field.annotation, anchors),
            render_default(field),
            render_constraint(field),
            field.description.strip(),
        ]
        # A `|` in a cell, even inside a code span such as a pattern, would end the cell.
        escaped = [cell.replace("|", "\\|") for cell in cells]
        rows.append("|" + "|".join(f" {cell} " if cell else " " for cell in escaped) + "|")
    return "\n".join(rows)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(template_lines: list[str], models: dict[str, type[BaseModel]]) -> dict[type[BaseModel], str]:
    """Each model's anchor: that of the heading its placeholder sits under (numbered like GitHub's repeats)."""
    anchors: dict[type[BaseModel], str] = {}
    used: dict[str, int] = {}
    current = ""
    in_code = False
    for line in template_lines:
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and line.startswith("#"):
            slug = _slug(line.lstrip("#"))
            current = f"{slug}-{used[slug]}" if slug in used else slug
            used[slug] = used.get(slug, 0) + 1
        elif match := _PLACEHOLDER.match(line):
            model = models.get(match[1])
            if model is None:
                raise ValueError(f"template: `{match[1]}` is not a config model (known: {', '.join(models)})")
            if model in anchors:
                raise ValueError(f"template: the table of {match[1]} is placed twice")
            anchors[model] = current
    missing = [name for name, model in models.items() if model not in anchors]
    if missing:
        raise ValueError(f"template: no `<!-- fields: NAME -->` line for {', '.join(missing)}")
    return anchors


def render(template: str) -> str:
    """The page: the template with every placeholder line replaced by its model's table."""
    models = {model.__name__: model for model in walk_models()}
    lines = template.splitlines()
    anchors = _anchors(lines, models)
    out = []
    for line in lines:
        match = _PLACEHOLDER.match(line)
        out.append(render_table(models[match[1]], anchors) if match else line)
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Write docs/configuration.md, or with --check only compare it; returns the exit status."""
    parser = argparse.ArgumentParser(prog=REGENERATE, description="Generate docs/configuration.md from the models.")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if the page is out of date")
    args = parser.parse_args(argv)
    text = render(TEMPLATE.read_text(encoding="utf-8"))
    if args.check:
        if not PAGE.exists() or PAGE.read_text(encoding="utf-8") != text:
            page = PAGE.relative_to(DOCS.parent)
            print(f"{page} is out of date with the config models: run `{REGENERATE}`", file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
