"""Config machinery shared by both stages: strict models, every problem reported at once, YAML in and out.

Each stage has its own typed config (teacher_pass/config.py, distill/config.py) built on `StrictModel`; a file is
validated whole and `ConfigError` lists every problem, so a user fixes them in one go.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from mdkd.pipeline.errors import UserError


class ConfigError(UserError):
    """An invalid config file; `problems` holds one human-readable line per problem."""

    def __init__(self, path: Path, problems: list[str]):
        self.path = path
        self.problems = problems
        super().__init__(f"invalid config {path}: " + "; ".join(problems) + " (fix these keys and run again)")


class StrictModel(BaseModel):
    # strict: "128" is not silently an int; extra="forbid": a typo in a key name is an error, not a default.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


def _format_location(loc: tuple[Any, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif not str(item).startswith(("function-", "union[", "nullable[", "list[", "dict[", "str", "int", "float")):
            parts.append(("." if parts else "") + str(item))
    return "".join(parts) or "(top level)"


def format_validation_error(error: ValidationError) -> list[str]:
    """One short line per pydantic error: `location: what is wrong`."""
    problems = []
    for item in error.errors():
        where = _format_location(item["loc"])
        if item["type"] == "extra_forbidden":
            problems.append(f"{where}: unknown key")
        elif item["type"] == "missing":
            problems.append(f"{where}: required key is missing")
        else:
            message = item["msg"].removeprefix("Value error, ")
            problems.append(f"{where}: {message}")
    return list(dict.fromkeys(problems))


def read_yaml(path: Path) -> Any:
    """Load a YAML file, turning a missing file or a syntax error into a one-line UserError."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UserError(f"cannot read config {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"config {path} is not UTF-8 text (byte {exc.start}; save it as UTF-8)") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"config {path} is not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None


def dump_config(config: BaseModel) -> str:
    """The resolved config as YAML, keys in declaration order."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
