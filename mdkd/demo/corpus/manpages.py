"""Manual pages: a small roff reader (man and mdoc macros) that keeps a page's running text, one paragraph per line.

Macros, escapes, tables, examples, synopses and option tags are left out; special characters are spelled out.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

from mdkd.demo.corpus.fetch import plain_files

_SPECIAL = {
    "lq": "“",
    "rq": "”",
    "oq": "‘",
    "cq": "’",
    "aq": "'",
    "dq": '"',
    "em": "—",
    "en": "–",
    "hy": "-",
    "bu": "•",
    "co": "©",
    "rg": "®",
    "tm": "™",
    "de": "°",
    "mu": "×",
    "di": "÷",
    "+-": "±",
    ">=": "≥",
    "<=": "≤",
    "!=": "≠",
    "->": "→",
    "<-": "←",
    "ua": "↑",
    "da": "↓",
    "ss": "ß",
    ":a": "ä",
    ":o": "ö",
    ":u": "ü",
    ":A": "Ä",
    ":O": "Ö",
    ":U": "Ü",
    "Fo": "«",
    "Fc": "»",
    "fo": "‹",
    "fc": "›",
    "Bq": "„",
    "bq": "‚",
    "rs": "\\",
    "ti": "~",
    "ha": "^",
    "ga": "`",
    "sl": "/",
    "ba": "|",
    "or": "|",
    "ul": "_",
    "sc": "§",
    "ps": "¶",
    "dg": "†",
    "Eu": "€",
    "eu": "€",
    "Po": "£",
    "Ye": "¥",
    "ct": "¢",
    "12": "½",
    "14": "¼",
    "34": "¾",
    "'e": "é",
    "`e": "è",
    "^e": "ê",
    "'a": "á",
    "`a": "à",
    "^a": "â",
    ",c": "ç",
    "~n": "ñ",
    "'o": "ó",
    "'i": "í",
    "'u": "ú",
    "pl": "+",
    "mi": "-",
    "eq": "=",
}
_STRINGS = {
    "lq": "“",
    "rq": "”",
    'L"': "“",
    'R"': "”",
    "C'": "'",
    "C`": "'",
    "Aq": "'",
    "C+": "C++",
    "--": "—",
    "Tm": "™",
    "R": "®",
}
_ESCAPE = re.compile(
    r"""\\(?:
      (?P<font>f(?:\[[^\]]*\]|\(..|.))
    | (?P<size>s(?:[-+]?\([0-9]{2}|[-+]?\[[^\]]*\]|[-+]?'[^']*'|[-+]?[0-9]))
    | \*(?:\[(?P<string_long>[^\]\s]*)[^\]]*\]|\((?P<string2>..)|(?P<string1>.))
    | (?P<register>n[-+]?(?:\[[^\]]*\]|\(..|.))
    | \((?P<special2>..)
    | \[(?P<special>[^\]]*)\]
    | (?P<quoted>[hvwlLNDoXSbxZRBAC]'[^']*')
    | (?P<colour>[mMFY](?:\[[^\]]*\]|\(..|.))
    | (?P<mark>k.)
    | (?P<char>.)
    )""",
    re.VERBOSE,
)
_CHARS = {
    "-": "-",
    "e": "\\",
    "\\": "\\",
    " ": " ",
    "~": " ",
    "0": " ",
    "t": " ",
    ".": ".",
    "'": "'",
    "`": "`",
    "_": "_",
    "(": "(",
    "%": "",
    "&": "",
    "|": "",
    "^": "",
    ")": "",
    ":": "",
    "/": "",
    ",": "",
    "c": "",
    "p": "",
    "a": "",
    "d": "",
    "u": "",
    "r": "",
    "z": "",
    "{": "",
    "}": "",
}


def _escape(match: re.Match) -> str:
    group = match.lastgroup
    if group in ("string_long", "string2", "string1"):
        return _STRINGS.get(match.group(group), "")
    if group in ("special2", "special"):
        name = match.group(group)
        if re.fullmatch(r"u[0-9A-Fa-f]{4,6}", name):
            return chr(int(name[1:], 16))
        return _SPECIAL.get(name, "")
    if group == "char":
        return _CHARS.get(match.group("char"), match.group("char"))
    return ""  # fonts, sizes, registers, motions, colours, marks


def roff_text(line: str) -> str:
    """One line of roff text with its escapes resolved (fonts, sizes and motions dropped, special characters
    spelled out). A trailing `\\c` is kept as a marker: the next line continues this one without a space."""
    line = re.sub(r'\\".*$|\\#.*$', "", line)
    joined = line.endswith("\\c")
    text = _ESCAPE.sub(_escape, line[:-2] if joined else line)
    return text + ("\\c" if joined else "")


def _macro_arguments(text: str) -> list[str]:
    """A macro's arguments: words, or double-quoted strings (with `""` for a quote inside)."""
    return [
        match.group(1).replace('""', '"') if match.group(1) is not None else match.group(2)
        for match in re.finditer(r'"((?:[^"]|"")*)"?|(\S+)', text)
    ]


# Skipped blocks: their first macro and the macro that ends them.
_SKIP_UNTIL = {
    "TS": "TE",
    "EX": "EE",
    "nf": "fi",
    "EQ": "EN",
    "PS": "PE",
    "SY": "YS",
    "de": "..",
    "de1": "..",
    "am": "..",
    "ig": "..",
    "ds1": "..",
}
# Macros whose arguments are running text: `alternating` ones join their arguments without spaces.
_FONT_MACROS = {"B", "I", "SM", "SB", "R"}
_ALTERNATING = {"BR", "BI", "IB", "IR", "RB", "RI"}
# mdoc's inline macros: their arguments are text, other macro names among them are dropped.
_MDOC_INLINE = set(
    "Nm Fl Ar Xr Pa Em Sy Dq Sq Ql Va Cm Ev Li Ic Dv Er Fn Fa Ft Ad Ms Ux Bx At Op Oo Oc Qq Pq Aq "
    "Brq Bq No Ns Tn Lk Mt Cd Ot St Dl Nd".split()
)
# Macros that change only the look of the text: no paragraph break, nothing to read.
_LOOK_ONLY = {
    "",
    "ad",
    "na",
    "hy",
    "nh",
    "ft",
    "ps",
    "ll",
    "ta",
    "ds",
    "nr",
    "ne",
    "so",
    "cs",
    "ss",
    "ev",
    "hw",
    "lf",
    "tr",
    "fam",
    "mso",
    "pc",
    "PD",
    "UR",
    "MT",
    "cu",
    "ul",
    "lg",
    "DT",
    "TH",
    "Dd",
    "Dt",
    "Os",
}


def man_paragraphs(source: str) -> list[str]:
    """The paragraphs of a roff manual page (man or mdoc macros), each one line of plain text. Headings, option
    tags, synopses, tables, examples and no-fill blocks are left out; what a translator left in English stays in
    (the language filter's job)."""
    paragraphs: list[str] = []
    current: list[str] = []
    skip_until: str | None = None
    braces = 0
    tag_next = False

    def add(text: str) -> None:
        nonlocal tag_next
        if tag_next:
            tag_next = False
            return
        if current and current[-1].endswith("\\c"):
            current[-1] = current[-1][:-2] + text
        else:
            current.append(text)

    def brk() -> None:
        if current:
            paragraphs.append(" ".join(part.removesuffix("\\c") for part in current))
            current.clear()

    for line in source.splitlines():
        if braces:  # inside a conditional block \{ ... \}
            braces += line.count("\\{") - line.count("\\}")
            continue
        if skip_until is not None:
            if _ends(line, skip_until):
                skip_until = None
            continue
        if not line.startswith((".", "'")):
            text = roff_text(line)
            if text.strip():
                add(text.strip() if not text.endswith("\\c") else text.lstrip())
            else:
                brk()  # an empty line breaks a paragraph
            continue
        request = re.match(r"[.']\s*(\S*)\s*(.*)$", line)
        name, rest = request.group(1), request.group(2)
        if name.startswith('\\"') or name.startswith("\\#"):
            continue  # a comment
        if name in ("if", "ie", "el") or name.startswith("\\}"):
            braces = max(0, line.count("\\{") - line.count("\\}"))
            continue
        if name in _SKIP_UNTIL:
            brk()
            skip_until = _SKIP_UNTIL[name]
            continue
        if name == "Bd":
            brk()
            if "-literal" in rest or "-unfilled" in rest:
                skip_until = "Ed"
            continue
        if name in _FONT_MACROS or name in _ALTERNATING:
            arguments = [roff_text(argument) for argument in _macro_arguments(rest)]
            if arguments:
                add(("" if name in _ALTERNATING else " ").join(arguments))
            continue
        if name in ("UE", "ME"):  # the end of a link: its argument is the punctuation after it
            if rest.strip() and current:
                current[-1] += roff_text(rest.strip())
            continue
        if name in _MDOC_INLINE:
            words = [roff_text(word) for word in _macro_arguments(rest) if word not in _MDOC_INLINE]
            if words:
                add(" ".join(words))
            continue
        if name in _LOOK_ONLY:
            continue
        brk()  # PP, LP, P, TP, IP, HP, SH, SS, sp, br, in, RS, RE, Pp, Sh, It, Bl, El and whatever else
        # The next line is no running text: the tag of .TP/.TQ (an option's name), or a heading of .SH/.SS.
        tag_next = name in ("TP", "TQ") or (name in ("SH", "SS", "Sh", "Ss") and not rest.strip())
    brk()
    return paragraphs


def _ends(line: str, macro: str) -> bool:
    """Whether a line is the macro that ends a skipped block."""
    if macro == "..":
        return line.rstrip() == ".."
    return re.match(r"[.']\s*" + re.escape(macro) + r"(\s|$)", line) is not None


def man_files(base: Path) -> Iterator[Path]:
    return (path for path in plain_files(base) if path.name.endswith(".gz"))
