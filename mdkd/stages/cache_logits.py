"""`mdkd cache-logits`: run every teacher once over the corpus and cache its top-k predictions at masked positions.

Recipe: set up (check everything that can be checked without weights: config, corpus, teacher configs and
tokenizers; take over the output folder, starting the cache there), run (for each teacher, the units
(teacher, language, part) that belong to this rank and are not done yet) and save (merge the units' records into
a complete manifest). Every file of the cache is written by `CacheWriter`.
"""

from __future__ import annotations

import itertools
import tempfile
import time
from functools import partial
from pathlib import Path

from tqdm.auto import tqdm

from mdkd.pipeline.background import BackgroundJobs, prefetch
from mdkd.pipeline.cache.manifest import MANIFEST_NAME, CorpusEntry, Manifest, is_manifest
from mdkd.pipeline.cache.reader import CacheReader
from mdkd.pipeline.cache.shards import build_table
from mdkd.pipeline.cache.writer import CacheWriter, TokenizerCopy
from mdkd.pipeline.config import dump_config
from mdkd.pipeline.distributed import Ranks, barrier, broadcast_from_main, pick_device, start_process_group
from mdkd.pipeline.errors import UserError
from mdkd.pipeline.files import sha256_of_folder
from mdkd.pipeline.output_folder import take_over
from mdkd.pipeline.teacher_pass.config import CacheConfig, load_cache_config
from mdkd.pipeline.teacher_pass.corpus import SourceSummary, read_language, scan_source
from mdkd.pipeline.teacher_pass.masking import Masker
from mdkd.pipeline.teacher_pass.teachers import Teacher, TeacherInfo, inspect_teacher, pick_dtype
from mdkd.pipeline.teacher_pass.windows import TailSampling, score_unit
from mdkd.pipeline.teacher_pass.workers import ReadyUnit, UnitBlock, UnitPreparation, default_workers, ready_units


def run(config_path: Path, out_dir: Path | str, overwrite: bool = False) -> Manifest | None:
    """Build (or finish) the cache in `out_dir`; return the complete manifest (on rank 0; None on the others)."""
    ranks = Ranks.from_env()
    config = load_cache_config(config_path)
    start_process_group(ranks)

    # Setup. Everything here is cheap next to the teacher pass and fails before any weights are loaded.
    # Rank 0 reads the corpus once and tells the others what it found.
    summaries = broadcast_from_main(ranks, _scan_corpus(config) if ranks.is_main else None)
    corpus = {
        language: list(zip(config.sources_for(language), found, strict=False)) for language, found in summaries.items()
    }
    teachers = _inspect_teachers(config)
    device = pick_device(config.device, ranks)
    dtype = pick_dtype(config.dtype, device)
    identity = _identity(config, corpus, teachers, dtype)
    writer = CacheWriter(out_dir, ranks.rank)
    # A cache resumes by rerunning the same command: the identity in its manifest says it is the same cache.
    claim = take_over(
        out_dir,
        MANIFEST_NAME,
        identity,
        ranks,
        what="cache",
        is_record=is_manifest,
        overwrite=overwrite,
        resume=True,
        start=lambda _: writer.start(
            dump_config(config),
            {name: info.tokenizer for name, info in teachers.items()},
            partial(_describe, config, corpus, teachers, identity),
        ),
    )
    if claim.action == "complete":
        # A complete cache whose files no longer match its manifest is repaired: its damaged units run again.
        damage = broadcast_from_main(ranks, writer.damage() if ranks.is_main else None)
        if not damage:
            ranks.echo(f"cache {out_dir} is already complete; nothing to do")
            return CacheReader(out_dir).manifest
        ranks.echo(
            f"cache {out_dir} is complete but damaged: repairing {len(damage.shards)} shard(s) and "
            f"{len(damage.tokenizers)} tokenizer copy(ies)"
        )
        if ranks.is_main:
            writer.reopen(damage, {name: info.tokenizer for name, info in teachers.items()})
        barrier(ranks)

    # Run. Units (teacher, language, part) are dealt round-robin over ranks in one sequence, so each rank's
    # share is fixed by the corpus alone, shares differ by at most one unit, and a rerun (with any number of
    # ranks) recomputes only what is not done.
    parts = {
        language: -(-sum(c.documents for _, c in corpus[language]) // config.shard_documents) for language in corpus
    }
    units = [
        (name, language, part)
        for name, info in teachers.items()
        for language in info.spec.languages
        for part in range(parts[language])
    ]
    mine = units[ranks.rank :: ranks.world_size]
    jobs = BackgroundJobs()
    for name, info in teachers.items():
        todo = [(language, p) for t, language, p in mine if t == name and not writer.is_done(t, language, p)]
        if todo:
            _run_teacher(config, info, Teacher(info, device, dtype), todo, writer, jobs, ranks)
    jobs.close()
    writer.flush_log()
    barrier(ranks)

    # Save. Rank 0 merges the units' records; the manifest says complete only once every unit's shard exists.
    manifest = writer.finish(parts) if ranks.is_main else None
    barrier(ranks)
    if ranks.is_main:
        ranks.echo(_summary(manifest, out_dir))
    return manifest


def _scan_corpus(config: CacheConfig) -> dict[str, list[SourceSummary]]:
    """Fingerprint and count every source once (a missing, unreadable or empty one is an error)."""
    summaries = {}
    for language in config.languages():
        summaries[language] = []
        for source in config.sources_for(language):
            tqdm.write(f"reading {source.description} ({language})")
            summaries[language].append(scan_source(source))
    return summaries


def _inspect_teachers(config: CacheConfig) -> dict[str, TeacherInfo]:
    teachers, problems = {}, []
    for spec in config.teachers:
        info, found = inspect_teacher(spec, config.top_k, config.max_length)
        problems.extend(found)
        if info is not None:
            teachers[spec.name] = info
    if problems:
        raise UserError("; ".join(problems))
    return teachers


def _tokenizer_hash(info: TeacherInfo) -> str:
    """Hash of the tokenizer exactly as the cache stores it (a save_pretrained copy)."""
    with tempfile.TemporaryDirectory() as scratch:
        info.tokenizer.save_pretrained(scratch)
        return sha256_of_folder(Path(scratch))


def _identity(config: CacheConfig, corpus: dict, teachers: dict[str, TeacherInfo], dtype) -> dict:
    """Everything that decides the cache's content; a rerun into the folder must match it.

    The resolved dtype is part of it: a cache begun in bf16 on a GPU is not finished in fp32 on a CPU.
    """
    return {
        "config_hash": config.content_hash(),
        "dtype": str(dtype).removeprefix("torch."),
        "corpus": {lang: [counts.fingerprint for _, counts in sources] for lang, sources in corpus.items()},
        "teachers": {name: {"weights": t.weights, "tokenizer": _tokenizer_hash(t)} for name, t in teachers.items()},
    }


def _describe(
    config: CacheConfig, corpus, teachers: dict[str, TeacherInfo], identity, copies: dict[str, TokenizerCopy]
) -> dict:
    """What a new cache's manifest records of its config, corpus and teachers."""
    resolved = config.model_dump(mode="json")
    return {
        "config": resolved,
        "identity": identity,
        "masking": resolved["masking"],
        "top_k": config.top_k,
        "temperatures": config.temperatures,
        "tail_samples": config.tail_samples,
        "tail_temperature": config.tail_temperature if config.tail_samples else None,
        "max_length": config.max_length,
        "logprobs_dtype": config.logprobs_dtype,
        "shard_documents": config.shard_documents,
        "corpus": [
            CorpusEntry(
                language=language,
                source=source.description,
                fingerprint=counts.fingerprint,
                documents=counts.documents,
                skipped_blank_lines=counts.skipped_blank,
                skipped_invalid_utf8_lines=counts.skipped_invalid_utf8,
            )
            for language, sources in corpus.items()
            for source, counts in sources
        ],
        "teachers": {
            name: info.manifest_entry(copies[name].folder, copies[name].sha256) for name, info in teachers.items()
        },
    }


def _run_teacher(
    config: CacheConfig, info: TeacherInfo, teacher: Teacher, todo, writer: CacheWriter, jobs: BackgroundJobs, ranks
) -> None:
    """Compute this rank's pending units for one (loaded once) teacher. Worker processes prepare the units (a
    background thread reads the corpus and hands them over), this thread runs the teacher, and the writer thread
    builds and writes each unit's shard."""
    name, tokenizer = info.spec.name, info.tokenizer
    masker = Masker(config.masking, tokenizer.mask_token_id, set(tokenizer.all_special_ids), len(tokenizer))
    tail = (
        TailSampling(config.tail_samples, config.tail_temperature, config.masking.seed) if config.tail_samples else None
    )
    preparation = UnitPreparation(
        tokenizer,
        masker,
        config.max_length,
        config.masking.copies,
        teacher.pad_id,
        config.batch_tokens,
        config.batch_size,
        tail,
    )
    wanted = set(todo)

    def pending_blocks():
        # Streams each language once; blocks of other ranks or already done are read past, not tokenised.
        for language in dict.fromkeys(language for language, _ in todo):
            documents = read_language(config.sources_for(language))
            for part in itertools.count():
                block = list(itertools.islice(documents, config.shard_documents))
                if not block:
                    break
                if (language, part) in wanted:
                    yield UnitBlock(language, part, block)

    workers = default_workers() if config.workers is None else config.workers
    units = ready_units(preparation, pending_blocks(), workers, pin=teacher.device.type == "cuda")
    progress = tqdm(total=len(todo), desc=name, unit="shard", disable=not ranks.progress_enabled())
    for ready in prefetch(units):
        started = time.perf_counter()
        rows = ready.unit.rows
        predictions = score_unit(
            teacher, ready.batches, int(rows.position_offsets[-1]), config.top_k, config.temperatures, tail
        )
        seconds = time.perf_counter() - started
        jobs.submit(partial(_write_unit, writer, name, ready, predictions, config.logprobs_dtype, seconds))
        progress.set_postfix(language=ready.language, tokens_per_s=f"{ready.unit.tokens / max(seconds, 1e-9):.0f}")
        progress.update(1)
    progress.close()


def _write_unit(
    writer: CacheWriter, teacher: str, ready: ReadyUnit, predictions, logprobs_dtype: str, seconds: float
) -> None:
    """The writer thread's job for one unit: its table, then its shard, marker and log line."""
    writer.write_unit(
        teacher,
        ready.language,
        ready.part,
        build_table(ready.unit.rows, ready.language, predictions, logprobs_dtype),
        documents=ready.documents,
        windows_without_tokens=ready.unit.windows_without_tokens,
        seconds=seconds,
        tokens=ready.unit.tokens,
    )


def _summary(manifest: Manifest, out_dir: Path | str) -> str:
    totals = manifest.totals
    return (
        f"cache complete: {out_dir} — {len(manifest.teachers)} teachers, {len(manifest.shards)} shards, "
        f"{totals.rows} rows, {totals.masked_positions} masked positions, {totals.bytes / 1e6:.1f} MB"
    )
