"""Fortune cookies: a fortunes file holds them one after another, each ended by a line with a lone `%`."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

from mdkd.demo.corpus.fetch import plain_files
from mdkd.demo.corpus.text import clean


def cookies(text: str) -> list[str]:
    """The cookies of one fortunes file, cleaned, in file order."""
    return [clean(cookie) for cookie in re.split(r"^%\s*$", text, flags=re.MULTILINE)]


def fortune_files(base: Path) -> Iterator[Path]:
    """The cookie files of a fortunes package, the offensive `off/` folder and the `.dat` indexes left out."""
    for path in plain_files(base):
        if path.suffix not in (".dat", ".u8") and "off" not in path.relative_to(base).parts:
            yield path
