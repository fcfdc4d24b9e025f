"""Turning decoded Paraformer tokens into the sentence FunASR prints.

This must give FunASR's exact text (funasr/utils/postprocess_utils.py,
``sentence_postprocess`` without timestamps) so that scores computed on paratune output are
comparable with FunASR's. FunASR's rules have quirks that are kept on purpose and marked
"quirk" below.
"""
from __future__ import annotations

from typing import Iterable

_DROPPED = ("<s>", "</s>", "<unk>", "<OOV>")


def _is_chinese(s: str) -> bool:
    # quirk: FunASR compares whole strings, so for several characters this is a
    # lexicographic test on the first ones ("1a" and "中a" count as Chinese, "@@" does not).
    return "\u4e00" <= s <= "\u9fff" or "0" <= s <= "9" or s == "@"


def _strip_specials(s: str) -> str:
    for special in (" ", "</s>", "<s>", "<unk>", "<OOV>"):
        s = s.replace(special, "")
    return s


def _all_chinese(items: Iterable[str]) -> bool:
    """Every item (token, or character of a token) passes ``_is_chinese``; False if none."""
    items = [_strip_specials(i) for i in items]
    return bool(items) and all(_is_chinese(i) for i in items)


def _all_alpha(items: Iterable[str]) -> bool:
    """Every item is letters (but not Chinese) or an apostrophe; False if none."""
    items = [_strip_specials(i) for i in items]
    return bool(items) and all(
        i == "'" or (i.isalpha() and not _is_chinese(i)) for i in items
    )


def _is_ascii_letter(s: str) -> bool:
    return len(s) == 1 and s.isascii() and s.isalpha()


def abbr_dispose(words: list[str]) -> list[str]:
    """Merge single letters separated by single spaces ("a", " ", "b", " ", "c") into one
    upper-case word ("ABC"); everything else passes through."""
    out: list[str] = []
    i, n = 0, len(words)
    while i < n:
        # a run needs at least two letters: letter, " ", letter (, " ", letter)*
        end = i
        while (
            _is_ascii_letter(words[end])
            and end + 2 < n
            and words[end + 1] == " "
            and _is_ascii_letter(words[end + 2])
        ):
            end += 2
        if end > i:
            out.append("".join(words[k].upper() for k in range(i, end + 1, 2)))
            i = end + 1
        else:
            out.append(words[i])
            i += 1
    return out


def sentence_postprocess(tokens: list[str | bytes]) -> str:
    """FunASR's sentence for decoded tokens: Chinese characters joined without spaces,
    English words separated by spaces, ``xx@@`` pieces glued to the next piece, spelled-out
    letters merged into abbreviations, ``<s> </s> <unk> <OOV>`` dropped."""
    words = [t.decode("utf-8") if isinstance(t, bytes) else t for t in tokens]
    words = [w for w in words if w not in _DROPPED]

    out: list[str] = []
    if _all_chinese(words):
        out = [w.replace(" ", "") for w in words]
    elif _all_alpha(words):
        # (no "@@" piece can get here: "ab@@" is not all letters)
        for w in words:
            out += [w, " "]
    else:
        pending = ""  # pieces of an English word ending in "@@", waiting for its last piece
        after_word = False  # out ends with the " " that follows an English word
        for w in words:
            if _all_chinese(w):  # per character; quirk: "1@@" counts as Chinese and keeps "@@"
                if after_word:
                    out.pop()  # no space between an English word and a Chinese character
                out.append(w)
                after_word = False
            elif "@@" in w:
                pending += w.replace("@@", "")
                after_word = False
            elif _all_alpha(w):
                out += [pending + w, " "]
                pending = ""
                after_word = True
            else:
                # quirk: punctuation etc. neither flushes ``pending`` nor resets ``after_word``
                out.append(w)
        # quirk: a trailing "xx@@" piece with no final piece is dropped

    return "".join(abbr_dispose(out)).strip()
