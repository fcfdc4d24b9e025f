"""Turning decoded Paraformer tokens into the sentence FunASR prints.

This must give FunASR's exact text (funasr/utils/postprocess_utils.py, ``sentence_postprocess``,
without timestamps and with them) so that scores computed on paratune output are comparable with
FunASR's. FunASR's rules have quirks that are kept on purpose and marked
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


def abbr_dispose(words: list[str], stamps: list | None = None):
    """Merge single letters separated by single spaces ("a", " ", "b", " ", "c") into one
    upper-case word ("ABC"); everything else passes through.

    With `stamps` (one [start, end] per word that is not " ", in order) returns (words, stamps):
    an abbreviation spans from its first letter's start to its last letter's end. As in FunASR, a
    word whose stamp is missing (fewer stamps than words) gets none; quirk: an abbreviation whose
    first letter has none raises IndexError.
    """
    # index into stamps of each word: spaces carry no stamp
    stamp_of, seen = [], 0
    for w in words:
        stamp_of.append(seen)
        seen += w != " "
    out: list[str] = []
    out_stamps: list[list] = []
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
            if stamps is not None:
                begin = stamps[stamp_of[i]][0]
                if stamp_of[end] < len(stamps):
                    out_stamps.append([begin, stamps[stamp_of[end]][1]])
            i = end + 1
        else:
            out.append(words[i])
            if stamps is not None and words[i] != " " and stamp_of[i] < len(stamps):
                out_stamps.append([stamps[stamp_of[i]][0], stamps[stamp_of[i]][1]])
            i += 1
    return out if stamps is None else (out, out_stamps)


def _words(tokens: list[str | bytes], stamps: list | None = None) -> tuple[list[str], list]:
    """FunASR's word list before abbreviations: Chinese characters, English words each followed by
    " ", ``xx@@`` pieces glued to the next piece; ``<s> </s> <unk> <OOV>`` dropped. With `stamps`
    (one [start, end] per token left after the drop) also the words' stamps: a word made of pieces
    spans from its first piece's start to its last piece's end."""
    words = [t.decode("utf-8") if isinstance(t, bytes) else t for t in tokens]
    words = [w for w in words if w not in _DROPPED]

    if _all_chinese(words):
        return [w.replace(" ", "") for w in words], stamps  # one stamp per token, as given
    out: list[str] = []
    out_stamps: list[list] = []
    if _all_alpha(words):
        # (no "@@" piece can get here: "ab@@" is not all letters)
        for i, w in enumerate(words):
            out += [w, " "]
            if stamps is not None:
                out_stamps.append([stamps[i][0], stamps[i][1]])
        return out, out_stamps

    pending = ""  # pieces of an English word ending in "@@", waiting for its last piece
    after_word = False  # out ends with the " " that follows an English word
    in_pieces = False  # the stamp being built started at an earlier "xx@@" piece
    begin = end = None
    for i, w in enumerate(words):
        # quirk: the stamp is read before looking at the token, so a missing one raises even
        # for punctuation, which gets none
        if stamps is not None and not in_pieces:
            begin, end = stamps[i][0], stamps[i][1]
        if _all_chinese(w):  # per character; quirk: "1@@" counts as Chinese and keeps "@@"
            if after_word:
                out.pop()  # no space between an English word and a Chinese character
            out.append(w)
            after_word = False
            # quirk: after "xx@@" pieces this is the pieces' span, not the character's
            out_stamps.append([begin, end])
            in_pieces = False
        elif "@@" in w:
            pending += w.replace("@@", "")
            after_word = False
            if stamps is not None:
                end = stamps[i][1]
            in_pieces = True
        elif _all_alpha(w):
            out += [pending + w, " "]
            pending = ""
            after_word = True
            if stamps is not None:
                end = stamps[i][1]
            out_stamps.append([begin, end])
            in_pieces = False
        else:
            # quirk: punctuation etc. gets no stamp, neither flushes ``pending`` nor resets
            # ``after_word`` (nor ends a word of pieces)
            out.append(w)
    # quirk: a trailing "xx@@" piece with no final piece is dropped
    return out, out_stamps


def sentence_postprocess(tokens: list[str | bytes]) -> str:
    """FunASR's sentence for decoded tokens: Chinese characters joined without spaces,
    English words separated by spaces, ``xx@@`` pieces glued to the next piece, spelled-out
    letters merged into abbreviations, ``<s> </s> <unk> <OOV>`` dropped."""
    return "".join(abbr_dispose(_words(tokens)[0])).strip()


def sentence_postprocess_with_timestamps(tokens: list[str | bytes], timestamps: list) -> tuple[str, list]:
    """FunASR's `sentence_postprocess(tokens, timestamps)` (its first two results): the words
    joined with single spaces (so Chinese characters come out space-separated), and one
    [start, end] per word. `timestamps`: one per token left after ``<s> </s> <unk> <OOV>`` are
    dropped (`paratune.model.timestamps.token_timestamps` of the tokens).

    FunASR's quirks are kept: a word made of ``xx@@`` pieces or an abbreviation gets one stamp
    from its first token's start to its last token's end; punctuation gets none, which shifts the
    stamps of the words after it; with fewer stamps than tokens, all-Chinese tokens get the stamps
    there are, other tokens mostly raise IndexError (FunASR reads a stamp per token).
    """
    words, stamps = _words(tokens, timestamps)
    words, stamps = abbr_dispose(words, stamps)
    return " ".join(w for w in words if w != " ").strip(), stamps
