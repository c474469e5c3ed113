"""Debian's packages of each language's text: which ones, fetching and unpacking them, and reading their files.

Each language's packages (LibreOffice's help, the translated manual pages, the fortune cookies) are fetched with
`apt-get download` (no root needed once apt's package lists exist) and unpacked with `dpkg-deb -x` into a folder
of their own.
"""

from __future__ import annotations

import gzip
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from mdkd.pipeline.errors import UserError


@dataclass(frozen=True)
class Source:
    package: str
    kind: str  # "help" (LibreOffice's HTML help), "man" (roff manual pages) or "fortunes"
    under: str  # the folder inside the unpacked package that holds this language's files


def _sources(help_code: str, manpages: str | None, man_dir: str | None, fortunes: str | None) -> tuple[Source, ...]:
    found = [Source(f"libreoffice-help-{help_code.lower()}", "help", f"usr/share/libreoffice/help/{help_code}")]
    if manpages:
        found.append(Source(manpages, "man", f"usr/share/man/{man_dir}" if man_dir else "usr/share/man"))
    if fortunes:
        found.append(Source(fortunes, "fortunes", "usr/share/games/fortunes"))
    return tuple(found)


SOURCES: dict[str, tuple[Source, ...]] = {
    "de": _sources("de", "manpages-de", "de", "fortunes-de"),
    "en": _sources("en-US", "manpages", None, "fortunes"),
    "es": _sources("es", "manpages-es", "es", "fortunes-es"),
    "fr": _sources("fr", "manpages-fr", "fr", None),
    "ru": _sources("ru", "manpages-ru", "ru", "fortunes-ru"),
    "zh": _sources("zh-CN", "manpages-zh", "zh_CN", "fortunes-zh"),  # simplified Chinese only (not zh_TW)
}


def fetch_packages(languages: list[str], folder: Path) -> dict[str, list[tuple[Source, Path]]]:
    """Download and unpack the packages of the languages into folder/<package> (skipping those unpacked already);
    returns {language: [(source, unpacked root)]}. A package this machine's apt cannot find is left out; a language
    left with none is an error."""
    unknown = [language for language in languages if language not in SOURCES]
    if unknown:
        raise UserError(
            f"no Debian packages known for {unknown} (known: {', '.join(SOURCES)}); give --corpus DIR instead"
        )
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise UserError(
                f"this machine has no {tool}, so the demo cannot fetch Debian's packages: give --corpus "
                "DIR with one <language>.txt file per language (one document per line)"
            )
    folder.mkdir(parents=True, exist_ok=True)
    packages = sorted({source.package for language in languages for source in SOURCES[language]})
    missing = [package for package in packages if not (folder / package / "usr").exists()]
    wanted = [package for package in missing if not deb_file(folder, package)]
    failure = ""
    if wanted:
        done = subprocess.run(["apt-get", "download", *wanted], cwd=folder, capture_output=True, text=True)
        if done.returncode != 0:  # one unknown package fails them all: fetch what can be had, one by one
            for package in wanted:
                one = subprocess.run(["apt-get", "download", package], cwd=folder, capture_output=True, text=True)
                if one.returncode != 0:
                    failure = (one.stderr.strip().splitlines() or ["no output"])[-1]
    for package in missing:
        deb = deb_file(folder, package)
        if deb is None:
            continue
        scratch = folder / f".{package}.tmp"
        shutil.rmtree(scratch, ignore_errors=True)
        done = subprocess.run(["dpkg-deb", "-x", str(deb), str(scratch)], capture_output=True, text=True)
        if done.returncode != 0:
            deb.unlink()  # most likely cut short while downloading: the next run fetches it again
            raise UserError(
                f"dpkg-deb could not unpack {deb.name} ({done.stderr.strip()}); it is deleted, run the demo again"
            )
        shutil.rmtree(folder / package, ignore_errors=True)
        scratch.rename(folder / package)  # a package counts as unpacked only once it is whole
    roots = {
        language: [
            (source, folder / source.package)
            for source in SOURCES[language]
            if (folder / source.package / "usr").exists()
        ]
        for language in languages
    }
    empty = [language for language, found in roots.items() if not found]
    if empty:
        names = " ".join(source.package for language in empty for source in SOURCES[language])
        raise UserError(
            f"apt-get download {names} failed ({failure or 'no output'}); apt's package lists may be "
            "empty: run `apt-get update` as root, or give --corpus DIR"
        )
    return roots


def deb_file(folder: Path, package: str) -> Path | None:
    """The package's downloaded .deb in folder (the last name, should there be several), None before the download."""
    found = sorted(folder.glob(f"{package}_*.deb"))
    return found[-1] if found else None


def plain_files(base: Path) -> list[Path]:
    """Every plain file below base, in a fixed order (links left out: a package's links repeat its files)."""
    if not base.is_dir():
        return []
    return sorted(path for path in base.rglob("*") if path.is_file() and not path.is_symlink())


def read_text(path: Path) -> str:
    """A package file's text, gunzipped if it is gzipped; bytes that are not UTF-8 read as U+FFFD (see `usable`)."""
    data = path.read_bytes()
    if path.name.endswith(".gz"):
        data = gzip.decompress(data)
    return data.decode("utf-8", errors="replace")
