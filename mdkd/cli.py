"""The `mdkd` command line: a click group with one command per stage."""

from __future__ import annotations

import errno
import re
import sys
from pathlib import Path

import click

from mdkd import __version__
from mdkd.pipeline.config import ConfigError
from mdkd.pipeline.distributed import Ranks, quiet_deepspeed
from mdkd.pipeline.errors import UserError
from mdkd.pipeline.store import LOCAL_SCHEME, is_uri

_FREE_SPACE = "free some disk space, then rerun the same command: it resumes"
_PERMISSIONS = "check that path's permissions, or choose a folder you may write"
_ENVIRONMENT_ERRORS = {
    errno.ENOSPC: _FREE_SPACE,
    errno.EDQUOT: _FREE_SPACE,
    errno.EACCES: _PERMISSIONS,
    errno.EPERM: _PERMISSIONS,
    errno.EROFS: "that file system is read-only: choose a folder on a writable one",
}


class MdkdGroup(click.Group):
    """Turns a UserError, a full disk or a folder mdkd may not write into one line on stderr and exit status 2, and
    Ctrl-C into a hint to resume."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UserError as error:
            # Every rank reports its own error (one may fail alone); only rank 0 does so without a prefix.
            ranks = Ranks.from_env()
            click.echo(f"error: {error}" if ranks.is_main else f"error (rank {ranks.rank}): {error}", err=True)
            ctx.exit(2)
        except OSError as error:
            if error.errno not in _ENVIRONMENT_ERRORS:
                raise
            # A full disk or a folder mdkd may not write: nothing was marked complete, so the same command resumes.
            where = f": {error.filename}" if error.filename else ""
            click.echo(f"error: {error.strerror}{where} ({_ENVIRONMENT_ERRORS[error.errno]})", err=True)
            ctx.exit(2)
        except KeyboardInterrupt:
            hint = " with --resume auto" if ctx.invoked_subcommand == "train" else ""
            click.echo(f"interrupted: rerun the same command{hint} to resume where it stopped", err=True)
            ctx.exit(130)


# A URI with one slash after its scheme (s3:/bucket): as a path it would be a local folder named `s3:`.
_ONE_SLASH_URI = re.compile(r"^[a-z0-9+]+:/[^/]")


class Location(click.ParamType):
    """A local folder (a Path, as is `file://PATH`), or a URI of an fsspec filesystem such as s3://bucket/prefix
    (passed on as a str: the cache reader and writer open it; a Path would fold its `//`)."""

    name = "DIR|URI"

    def __init__(self, exists: bool):
        self.local = click.Path(exists=exists, file_okay=False, path_type=Path)

    def convert(self, value, param, ctx):
        if isinstance(value, str) and value.startswith(LOCAL_SCHEME):
            value = value.removeprefix(LOCAL_SCHEME)
        elif is_uri(value):
            return value
        elif isinstance(value, str) and _ONE_SLASH_URI.match(value):
            scheme, rest = value.split(":/", 1)
            raise UserError(f"{value}: a URI takes two slashes after its scheme ({scheme}://{rest})")
        return self.local.convert(value, param, ctx)


existing_file = click.Path(exists=True, dir_okay=False, path_type=Path)
existing_dir = click.Path(exists=True, file_okay=False, path_type=Path)
existing_cache = Location(exists=True)


@click.group(cls=MdkdGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mdkd")
@click.option(
    "--local_rank",
    "--local-rank",
    type=int,
    hidden=True,
    help="Set by the deepspeed launcher; LOCAL_RANK is read instead.",
)
def cli(local_rank: int | None) -> None:
    """Merge several masked language models into one student by knowledge distillation (MergeDistill)."""
    quiet_deepspeed()


@cli.command("cache-logits")
@click.option(
    "--config", "config_path", type=existing_file, required=True, help="YAML config (see docs/configuration.md)."
)
@click.option(
    "--out", "out_dir", type=Location(exists=False), required=True, help="Cache folder, or a URI (s3://bucket/cache)."
)
@click.option("--overwrite", is_flag=True, help="Replace a cache in --out that was built from a different config.")
def cache_logits(config_path: Path, out_dir: Path | str, overwrite: bool) -> None:
    """Run every teacher once over the corpus and cache its top-k predictions at masked positions.

    Resumable: rerun the same command after a crash. Shardable: launch under torchrun or deepspeed.
    """
    from mdkd.stages import cache_logits as stage

    stage.run(config_path, out_dir, overwrite=overwrite)


@cli.command("train")
@click.option(
    "--config", "config_path", type=existing_file, required=True, help="YAML train config (see docs/configuration.md)."
)
@click.option(
    "--cache", "cache_dir", type=existing_cache, required=True, help="A complete cache from `mdkd cache-logits`."
)
@click.option(
    "--out",
    "out_dir",
    type=Location(exists=False),
    required=True,
    help="Run folder: local, or a URI such as s3://bucket/run.",
)
@click.option(
    "--resume", default=None, metavar="auto|PATH", help="Continue from the latest checkpoint (auto) or a given one."
)
@click.option("--overwrite", is_flag=True, help="Replace a run in --out (a different config, or an unfinished one).")
@click.option(
    "--sweep", "sweeps", multiple=True, metavar="KEY=V1,V2", help="Run a grid of ablations into --out (repeatable)."
)
@click.option("--sweep-file", type=existing_file, default=None, help="YAML mapping dotted keys to lists of values.")
def train(
    config_path: Path,
    cache_dir: Path | str,
    out_dir: Path | str,
    resume: str | None,
    overwrite: bool,
    sweeps,
    sweep_file,
) -> None:
    """Build the merged vocabulary from the cache and train the student with DeepSpeed on the cached soft targets.

    Runs in one process as is; launch under torchrun or deepspeed for several GPUs or nodes. With --sweep, trains
    one run per combination into OUT/<combination>/, skipping finished ones, then writes OUT/report/.
    """
    if is_uri(out_dir) and (sweeps or sweep_file):
        raise UserError(f"--out {out_dir}: a sweep is written to a local folder for now (one run may be a URI)")
    if is_uri(out_dir) and resume not in (None, "auto"):
        raise UserError(f"--resume {resume}: a run on an object store resumes from its own checkpoints: --resume auto")
    if sweeps or sweep_file:
        if resume or overwrite:
            raise UserError("--resume and --overwrite do not go with --sweep (a sweep resumes unfinished runs itself)")
        from mdkd.stages import sweep

        sweep.run(config_path, cache_dir, out_dir, list(sweeps), sweep_file)
        return
    if resume and overwrite:
        raise UserError("--resume continues a run and --overwrite replaces it: give one of them")
    from mdkd.stages import train as stage

    stage.run(config_path, cache_dir, out_dir, resume=resume, overwrite=overwrite)


@cli.command("eval")
@click.argument("target", type=existing_dir)
@click.option("--cache", "cache_dir", type=existing_cache, default=None, help="Cache to score on (default: the run's).")
@click.option("--heldout", "heldout_run", type=existing_dir, default=None, help="Use this run's held-out documents.")
@click.option(
    "--eval-fraction", type=click.FloatRange(0, 1, min_open=True), default=None, help="Or hold out by doc_id hash."
)
@click.option(
    "--max-rows",
    type=click.IntRange(min=1),
    default=2000,
    show_default=True,
    help="Held-out rows per teacher and language.",
)
@click.option(
    "--out",
    "out_file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="eval.json path (default: RUN/eval.json).",
)
@click.option(
    "--all-teachers", is_flag=True, help="Score a run on every cached teacher's windows, not only its own teachers'."
)
def evaluate(target: Path, cache_dir, heldout_run, eval_fraction, max_rows: int, out_file, all_teachers: bool) -> None:
    """Score a run's student (or any HF masked LM folder) against each teacher, on the same held-out positions."""
    from mdkd.stages import evaluate as stage

    report = stage.run(
        target,
        cache_dir=cache_dir,
        heldout_run=heldout_run,
        eval_fraction=eval_fraction,
        max_rows=max_rows,
        out_file=out_file,
        all_teachers=all_teachers,
    )
    click.echo(stage.render(report))


@cli.command("report")
@click.argument("runs", nargs=-1, required=True, type=existing_dir)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where report.md, report.csv and the PNG plots go (default: report/ beside the first run).",
)
def report(runs: tuple[Path, ...], out_dir: Path | None) -> None:
    """Compare runs: a table of runs x metrics with the config keys that differ, loss curves, accuracy bars."""
    from mdkd.stages import report as stage

    out_dir = out_dir or runs[0].parent / "report"
    result = stage.run(list(runs), out_dir)
    click.echo((out_dir / "report.md").read_text(encoding="utf-8"), nl=False)
    click.echo(f"written: {out_dir}/report.md, report.csv, {', '.join(result['plots'])}")


@cli.command("demo")
@click.option("--quick", is_flag=True, help="A smaller run (a few minutes on 2 CPU cores).")
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path.home() / ".cache" / "mdkd" / "demo",
    show_default=True,
    help="Where the demo keeps its corpus, teachers, cache, runs and report.",
)
@click.option(
    "--corpus",
    "corpus_dir",
    type=existing_dir,
    default=None,
    help="A folder of <language>.txt files (one document per line) instead of text from Debian's packages.",
)
@click.option("--overwrite", is_flag=True, help="Replace a demo in the workdir that was run with other settings.")
def demo(quick: bool, workdir: Path, corpus_dir: Path | None, overwrite: bool) -> None:
    """The MergeDistill experiment in miniature, offline: teachers, one cache, six students, a report.

    Rerun the same command to resume after an interruption; finished steps are skipped.
    """
    from mdkd.stages import demo as stage

    result = stage.run(workdir, corpus_dir, quick, overwrite=overwrite)
    click.echo(result["summary"])
    click.echo(f"report: {result['root']}/report/report.md, plots: {', '.join(result['report']['plots'])}")


@cli.command("validate")
@click.argument("config_path", type=existing_file)
@click.option(
    "--cache",
    "cache_dir",
    type=existing_cache,
    default=None,
    help="Also check a train config against this cache (teachers, languages, k', temperature).",
)
def validate(config_path: Path, cache_dir: Path | str | None) -> None:
    """Check a config file without loading any model; list every problem."""
    from mdkd.stages import validate as stage

    try:
        config = stage.run(config_path, cache_dir)
    except ConfigError as error:
        click.echo(f"error: {config_path} has {len(error.problems)} problem(s):", err=True)
        for problem in error.problems:
            click.echo(f"  - {problem}", err=True)
        sys.exit(2)
    click.echo(f"{config_path}: {stage.describe(config)}")


@cli.group("cache")
def cache() -> None:
    """Look into and check a cache written by `mdkd cache-logits`."""


@cache.command("inspect")
@click.argument("cache_dir", type=existing_cache)
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines instead of a table.")
def cache_inspect(cache_dir: Path | str, as_json: bool) -> None:
    """Per teacher and language: rows, masked positions, bytes per position, top-1 probability, top-k mass (also
    tempered), entropy; per teacher, where its tokens land in the merged vocabulary. Warns (on stderr) where the
    top-k holds little of a teacher's mass."""
    import json

    from mdkd.stages import cache_inspect as stage

    found = stage.collect(cache_dir)
    if as_json:
        click.echo("\n".join(json.dumps(row) for row in found.rows + [{"token_shares": found.token_shares}]))
    else:
        click.echo(stage.render(found.rows) + "\n\n" + stage.render_shares(found.token_shares))
    for warning in found.warnings:
        click.echo(warning, err=True)


@cache.command("verify")
@click.argument("cache_dir", type=existing_cache)
def cache_verify(cache_dir: Path | str) -> None:
    """Check every shard against the manifest (size, sha256, rows, list shapes); exit 1 on any problem."""
    from mdkd.stages import cache_verify as stage

    problems = stage.verify(cache_dir)
    for problem in problems:
        click.echo(f"problem: {problem}", err=True)
    if problems:
        click.echo(f"cache {cache_dir} failed verification: {len(problems)} problem(s)", err=True)
        sys.exit(1)
    click.echo(f"cache {cache_dir} verified: every shard matches the manifest")


def main() -> None:
    cli(prog_name="mdkd")


if __name__ == "__main__":
    main()
