"""LibreOffice's help pages (HTML): the text a reader sees, cut into paragraphs by block elements.

Text hidden from the reader (other platforms' variants, code, navigation, "how to get there" boxes, related topics,
the debug footer) is left out.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from html import unescape
from pathlib import Path

from mdkd.demo.corpus.fetch import plain_files
from mdkd.demo.corpus.text import clean

_VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}
_BLOCK = {
    "p",
    "h1",
    "h2",
    "h3",
    "h4",
    "h5",
    "h6",
    "li",
    "td",
    "th",
    "tr",
    "table",
    "div",
    "ul",
    "ol",
    "dl",
    "dt",
    "dd",
    "pre",
    "blockquote",
    "section",
    "header",
    "footer",
    "body",
}
_SKIP_TAGS = {
    "head",
    "script",
    "style",
    "header",
    "footer",
    "aside",
    "nav",
    "pre",
    "code",
    "noscript",
    "title",
    "button",
    "label",
    "select",
    "textarea",
}
_SKIP_CLASSES = {
    "bascode",
    "code",
    "debug",
    "howtoget",
    "howtogetheader",
    "howtogetbody",
    "related",
    "relatedtopics",
    "relatedbody",
}
# A tag, a comment or a declaration; the text between them is the page's text. (LibreOffice's help pages are
# generated, regular HTML: a tokenizer this simple reads them, several times faster than html.parser.)
_MARKUP = re.compile(r"""<(/?)([A-Za-z][A-Za-z0-9]*)((?:[^>"']|"[^"]*"|'[^']*')*)>|<!--.*?-->|<![^>]*>""", re.DOTALL)
_ATTRIBUTE = re.compile(r"""([A-Za-z_:][-A-Za-z0-9_:.]*)(?:\s*=\s*(?:"([^"]*)"|'([^']*)'|([^\s"'>]+)))?""")


def help_paragraphs(page: str) -> list[str]:
    """The paragraphs of one LibreOffice help page (HTML), each one line of plain text: the text a reader sees,
    with the `default` variant of each platform or module switch, and no navigation, code, menu paths, related
    topics or debug footer."""
    start, end = page.find('<div id="DisplayArea"'), page.find('<div id="SearchFrame"')
    if 0 <= start < end:  # the page's own content, without its head, navigation and footer
        page = page[start:end]
    found: list[str] = []
    current: list[str] = []
    stack: list[tuple[str, bool]] = []  # open elements: (tag, whether it hides its content)
    hidden = 0
    position = 0

    def brk() -> None:
        text = clean(unescape("".join(current)))
        if text:
            found.append(text)
        current.clear()

    for match in _MARKUP.finditer(page):
        if not hidden and match.start() > position:
            current.append(page[position : match.start()])
        position = match.end()
        closing, tag = match.group(1), (match.group(2) or "").lower()
        if not tag:
            continue  # a comment or a declaration
        if tag in _BLOCK:
            brk()
        elif tag == "br" and not hidden:
            current.append(" ")
        if closing:
            for index in range(len(stack) - 1, -1, -1):
                if stack[index][0] == tag:
                    hidden -= sum(hides for _, hides in stack[index:])
                    del stack[index:]
                    break
        elif tag not in _VOID and not match.group(3).endswith("/"):
            hides = tag in _SKIP_TAGS
            attributes = match.group(3)
            if not hides and ("class" in attributes or "hidden" in attributes):
                values = {
                    m.group(1).lower(): m.group(2) or m.group(3) or m.group(4) or ""
                    for m in _ATTRIBUTE.finditer(attributes)
                }
                hides = bool(set(values.get("class", "").split()) & _SKIP_CLASSES) or (
                    "hidden" in values and not values.get("id", "").startswith("default")
                )
            stack.append((tag, hides))
            hidden += hides
    if not hidden:
        current.append(page[position:])
    brk()
    return found


def help_files(base: Path) -> Iterator[Path]:
    return (path for path in plain_files(base) if path.suffix == ".html")
