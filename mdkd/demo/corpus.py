"""Real multilingual running text for the demo, offline, from Debian's packages.

Each language's packages (LibreOffice's help, the translated manual pages, the fortune cookies) are fetched with
`apt-get download` (no root needed once apt's package lists exist) and unpacked with `dpkg-deb -x` into a folder
of their own. Their text is cut into paragraphs: HTML help pages by block elements (text hidden from the reader
left out), manual pages by a small roff reader (macros, escapes, tables, examples and option tags left out),
cookies at their `%` lines. Every paragraph is whitespace-folded onto one line, dropped when it is short or looks
like code, and dropped when it is not in its package's language: translations fall back to the English original
for whatever is untranslated, and that English must not pass for German or Russian. What is left is deduplicated
(within a language and across languages) and sampled deterministically: the same packages give the same files.
"""

from __future__ import annotations

import gzip
import hashlib
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from html import unescape
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

# Paragraphs shorter than this are mostly headings, menu paths, signatures and option tags. Chinese carries about
# 2.5 times as much per character.
MIN_CHARACTERS = 40
MIN_CHARACTERS_CJK = 16
# Below this share of letters (among the characters that are not spaces) a paragraph is code, a path or a table.
MIN_LETTER_SHARE = 0.6
# A paragraph in a language of its own script must hold at least this share of its words in that script (a Chinese
# character counts as one word, as does a run of Latin letters).
MIN_SCRIPT_SHARE = 0.5


# ---------------------------------------------------------------------------------------------------------------
# Fetching


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
    wanted = [package for package in missing if not _deb(folder, package)]
    failure = ""
    if wanted:
        done = subprocess.run(["apt-get", "download", *wanted], cwd=folder, capture_output=True, text=True)
        if done.returncode != 0:  # one unknown package fails them all: fetch what can be had, one by one
            for package in wanted:
                one = subprocess.run(["apt-get", "download", package], cwd=folder, capture_output=True, text=True)
                if one.returncode != 0:
                    failure = (one.stderr.strip().splitlines() or ["no output"])[-1]
    for package in missing:
        deb = _deb(folder, package)
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


def _deb(folder: Path, package: str) -> Path | None:
    found = sorted(folder.glob(f"{package}_*.deb"))
    return found[-1] if found else None


# ---------------------------------------------------------------------------------------------------------------
# Fortune cookies

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def clean(text: str) -> str:
    """One line of plain text: colour codes and control characters removed, whitespace folded (with no space
    left between two Chinese or Japanese characters that a line break had separated)."""
    text = _CONTROL.sub(" ", _ANSI.sub("", text))
    return _CJK_GAP.sub("", " ".join(text.split()))


def cookies(text: str) -> list[str]:
    """The cookies of one fortunes file, cleaned, in file order."""
    return [clean(cookie) for cookie in re.split(r"^%\s*$", text, flags=re.MULTILINE)]


def _fortune_files(base: Path) -> Iterator[Path]:
    """The cookie files of a fortunes package, the offensive `off/` folder and the `.dat` indexes left out."""
    for path in _files(base):
        if path.suffix not in (".dat", ".u8") and "off" not in path.relative_to(base).parts:
            yield path


# ---------------------------------------------------------------------------------------------------------------
# Manual pages (roff)

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


def _man_files(base: Path) -> Iterator[Path]:
    return (path for path in _files(base) if path.name.endswith(".gz"))


# ---------------------------------------------------------------------------------------------------------------
# LibreOffice's help (HTML)

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


def _help_files(base: Path) -> Iterator[Path]:
    return (path for path in _files(base) if path.suffix == ".html")


# ---------------------------------------------------------------------------------------------------------------
# Language filter

# Short lists of frequent function words, and the letters English lacks. A Latin-script paragraph's evidence for a
# language is its words on that language's list and not on the rival's, plus its words holding one of the letters.
STOPWORDS = {
    language: set(words.split())
    for language, words in {
        "en": "the of and to is that for it with as are be this by or not from at which can you if but have has will "
        "would should when there their they these those its was were been being than then such into only also "
        "other more any each all one some what who how where no does do may must used use using file files "
        "following default option see value set an in on a",
        "de": "der die das und ist nicht zu den mit sich des auf für im dem ein eine einer eines einem einen es von "
        "sie wird werden bei oder auch als nach wie aus wenn kann können nur noch wir ich du er über unter "
        "zum zur diese dieser dieses dass sind wurde wurden haben hat sein seine ihre durch vom mehr alle muss "
        "soll keine kein dann damit welche jedoch sowie bzw datei dateien angegeben wählen klicken so an in was "
        "will also option",
        "es": "el la los las de del que y en un una es por con para se no al lo como más pero sus su le ya o este "
        "esta son entre cuando muy sin sobre también desde hay donde todo nos durante todos uno les ni otros "
        "ese eso ante ellos fue puede archivo opción valor",
        "fr": "le la les de des du et est un une que qui dans pour pas sur au aux ce cette ces il elle ne se sont "
        "avec par plus ou son sa ses leur été être fait comme mais nous vous peut tout lorsque si sans "
        "fichier option valeur en",
    }.items()
}
_LETTERS = {"de": re.compile(r"[äöüß]"), "es": re.compile(r"[ñáéíóú¿¡]"), "fr": re.compile(r"[éèêàçùâîôœ]")}
_EXCLUSIVE = {
    (language, rival): STOPWORDS[language] - STOPWORDS[rival] for language in STOPWORDS for rival in STOPWORDS
}

_WORD = re.compile(r"\b[^\W\d_]+\b")
_LATIN = re.compile(r"[A-Za-z\u00c0-\u024f][A-Za-z0-9_\u00c0-\u024f]*")  # a word, or an identifier
_NOT_LETTER = re.compile(r"[\W\d_]+")
_NOT_WORD = re.compile(r"[\W_]+")
_CODE = re.compile(r"[{};<>=|$#@\\]{2,}")
# The languages with a script of their own: a Cyrillic word, or one Chinese character.
_SCRIPT = {"ru": re.compile(r"[\u0400-\u04ff]+"), "zh": re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")}
_CJK_LANGUAGES = {"zh"}
_CJK = "\u3000-\u303f\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef"
_CJK_GAP = re.compile(f"(?<=[{_CJK}]) (?=[{_CJK}])")
_KANA = re.compile(r"[\u3041-\u3096\u30a1-\u30fa]")  # not the middle dot ・ of Chinese titles


def is_language(text: str, language: str) -> bool:
    """Whether a paragraph is written in `language`: for a language of its own script, most of its words are in
    that script; for one in Latin script, at least two of its words speak for it, and twice as many as speak for
    English (for English: one word, against every other language listed)."""
    script = _SCRIPT.get(language)
    if script is not None:
        own = len(script.findall(text))
        latin = len(_LATIN.findall(text))
        if language == "zh" and _KANA.search(text):
            return False  # Japanese
        return own > 0 and own >= MIN_SCRIPT_SHARE * (own + latin)
    if language not in STOPWORDS:
        raise ValueError(f"no language test for {language!r}")
    words = _WORD.findall(text.lower())
    if not words or len(_LATIN.findall(text)) < 0.9 * len(words):
        return False
    if language == "en":  # English is no translation's fallback: one word of evidence will do
        return all(_wins(words, "en", rival, 1) for rival in STOPWORDS if rival != "en")
    return _wins(words, language, "en", 2)


def _wins(words: list[str], language: str, rival: str, least: int) -> bool:
    own = _evidence(words, language, rival)
    return own >= least and own >= 2 * _evidence(words, rival, language)


def _evidence(words: list[str], language: str, rival: str) -> int:
    """How many of the words speak for `language` rather than `rival`."""
    stopwords = _EXCLUSIVE[language, rival]
    letters = _LETTERS.get(language)
    return sum(word in stopwords or (letters is not None and letters.search(word) is not None) for word in words)


def usable(text: str, language: str) -> bool:
    """Long enough for its script, and mostly letters (not code, a path, an option table or a signature)."""
    if "\ufffd" in text or len(text) < (MIN_CHARACTERS_CJK if language in _CJK_LANGUAGES else MIN_CHARACTERS):
        return False
    visible = len(text) - text.count(" ")  # the text is whitespace-folded
    letters = len(_NOT_LETTER.sub("", text))
    if letters < MIN_LETTER_SHARE * visible:
        return False
    return not _CODE.search(text)


# ---------------------------------------------------------------------------------------------------------------
# The corpus


def _files(base: Path) -> list[Path]:
    """Every plain file below base, in a fixed order (links left out: a package's links repeat its files)."""
    if not base.is_dir():
        return []
    return sorted(path for path in base.rglob("*") if path.is_file() and not path.is_symlink())


def _read(path: Path) -> str:
    data = path.read_bytes()
    if path.name.endswith(".gz"):
        data = gzip.decompress(data)
    return data.decode("utf-8", errors="replace")


def paragraphs(source: Source, root: Path) -> Iterator[str]:
    """Every cleaned paragraph of one unpacked package, in file order, before any filtering."""
    base = root / source.under
    if source.kind == "help":
        for path in _help_files(base):
            yield from help_paragraphs(_read(path))
    elif source.kind == "man":
        for path in _man_files(base):
            yield from (clean(paragraph) for paragraph in man_paragraphs(_read(path)))
    elif source.kind == "fortunes":
        for path in _fortune_files(base):
            yield from cookies(_read(path))
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
        debs = [(_deb(root.parent, source.package), source.package) for source, root in roots[language]]
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
