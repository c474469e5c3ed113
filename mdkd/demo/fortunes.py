"""Real multilingual running text for the demo, offline: Debian's `fortunes` packages.

Each package is fetched with `apt-get download` (no root needed once apt's package lists exist) and unpacked
with `dpkg-deb -x` into a folder of its own, so every file's language is its package's. Cookies are separated by
lines holding `%`; they are cleaned (terminal colour codes and control characters out, whitespace folded to
single spaces: one document per line), deduplicated, and sampled deterministically across all files.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
from pathlib import Path

from mdkd.pipeline.errors import UserError

PACKAGES = {
    "en": "fortunes", "de": "fortunes-de", "ru": "fortunes-ru", "zh": "fortunes-zh",
    "es": "fortunes-es", "it": "fortunes-it", "pl": "fortunes-pl",
}
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
MIN_CHARACTERS = 20  # shorter cookies are mostly signatures and one-word jokes


def fetch_packages(languages: list[str], folder: Path) -> dict[str, Path]:
    """Download and unpack each language's package; returns {language: unpacked root}."""
    unknown = [l for l in languages if l not in PACKAGES]
    if unknown:
        raise UserError(f"no fortunes package for {unknown} (known: {', '.join(PACKAGES)}); give --corpus DIR instead")
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise UserError(f"this machine has no {tool}, so the demo cannot fetch Debian's fortunes: give --corpus DIR "
                            "with one <language>.txt file per language (one document per line)")
    folder.mkdir(parents=True, exist_ok=True)
    roots = {}
    for language in languages:
        package, root = PACKAGES[language], folder / language
        if not (root / "usr").exists():
            done = subprocess.run(["apt-get", "download", package], cwd=folder, capture_output=True, text=True)
            debs = sorted(folder.glob(f"{package}_*.deb"))
            if done.returncode != 0 or not debs:
                last = (done.stderr.strip().splitlines() or ["no output"])[-1]
                raise UserError(f"apt-get download {package} failed ({last}); apt's package lists may be empty: run "
                                "`apt-get update` as root, or give --corpus DIR")
            subprocess.run(["dpkg-deb", "-x", str(debs[-1]), str(root)], check=True, capture_output=True)
        roots[language] = root
    return roots


def clean(cookie: str) -> str:
    """One line of plain text: colour codes and control characters removed, whitespace folded."""
    text = _CONTROL.sub(" ", _ANSI.sub("", cookie))
    return " ".join(text.split())


def cookies(root: Path) -> list[str]:
    """Every cleaned cookie of an unpacked package, in file order (the offensive `off/` folder left out)."""
    found = []
    base = root / "usr" / "share" / "games" / "fortunes"
    for path in sorted(p for p in base.rglob("*") if p.is_file() and not p.is_symlink()):
        if path.suffix == ".dat" or "off" in path.relative_to(base).parts:
            continue
        text = path.read_bytes().decode("utf-8", errors="replace")
        for cookie in re.split(r"^%\s*$", text, flags=re.MULTILINE):
            cleaned = clean(cookie)
            if len(cleaned) >= MIN_CHARACTERS and "\ufffd" not in cleaned:
                found.append(cleaned)
    return found


def sample(documents: list[str], count: int) -> list[str]:
    """Up to `count` distinct documents, chosen by a hash of their text: spread over every file, and the same
    documents on every machine."""
    distinct = list(dict.fromkeys(documents))
    distinct.sort(key=lambda text: hashlib.blake2b(text.encode(), digest_size=8).digest())
    return distinct[:count]


def write_corpus(roots: dict[str, Path], out_dir: Path, documents_per_language: int) -> dict[str, int]:
    """out_dir/<language>.txt, one document per line; returns the document counts."""
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = {}
    for language, root in roots.items():
        chosen = sample(cookies(root), documents_per_language)
        if not chosen:
            raise UserError(f"the {PACKAGES[language]} package gave no usable text")
        (out_dir / f"{language}.txt").write_text("\n".join(chosen) + "\n", encoding="utf-8")
        counts[language] = len(chosen)
    return counts
