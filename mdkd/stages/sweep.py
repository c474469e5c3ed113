"""`mdkd train --sweep key=v1,v2 ...`: a grid of student ablations against one cache, run one after another.

Recipe: expand the grid (every combination of the swept values, keys as dotted paths into the train config),
validate every combination's config before training any, then train each into OUT/<combination>/ (a finished
one is skipped, an unfinished one resumed), evaluate each student, and end with the report in OUT/report/.
"""

from __future__ import annotations

import copy
import itertools
import re
from pathlib import Path

import yaml

from mdkd.pipeline.config import ConfigError, dump_config, read_yaml
from mdkd.pipeline.distributed import Ranks
from mdkd.pipeline.errors import UserError
from mdkd.pipeline.distill.config import validate_train_config


def parse_grid(sweeps: list[str], sweep_file: Path | None) -> dict[str, list]:
    """{dotted key: values} from `key=v1,v2` arguments and/or a YAML file mapping keys to lists."""
    grid: dict[str, list] = {}
    if sweep_file is not None:
        loaded = read_yaml(sweep_file)
        if not isinstance(loaded, dict) or not all(isinstance(v, list) and v for v in loaded.values()):
            raise UserError(f"sweep file {sweep_file} must map dotted keys to non-empty lists of values")
        grid.update(loaded)
    for item in sweeps:
        key, sep, values = item.partition("=")
        if not sep or not key or not values:
            raise UserError(f"--sweep {item!r} is not key=v1,v2 (e.g. --sweep loss.top_k=4,8)")
        grid[key] = [yaml.safe_load(value) for value in values.split(",")]
    return grid


def _set(config: dict, dotted: str, value) -> None:
    node = config
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise UserError(f"--sweep {dotted}: {part} is not a section of the train config")
    node[leaf] = value


def _name(combination: dict) -> str:
    """A folder name that says what the combination is, e.g. loss.top_k=4_teachers.de=de_bert."""
    text = "_".join(f"{k}={v}" for k, v in combination.items())
    return re.sub(r"[^A-Za-z0-9._=-]+", "-", text)


def run(config_path: Path, cache_dir: Path, out_dir: Path, sweeps: list[str], sweep_file: Path | None) -> list[Path]:
    from mdkd.stages import evaluate, report, train

    base = read_yaml(config_path) or {}
    grid = parse_grid(sweeps, sweep_file)
    combinations = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    # Every combination is validated before any trains: a typo in the last one should not cost hours.
    planned, problems = [], []
    for combination in combinations:
        config = copy.deepcopy(base)
        for key, value in combination.items():
            _set(config, key, value)
        path = out_dir / "configs" / f"{_name(combination)}.yaml"
        try:
            planned.append((out_dir / _name(combination), path, validate_train_config(config, path)))
        except ConfigError as error:
            problems += [f"{_name(combination)}: {p}" for p in error.problems]
    if problems:
        raise UserError("invalid sweep: " + "; ".join(problems))
    ranks = Ranks.from_env()
    for index, (run_dir, path, config) in enumerate(planned, start=1):
        ranks.echo(f"[{index}/{len(planned)}] {run_dir.name}")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(dump_config(config), encoding="utf-8")
        resume = "auto" if (run_dir / "run.json").exists() else None
        train.run(path, cache_dir, run_dir, resume=resume)
        if ranks.is_main and not (run_dir / "eval.json").exists():
            try:
                evaluate.run(run_dir, cache_dir, None, None, 2000, None)
            except UserError as error:  # e.g. no held-out windows: the report then shows training metrics only
                ranks.echo(f"  not evaluated: {error}")
    if ranks.is_main:
        result = report.run([run_dir for run_dir, _, _ in planned], out_dir / "report")
        ranks.echo(f"report: {out_dir / 'report' / 'report.md'} ({', '.join(result['plots'])})")
    return [run_dir for run_dir, _, _ in planned]
