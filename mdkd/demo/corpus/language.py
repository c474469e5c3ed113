"""The language filter: whether a paragraph is usable running text, and whether it is in its package's language.

Translations fall back to the English original for whatever is untranslated, and that English must not pass for
German or Russian: a language of its own script is told by its share of words in that script, one in Latin script
by its function words and letters against English's.
"""

from __future__ import annotations

import re

# Paragraphs shorter than this are mostly headings, menu paths, signatures and option tags. Chinese carries about
# 2.5 times as much per character.
MIN_CHARACTERS = 40
MIN_CHARACTERS_CJK = 16
# Below this share of letters (among the characters that are not spaces) a paragraph is code, a path or a table.
MIN_LETTER_SHARE = 0.6
# A paragraph in a language of its own script must hold at least this share of its words in that script (a Chinese
# character counts as one word, as does a run of Latin letters).
MIN_SCRIPT_SHARE = 0.5


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
_CODE = re.compile(r"[{};<>=|$#@\\]{2,}")
# The languages with a script of their own: a Cyrillic word, or one Chinese character.
_SCRIPT = {"ru": re.compile(r"[\u0400-\u04ff]+"), "zh": re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")}
_CJK_LANGUAGES = {"zh"}
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
