"""`mdkd train --sweep key=v1,v2 ...`: a grid of student ablations against one cache, run one after another.

Recipe: expand the grid (every combination of the swept values, keys as dotted paths into the train config),
validate every combination's config before training any, then train each into OUT/<combination>/ (a finished
one is skipped, an unfinished one resumed), evaluate each student, and end with the report in OUT/report/.

An orchestrator: it runs other stages (train, eval, report) through their `run` entry points, as the demo runs it
through `run_many`.
"""

from __future__ import annotations

import copy
import itertools
import re
from pathlib import Path

import yaml

from mdkd.pipeline.cache.manifest import Manifest
from mdkd.pipeline.config import ConfigError, dump_config, read_yaml
from mdkd.pipeline.distill.config import validate_train_config
from mdkd.pipeline.distill.plan import check_against_cache
from mdkd.pipeline.distill.run import RunFolder, local_run_path
from mdkd.pipeline.distributed import Ranks
from mdkd.pipeline.errors import UserError


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


def run(
    config_path: Path, cache_dir: Path | str, out_dir: Path | str, sweeps: list[str], sweep_file: Path | None
) -> list[Path]:
    out_dir = local_run_path(out_dir)
    base = read_yaml(config_path) or {}
    grid = parse_grid(sweeps, sweep_file)
    combinations = [dict(zip(grid, values, strict=False)) for values in itertools.product(*grid.values())]
    # Every combination is validated, on its own and against the cache, before any trains: a typo or an
    # unrecorded temperature in the last one should not cost hours.
    manifest = Manifest.load(cache_dir)
    planned, problems = [], []
    for combination in combinations:
        config = copy.deepcopy(base)
        for key, value in combination.items():
            _set(config, key, value)
        path = out_dir / "configs" / f"{_name(combination)}.yaml"
        try:
            validated = validate_train_config(config, path)
        except ConfigError as error:
            problems += [f"{_name(combination)}: {p}" for p in error.problems]
            continue
        problems += [f"{_name(combination)}: {p}" for p in check_against_cache(validated, manifest)[1]]
        planned.append((out_dir / _name(combination), path, validated))
    if problems:
        raise UserError("invalid sweep: " + "; ".join(problems))
    for _, path, config in planned:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(dump_config(config), encoding="utf-8")
    runs = [(path, run_dir) for run_dir, path, _ in planned]
    run_many(runs, cache_dir=cache_dir, report_dir=out_dir / "report")
    return [run_dir for run_dir, _, _ in planned]


def run_many(runs: list[tuple[Path, Path]], *, cache_dir: Path | str, report_dir: Path) -> dict:
    """Train each (config, run folder) from one cache (a finished run is skipped, an unfinished one resumed),
    evaluate each student once, then write the report over all of them; returns the report's result.

    The one path from configs to a comparison, shared by sweeps and the demo; it calls the other stages through
    their `run` alone."""
    from mdkd.stages import evaluate, report, train

    ranks = Ranks.from_env()
    for index, (config_path, run_dir) in enumerate(runs, start=1):
        ranks.echo(f"[{index}/{len(runs)}] {run_dir.name}")
        run_folder = RunFolder(run_dir)
        train.run(config_path, cache_dir, run_dir, resume="auto" if run_folder.is_run() else None)
        if ranks.is_main and not run_folder.has_eval():
            try:
                evaluate.run(run_dir, cache_dir=cache_dir)
            except UserError as error:  # e.g. no held-out windows: the report then shows training metrics only
                ranks.echo(f"  not evaluated: {error}")
    result = {}
    if ranks.is_main:
        result = report.run([run_dir for _, run_dir in runs], report_dir)
        ranks.echo(f"report: {report_dir / 'report.md'} ({', '.join(result['plots'])})")
    return result
