"""One line of plain text from any of the sources: what every reader does to a paragraph before filtering."""

from __future__ import annotations

import re

# Chinese and Japanese characters and their punctuation: a line break between two of them is no word space.
_CJK = "\u3000-\u303f\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef"
_CJK_GAP = re.compile(f"(?<=[{_CJK}]) (?=[{_CJK}])")

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def clean(text: str) -> str:
    """One line of plain text: colour codes and control characters removed, whitespace folded (with no space
    left between two Chinese or Japanese characters that a line break had separated)."""
    text = _CONTROL.sub(" ", _ANSI.sub("", text))
    return _CJK_GAP.sub("", " ".join(text.split()))
