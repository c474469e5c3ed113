"""The demo's corpus files: every source's paragraphs, filtered, deduplicated and sampled per language.

What passes the filters is deduplicated (within a language and across languages) and sampled deterministically:
the same packages give the same files.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from mdkd.demo.corpus.fetch import Source, deb_file, fetch_packages, read_text
from mdkd.demo.corpus.fortunes import cookies, fortune_files
from mdkd.demo.corpus.help_pages import help_files, help_paragraphs
from mdkd.demo.corpus.language import is_language, usable
from mdkd.demo.corpus.manpages import man_files, man_paragraphs
from mdkd.demo.corpus.text import clean
from mdkd.pipeline.errors import UserError
from mdkd.pipeline.files import write_json_atomic

_NOT_WORD = re.compile(r"[\W_]+")


def paragraphs(source: Source, root: Path) -> Iterator[str]:
    """Every cleaned paragraph of one unpacked package, in file order, before any filtering."""
    base = root / source.under
    if source.kind == "help":
        for path in help_files(base):
            yield from help_paragraphs(read_text(path))
    elif source.kind == "man":
        for path in man_files(base):
            yield from (clean(paragraph) for paragraph in man_paragraphs(read_text(path)))
    elif source.kind == "fortunes":
        for path in fortune_files(base):
            yield from cookies(read_text(path))
    else:
        raise ValueError(f"unknown source kind {source.kind!r}")


@dataclass
class LanguageText:
    documents: list[str]  # distinct, in sample order
    paragraphs: int = 0  # before any filtering
    too_short_or_code: int = 0
    wrong_language: int = 0
    duplicates: int = 0


def language_text(language: str, sources: list[tuple[Source, Path]]) -> LanguageText:
    """A language's distinct usable paragraphs from its packages, with what the filters dropped."""
    result = LanguageText(documents=[])
    seen: set[str] = set()
    for source, root in sources:
        for paragraph in paragraphs(source, root):
            result.paragraphs += 1
            if not usable(paragraph, language):
                result.too_short_or_code += 1
            elif not is_language(paragraph, language):
                result.wrong_language += 1
            elif _key(paragraph) in seen:
                result.duplicates += 1
            else:
                seen.add(_key(paragraph))
                result.documents.append(paragraph)
    return result


def _key(text: str) -> str:
    """What two copies of a paragraph share: its letters and digits, case folded."""
    return _NOT_WORD.sub("", text.casefold())


def sample(documents: list[str], count: int | None = None, max_bytes: int | None = None) -> list[str]:
    """Distinct documents in an order set by a hash of their text (spread over every file and package, and the
    same on every machine), up to `count` documents and `max_bytes` bytes of UTF-8 (newlines included)."""
    distinct = list(dict.fromkeys(documents))
    distinct.sort(key=lambda text: hashlib.blake2b(text.encode(), digest_size=8).digest())
    if count is not None:
        distinct = distinct[:count]
    if max_bytes is None:
        return distinct
    chosen, total = [], 0
    for text in distinct:
        size = len(text.encode()) + 1
        if total + size > max_bytes:
            break
        chosen.append(text)
        total += size
    return chosen


def write_corpus(
    roots: dict[str, list[tuple[Source, Path]]],
    out_dir: Path,
    documents_per_language: int | None = None,
    bytes_per_language: int | None = None,
) -> dict[str, dict]:
    """out_dir/<language>.txt, one document per line, at most `documents_per_language` documents and
    `bytes_per_language` bytes each (None: no cap); a paragraph found in two languages is in neither. Returns per
    language the package files read, the documents and bytes written, the distinct usable documents there were,
    and how many paragraphs there were and each filter dropped."""
    texts = {language: language_text(language, sources) for language, sources in sorted(roots.items())}
    keys = {language: {_key(document) for document in text.documents} for language, text in texts.items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    stats = {}
    for language, text in texts.items():
        elsewhere = set().union(*(keys[other] for other in keys if other != language))
        shared = [document for document in text.documents if _key(document) in elsewhere]
        kept = [document for document in text.documents if _key(document) not in elsewhere]
        chosen = sample(kept, documents_per_language, bytes_per_language)
        if not chosen:
            packages = ", ".join(source.package for source, _ in roots[language])
            raise UserError(f"the packages {packages} gave no usable {language} text")
        body = "\n".join(chosen) + "\n"
        (out_dir / f"{language}.txt").write_text(body, encoding="utf-8")
        debs = [(deb_file(root.parent, source.package), source.package) for source, root in roots[language]]
        stats[language] = {
            "packages": [deb.name if deb else package for deb, package in debs],
            "documents": len(chosen),
            "bytes": len(body.encode()),
            "available": len(kept),
            "paragraphs": text.paragraphs,
            "too_short_or_code": text.too_short_or_code,
            "wrong_language": text.wrong_language,
            "duplicates": text.duplicates + len(shared),
        }
    return stats


def prepare_corpus(
    root: Path, given: Path | None, languages: list[str], *, teacher_bytes: int, student_documents: int
) -> list[str]:
    """root/teacher_corpus/<language>.txt (from `given`, the --corpus folder, or from Debian's packages) and
    root/corpus/<language>.txt, its first `student_documents` lines: the same file name and line numbers, so a
    document has one doc_id in both and the held-out rule leaves out the same documents for teachers and students.
    Written once (a rerun reads corpus/corpus.json); returns the languages."""
    marker = root / "corpus" / "corpus.json"
    if marker.exists():
        return json.loads(marker.read_text())["languages"]
    teacher_folder = root / "teacher_corpus"
    if given is not None:
        files = sorted(given.glob("*.txt"))
        if not files:
            raise UserError(f"--corpus {given} holds no <language>.txt files (one document per line)")
        teacher_folder.mkdir(parents=True, exist_ok=True)
        record = {}
        for path in files:
            lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            body = "\n".join(lines) + "\n"
            (teacher_folder / path.name).write_text(body, encoding="utf-8")
            record[path.stem] = {"documents": len(lines), "bytes": len(body.encode())}
        source = str(given)
    else:
        roots = fetch_packages(languages, root / "packages")
        record = write_corpus(roots, teacher_folder, bytes_per_language=teacher_bytes)
        source = "Debian packages: " + ", ".join(deb for stats in record.values() for deb in stats["packages"])
    students_folder = root / "corpus"
    students_folder.mkdir(parents=True, exist_ok=True)
    for language in record:
        lines = (teacher_folder / f"{language}.txt").read_text(encoding="utf-8").splitlines()[:student_documents]
        (students_folder / f"{language}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        record[language]["students_documents"] = len(lines)
    write_json_atomic(marker, {"languages": sorted(record), "source": source, "stats": record})
    return sorted(record)
