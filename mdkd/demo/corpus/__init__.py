"""Real multilingual running text for the demo, offline, from Debian's packages.

Each language's packages (LibreOffice's help, the translated manual pages, the fortune cookies) are fetched and
unpacked (`fetch`). Their text is cut into paragraphs: HTML help pages by block elements, text hidden from the
reader left out (`help_pages`); manual pages by a small roff reader, macros, escapes, tables, examples and option
tags left out (`manpages`); cookies at their `%` lines (`fortunes`). Every paragraph is whitespace-folded onto one
line (`text`), dropped when it is short or looks like code, and dropped when it is not in its package's language
(`language`): translations fall back to the English original for whatever is untranslated, and that English must
not pass for German or Russian. What is left is deduplicated (within a language and across languages) and sampled
deterministically into one file per language (`assemble`): the same packages give the same files.
"""
