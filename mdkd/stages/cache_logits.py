"""`mdkd cache-logits`: run every teacher once over the corpus and cache its top-k predictions at masked positions.

Recipe: check everything that can be checked without weights (config, corpus, teacher configs and tokenizers),
claim the output folder, then for each teacher run the units (teacher, language, part) that belong to this rank
and are not done yet, and finally merge the per-unit markers into a complete manifest.
"""

from __future__ import annotations

import itertools
import json
import shutil
import tempfile
import time
from pathlib import Path

from tqdm.auto import tqdm

from mdkd import __version__
from mdkd.pipeline.cache import manifest as mf
from mdkd.pipeline.cache.manifest import CorpusEntry, Manifest, ShardEntry, Totals
from mdkd.pipeline.cache.shards import build_table, write_shard
from mdkd.pipeline.config import dump_config
from mdkd.pipeline.distributed import Ranks, barrier, broadcast_from_main, pick_device, start_process_group
from mdkd.pipeline.errors import UserError
from mdkd.pipeline.files import sha256_of_folder
from mdkd.pipeline.run_folder import claim_folder, prepare_folder
from mdkd.pipeline.teacher_pass.background import BackgroundJobs, prefetch
from mdkd.pipeline.teacher_pass.config import CacheConfig, load_cache_config
from mdkd.pipeline.teacher_pass.corpus import SourceSummary, read_language, scan_source
from mdkd.pipeline.teacher_pass.masking import Masker
from mdkd.pipeline.teacher_pass.teachers import Teacher, TeacherInfo, inspect_teacher, pick_dtype
from mdkd.pipeline.teacher_pass.windows import prepare_unit, score_unit


def run(config_path: Path, out_dir: Path, overwrite: bool = False) -> Manifest | None:
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
    # Every rank reads the folder's state before rank 0 changes it, and nobody goes on until it has. A cache
    # resumes by rerunning the same command: the identity in its manifest says it is the same cache.
    claim = claim_folder(out_dir, mf.MANIFEST_NAME, identity, what="cache", overwrite=overwrite, resume=True)
    barrier(ranks)
    if claim.action == "complete":
        ranks.echo(f"cache {out_dir} is already complete; nothing to do")
        return Manifest.load(out_dir)
    if ranks.is_main:
        prepare_folder(claim)
        _start_manifest(out_dir, config, corpus, teachers, identity)
    barrier(ranks)

    # Run. Units (teacher, language, part) are dealt round-robin over ranks in one sequence, so each rank's
    # share is fixed by the corpus alone, shares differ by at most one unit, and a rerun (with any number of
    # ranks) recomputes only what has no marker.
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
    writer = BackgroundJobs()
    for name, info in teachers.items():
        todo = [
            (language, p) for t, language, p in mine if t == name and mf.read_marker(out_dir, t, language, p) is None
        ]
        if todo:
            _run_teacher(config, out_dir, info, Teacher(info, device, dtype), todo, writer, ranks)
    writer.close()
    barrier(ranks)

    # Save. Rank 0 merges the markers; the manifest says complete only once every unit's shard exists.
    manifest = _finish_manifest(out_dir, parts) if ranks.is_main else None
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


def _start_manifest(out_dir: Path, config: CacheConfig, corpus, teachers: dict[str, TeacherInfo], identity) -> None:
    """Write the incomplete manifest, the resolved config and the tokenizer copies; clear torn temporary files.

    A resumed cache keeps its manifest (and so the markers' work); only a new one gets a fresh manifest."""
    for leftover in out_dir.rglob(".*.tmp"):
        leftover.unlink()
    if (out_dir / mf.MANIFEST_NAME).exists():
        return
    teacher_entries = {}
    for name, info in teachers.items():
        tokenizer_dir = out_dir / "tokenizers" / name
        info.tokenizer.save_pretrained(tokenizer_dir)
        teacher_entries[name] = info.manifest_entry(f"tokenizers/{name}", sha256_of_folder(tokenizer_dir))
    resolved = config.model_dump(mode="json")
    (out_dir / "config.yaml").write_text(dump_config(config), encoding="utf-8")
    Manifest(
        schema_version=mf.SCHEMA_VERSION,
        mdkd_version=__version__,
        complete=False,
        config=resolved,
        identity=identity,
        masking=resolved["masking"],
        top_k=config.top_k,
        temperatures=config.temperatures,
        max_length=config.max_length,
        logprobs_dtype=config.logprobs_dtype,
        shard_documents=config.shard_documents,
        corpus=[
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
        teachers=teacher_entries,
    ).save(out_dir)


def _run_teacher(config: CacheConfig, out_dir: Path, info: TeacherInfo, teacher: Teacher, todo, writer, ranks) -> None:
    """Compute this rank's pending units for one (loaded once) teacher."""
    name, tokenizer = info.spec.name, info.tokenizer
    masker = Masker(config.masking, tokenizer.mask_token_id, set(tokenizer.all_special_ids), len(tokenizer))
    wanted = set(todo)

    def pending_units():
        # Streams each language once; blocks of other ranks or already done are read past, not tokenised.
        for language in dict.fromkeys(language for language, _ in todo):
            documents = read_language(config.sources_for(language))
            for part in itertools.count():
                block = list(itertools.islice(documents, config.shard_documents))
                if not block:
                    break
                if (language, part) in wanted:
                    unit = prepare_unit(block, tokenizer, masker, config.max_length, config.masking.copies)
                    yield language, part, len(block), unit

    progress = tqdm(total=len(todo), desc=name, unit="shard", disable=not ranks.progress_enabled())
    log_path = out_dir / "logs" / f"cache-logits.rank{ranks.rank}.jsonl"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    for language, part, documents, unit in prefetch(pending_units()):
        started = time.perf_counter()
        predictions = score_unit(
            teacher, unit, config.top_k, config.temperatures, config.batch_tokens, config.batch_size
        )
        table = build_table(unit.rows, language, predictions, config.logprobs_dtype)
        seconds = time.perf_counter() - started
        record = {
            "teacher": name,
            "language": language,
            "part": part,
            "documents": documents,
            "windows_without_tokens": unit.windows_without_tokens,
        }
        writer.submit(_write_unit_job(out_dir, table, record, log_path, seconds, unit.tokens))
        progress.set_postfix(language=language, tokens_per_s=f"{unit.tokens / max(seconds, 1e-9):.0f}")
        progress.update(1)
    progress.close()


def _write_unit_job(out_dir: Path, table, record: dict, log_path: Path, seconds: float, tokens: int):
    """The writer thread's job for one unit: shard first, then its marker (the unit's completion record)."""

    def job() -> None:
        path = mf.shard_path(record["teacher"], record["language"], record["part"])
        written = write_shard(out_dir, path, table)
        entry = ShardEntry(
            **record,
            path=path,
            rows=written.rows,
            masked_positions=written.masked_positions,
            bytes=written.bytes,
            sha256=written.sha256,
        )
        mf.write_marker(out_dir, entry)
        event = {
            **entry.model_dump(),
            "seconds": round(seconds, 4),
            "tokens_per_second": round(tokens / max(seconds, 1e-9), 1),
        }
        with log_path.open("a", encoding="utf-8") as log:
            log.write(json.dumps(event) + "\n")

    return job


def _finish_manifest(out_dir: Path, parts: dict[str, int]) -> Manifest:
    manifest = Manifest.load(out_dir, require_complete=False)
    shards, missing = [], []
    for name, teacher in manifest.teachers.items():
        for language in teacher.languages:
            for part in range(parts[language]):
                entry = mf.read_marker(out_dir, name, language, part)
                if entry is None:
                    missing.append(mf.shard_path(name, language, part))
                else:
                    shards.append(entry)
    if missing:
        raise RuntimeError(f"{len(missing)} units have no shard after every rank finished, e.g. {missing[0]}")
    manifest.shards = shards
    manifest.totals = Totals(
        rows=sum(s.rows for s in shards),
        masked_positions=sum(s.masked_positions for s in shards),
        bytes=sum(s.bytes for s in shards),
    )
    manifest.complete = True
    manifest.save(out_dir)
    shutil.rmtree(out_dir / mf.PROGRESS_DIR, ignore_errors=True)
    return manifest


def _summary(manifest: Manifest, out_dir: Path) -> str:
    totals = manifest.totals
    return (
        f"cache complete: {out_dir} — {len(manifest.teachers)} teachers, {len(manifest.shards)} shards, "
        f"{totals.rows} rows, {totals.masked_positions} masked positions, {totals.bytes / 1e6:.1f} MB"
    )
