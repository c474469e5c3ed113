"""Streaming corpus reading: `.txt`, `.jsonl`, `.parquet`, folders of them, and `datasets` specs.

Documents are yielded one at a time, so memory does not grow with the corpus. A file may be an object on an
fsspec filesystem (`s3://...`), streamed through the store layer: the same bytes give the same documents, doc_ids
and fingerprint as the local file. Every document gets a stable
`doc_id` built from its language, its file (relative to the source) and its line or row, so every teacher and
every rank names a document the same way. Lines that are not valid UTF-8 are skipped and counted, not fatal.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import BinaryIO

import pyarrow.parquet as pq

from mdkd.pipeline.cache.documents import doc_id
from mdkd.pipeline.errors import UserError, first_line
from mdkd.pipeline.store import ObjectFolder, is_uri
from mdkd.pipeline.teacher_pass.config import CORPUS_SUFFIXES, CorpusSource


@dataclass(frozen=True)
class Document:
    doc_id: str
    text: str


@dataclass
class SourceCounts:
    """What reading one source found; filled in while its documents are streamed."""

    documents: int = 0
    skipped_blank: int = 0
    skipped_invalid_utf8: int = 0
    fingerprint: str = ""
    _hash: hashlib._Hash = field(default_factory=hashlib.sha256, repr=False)


def _files_of(source: CorpusSource) -> list[tuple[Path | str, str]]:
    """(file, name relative to the source) pairs in a stable order (`CorpusSource.files`)."""
    files = source.files()
    if not files:
        raise UserError(
            f"corpus folder {source.path} holds no {', '.join(CORPUS_SUFFIXES)} files (point 'path' at the data)"
        )
    return files


@contextmanager
def _opened(path: Path | str) -> Iterator[BinaryIO]:
    """A corpus file opened for reading bytes: a local file, or an object streamed from its store."""
    with ExitStack() as stack:
        try:
            handle = stack.enter_context(ObjectFolder(path).open() if is_uri(path) else Path(path).open("rb"))
        except OSError as exc:
            raise UserError(
                f"cannot read corpus file {path}: {exc.strerror or first_line(exc)} (check the path and permissions)"
            ) from None
        yield handle


def _text_lines(path: Path | str, counts: SourceCounts) -> Iterator[tuple[int, str | None]]:
    """(1-based line number, decoded line or None when it is not UTF-8), hashing the bytes as they go by."""
    with _opened(path) as handle:
        for number, raw in enumerate(handle, start=1):
            counts._hash.update(raw)
            try:
                yield number, raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError:
                counts.skipped_invalid_utf8 += 1
                yield number, None


def _read_txt(path: Path | str, name: str, source: CorpusSource, counts: SourceCounts) -> Iterator[tuple[str, str]]:
    for number, line in _text_lines(path, counts):
        if line is not None:
            yield f"{name}:{number}", line


def _read_jsonl(path: Path | str, name: str, source: CorpusSource, counts: SourceCounts) -> Iterator[tuple[str, str]]:
    for number, line in _text_lines(path, counts):
        if line is None:
            continue
        if not line.strip():
            yield f"{name}:{number}", ""  # counted as blank by read_source
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{number} is not valid JSON ({exc.msg}); fix or remove that line") from None
        if not isinstance(record, dict) or source.text_field not in record:
            raise UserError(f"{path}:{number} has no field '{source.text_field}' (set text_field in the corpus entry)")
        yield f"{name}:{number}", _text(record[source.text_field], f"{path}:{number}", source)


def _read_parquet(path: Path | str, name: str, source: CorpusSource, counts: SourceCounts) -> Iterator[tuple[str, str]]:
    with _opened(path) as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            counts._hash.update(block)
        handle.seek(0)
        try:
            parquet = pq.ParquetFile(handle)
        except Exception as exc:  # pyarrow raises ArrowInvalid, OSError...: all mean the file cannot be used
            raise UserError(f"cannot read corpus file {path}: not a readable Parquet file ({exc})") from None
        if source.text_field not in parquet.schema_arrow.names:
            raise UserError(f"{path} has no column '{source.text_field}' (set text_field in the corpus entry)")
        row = 0
        for batch in parquet.iter_batches(columns=[source.text_field], batch_size=4096):
            for text in batch.column(0).to_pylist():
                yield f"{name}:{row}", _text(text, f"{path} row {row}", source)
                row += 1


def _text(value, where: str, source: CorpusSource) -> str:
    """A document's text: null counts as blank; anything but a string is an error."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise UserError(f"{where}: '{source.text_field}' holds {type(value).__name__}, not text (set text_field)")
    return value


_READERS = {".txt": _read_txt, ".jsonl": _read_jsonl, ".parquet": _read_parquet}


def _read_dataset(source: CorpusSource, counts: SourceCounts) -> Iterator[tuple[str, str]]:
    import datasets

    spec = dict(source.dataset or {})
    try:
        dataset = datasets.load_dataset(**spec)
    except Exception as exc:  # datasets raises many types; the user needs the message, not the class
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"cannot load dataset {json.dumps(spec, sort_keys=True)}: {message}") from None
    if isinstance(dataset, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        raise UserError(f"dataset {spec['path']} has several splits {list(dataset)}: add 'split' to the dataset spec")
    columns = dataset.column_names or []
    if columns and source.text_field not in columns:
        raise UserError(f"dataset {spec['path']} has no column '{source.text_field}' (columns: {', '.join(columns)})")
    # A map-style dataset carries a content fingerprint; a streamed one only its spec.
    counts._hash.update(str(getattr(dataset, "_fingerprint", "")).encode())
    counts._hash.update(json.dumps(spec, sort_keys=True).encode())
    prefix = source.dataset_name()
    for row, record in enumerate(dataset):
        yield f"{prefix}:{row}", _text(record.get(source.text_field), f"dataset {spec['path']} row {row}", source)


def read_source(source: CorpusSource, counts: SourceCounts | None = None) -> Iterator[Document]:
    """Stream the non-blank documents of one source; `counts` is complete once the stream is exhausted."""
    counts = counts if counts is not None else SourceCounts()
    if source.dataset is not None:
        records = _read_dataset(source, counts)
    else:
        records = (
            record
            for path, name in _files_of(source)
            for record in _READERS[PurePosixPath(path).suffix](path, name, source, counts)
        )
    for local_id, text in records:
        if not text.strip():
            counts.skipped_blank += 1
            continue
        counts.documents += 1
        yield Document(doc_id=doc_id(source.language, local_id), text=text)
    counts.fingerprint = "sha256:" + counts._hash.hexdigest()


@dataclass(frozen=True)
class SourceSummary:
    """What a full read of one source found (picklable, so rank 0 can share it)."""

    documents: int
    skipped_blank: int
    skipped_invalid_utf8: int
    fingerprint: str


def scan_source(source: CorpusSource) -> SourceSummary:
    """Read a source once to fingerprint it and count its documents; an empty source is an error."""
    counts = SourceCounts()
    for _ in read_source(source, counts):
        pass
    if counts.documents == 0:
        raise UserError(
            f"corpus source {source.description} ({source.language}) has no documents after skipping "
            f"{counts.skipped_blank} blank and {counts.skipped_invalid_utf8} non-UTF-8 lines (give it some text)"
        )
    return SourceSummary(counts.documents, counts.skipped_blank, counts.skipped_invalid_utf8, counts.fingerprint)


def read_language(sources: list[CorpusSource]) -> Iterator[Document]:
    """All documents of one language, its sources in config order."""
    for source in sources:
        yield from read_source(source)
