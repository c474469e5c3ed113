"""Which cached data a train config uses: its teacher selection, (teacher, language) pairs, shards and
log-partition column, and every way the config does not fit the cache.

train plans its run here; validate and sweeps check configs against a cache here before anything trains; eval
reads the selection a run recorded (`RunFolder.teachers`) and plans only for runs older than that record.
"""

from __future__ import annotations

from dataclasses import dataclass

from mdkd.pipeline.cache.manifest import Manifest, ShardEntry
from mdkd.pipeline.distill.config import TrainConfig, teacher_weights
from mdkd.pipeline.errors import UserError

TeacherSelection = dict[str, dict[str, float]]  # {language: {teacher: weight}}


@dataclass(frozen=True)
class RunPlan:
    selection: TeacherSelection
    pairs: list[tuple[str, str]]  # (teacher, language), the streams the run samples from
    teachers: list[str]  # the teachers in use, in cache order (the merged vocabulary's order)
    shards: list[ShardEntry]  # every shard the run reads
    temperature_column: int | None  # which cached log-partition the loss reads (none for `renormalize`)
    tail_column: int | None  # which cached log-partition the sampled tail was drawn at (None: no sampled tail)
    tail_temperature: float | None  # and that temperature


def plan_run(config: TrainConfig, manifest: Manifest) -> RunPlan:
    """The run's plan; a UserError listing every way the config does not fit the cache."""
    selection, problems = check_against_cache(config, manifest)
    if problems:
        raise UserError("; ".join(problems))
    pairs = [(teacher, language) for language, weights in selection.items() for teacher in weights]
    in_use = {teacher for teacher, _ in pairs}
    tail_temperature = manifest.tail_temperature if uses_tail(config, manifest) else None
    return RunPlan(
        selection=selection,
        pairs=pairs,
        teachers=[name for name in manifest.teachers if name in in_use],
        shards=[shard for teacher, language in pairs for shard in manifest.shards_of(teacher, language)],
        temperature_column=(
            None if config.loss.missing_mass == "renormalize" else manifest.temperatures.index(config.loss.temperature)
        ),
        tail_column=None if tail_temperature is None else manifest.temperatures.index(tail_temperature),
        tail_temperature=tail_temperature,
    )


def uses_tail(config: TrainConfig, manifest: Manifest) -> bool:
    """Whether the loss adds the cache's sampled tail (`loss.tail`, with `auto` resolved against the cache)."""
    if config.loss.tail == "none" or not manifest.tail_samples:
        return False
    return config.loss.tail == "sampled" or (
        config.loss.missing_mass == "support" and config.loss.top_k == manifest.top_k
    )


def check_against_cache(config: TrainConfig, manifest: Manifest) -> tuple[TeacherSelection, list[str]]:
    """The teacher selection (the config's, or every teacher that cached each language), and the problems of the
    config against the cache (teachers, languages, k', tau)."""
    cached = manifest.languages()
    problems = []
    if config.teachers is None:
        selection = {language: {name: 1.0 for name in names} for language, names in cached.items()}
    else:
        selection = {language: teacher_weights(choice) for language, choice in config.teachers.items()}
    for language, weights in selection.items():
        if language not in cached:
            problems.append(f"language '{language}' is not in the cache (cached: {', '.join(cached)})")
            continue
        for name in weights:
            if name not in manifest.teachers:
                problems.append(f"teacher '{name}' is not in the cache (cached: {', '.join(manifest.teachers)})")
            elif name not in cached[language]:
                problems.append(
                    f"teacher '{name}' did not cache language '{language}' "
                    f"(it cached {', '.join(manifest.teachers[name].languages)})"
                )
    if config.loss.top_k > manifest.top_k:
        problems.append(f"loss.top_k {config.loss.top_k} is above the cached top_k {manifest.top_k} (lower loss.top_k)")
    problems.extend(_temperature_problems(config, manifest))
    problems.extend(_tail_problems(config, manifest))
    return selection, problems


def _tail_problems(config: TrainConfig, manifest: Manifest) -> list[str]:
    """`loss.tail: sampled` needs draws, the `support` loss, and every cached top-k id (the draws avoid them all)."""
    if config.loss.tail != "sampled":
        return []
    problems = []
    if not manifest.tail_samples:
        problems.append(
            "loss.tail 'sampled' needs a cache with tail draws, and this one has none (set tail_samples in the "
            "cache config and rebuild, or set loss.tail: none)"
        )
    if config.loss.missing_mass != "support":
        problems.append(f"loss.tail 'sampled' goes with loss.missing_mass: support, not {config.loss.missing_mass}")
    if config.loss.top_k != manifest.top_k:
        problems.append(
            f"loss.tail 'sampled' needs loss.top_k equal to the cached top_k {manifest.top_k}, since the draws were "
            f"made outside all of it (set loss.top_k: {manifest.top_k}, or loss.tail: none)"
        )
    return problems


def _temperature_problems(config: TrainConfig, manifest: Manifest) -> list[str]:
    """`rest` and `support` need the teacher's tempered log-partition at the loss's temperature, which only stage
    one can record: a cache without it (schema 1) or without that temperature cannot serve the loss."""
    if config.loss.missing_mass == "renormalize":
        return []
    if not manifest.temperatures:
        return [
            f"loss.missing_mass '{config.loss.missing_mass}' needs the tempered log-partitions that this "
            f"schema-{manifest.schema_version} cache lacks (rebuild the cache with this mdkd, or set "
            "loss.missing_mass: renormalize)"
        ]
    if config.loss.temperature not in manifest.temperatures:
        recorded = ", ".join(f"{tau:g}" for tau in manifest.temperatures)
        return [
            f"loss.temperature {config.loss.temperature:g} was not recorded in the cache (it has {recorded}; "
            "use one of them, or add it to the cache config's temperatures and rebuild)"
        ]
    return []


def teachers_by_language(selection: TeacherSelection, manifest: Manifest) -> dict[str, list[str]]:
    """{language: the selected teachers that cached it, in cache order}; languages left with none are left out."""
    cached = manifest.languages()
    scope = {
        language: [name for name in cached[language] if name in weights]
        for language, weights in selection.items()
        if language in cached
    }
    return {language: names for language, names in scope.items() if names}
