"""Paraformer's character tokenizer (FunASR's ``CharTokenizer`` on its ``BaseTokenizer``).

Without a ``seg_dict`` a text is split into single characters (spaces dropped). With one,
the text is split on spaces and each word is looked up lower-cased in the dictionary, which
maps English words to their subword pieces (``hel@@ lo``); this is how Paraformer models
with mixed Chinese/English vocabularies were trained.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Iterable, Sequence



class TokenizerError(ValueError):
    """A token list or seg_dict that cannot be used; the message names the file."""


class UnknownTokenError(TokenizerError):
    """``encode(strict=True)`` met tokens missing from the vocabulary."""

    def __init__(self, text: str, unknown: list[str]):
        self.text = text
        self.unknown = unknown
        super().__init__(f"tokens not in the vocabulary: {unknown!r} (text: {text!r})")


def _read_token_list(path: Path) -> list[str]:
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TokenizerError(f"{path}: token list not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path}: cannot read token list ({e})") from None
    if path.suffix == ".json":
        try:
            tokens = json.loads(raw)
        except json.JSONDecodeError as e:
            raise TokenizerError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
            raise TokenizerError(f"{path}: expected a JSON list of strings")
        return tokens
    # one token per line; FunASR strips only trailing whitespace
    return [line.rstrip() for line in raw.splitlines()]


def load_seg_dict(path: str | os.PathLike) -> dict[str, list[str]]:
    """FunASR's seg_dict file: ``word piece1 piece2 ...`` per line (blank lines skipped)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise TokenizerError(f"{path}: seg_dict not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path}: cannot read seg_dict ({e})") from None
    seg_dict = {}
    for line in lines:
        fields = line.split()
        if fields:  # a later entry for the same word wins, as in FunASR
            seg_dict[fields[0]] = fields[1:]
    return seg_dict


# FunASR decides per word whether to split it into characters by its first character only.
_SPLITTABLE_START = re.compile(r"[\u4E00-\u9FA5A-Za-z0-9]")


def seg_tokenize(
    words: Iterable[str],
    seg_dict: dict[str, list[str]],
    unk: str = "<unk>",
    missing: list[str] | None = None,
) -> list[str]:
    """Map words to dictionary pieces: the whole (lower-cased) word if listed, otherwise
    each listed character, ``unk`` for the rest (those words/characters are appended to
    ``missing`` when given)."""
    tokens: list[str] = []
    for word in words:
        word = word.lower()
        if word in seg_dict:
            tokens.extend(seg_dict[word])
        elif _SPLITTABLE_START.match(word):
            for char in word:
                if char in seg_dict:
                    tokens.extend(seg_dict[char])
                else:
                    tokens.append(unk)
                    if missing is not None:
                        missing.append(char)
        else:
            tokens.append(unk)
            if missing is not None:
                missing.append(word)
    return tokens


class CharTokenizer:
    """Text <-> token ids for Paraformer vocabularies (``tokens.json`` / ``tokens.txt``)."""

    def __init__(
        self,
        token_list: str | os.PathLike | Sequence[str],
        unk_symbol: str = "<unk>",
        seg_dict: str | os.PathLike | dict[str, list[str]] | None = None,
        space_symbol: str = "<space>",
    ):
        if isinstance(token_list, (str, os.PathLike)):
            self.source = str(token_list)
            tokens = _read_token_list(Path(token_list))
        else:
            self.source = "token list"
            tokens = list(token_list)
        self.token_list: list[str] = tokens
        self.token2id: dict[str, int] = {}
        for i, t in enumerate(tokens):
            if t in self.token2id:
                raise TokenizerError(
                    f"{self.source}: token {t!r} appears twice (ids {self.token2id[t]} and {i})"
                )
            self.token2id[t] = i
        if unk_symbol not in self.token2id:
            raise TokenizerError(f"{self.source}: unknown symbol {unk_symbol!r} is not in the token list")
        self.unk_symbol = unk_symbol
        self.unk_id = self.token2id[unk_symbol]
        self.space_symbol = space_symbol
        if seg_dict is None or isinstance(seg_dict, dict):
            self.seg_dict = seg_dict
        else:
            self.seg_dict = load_seg_dict(seg_dict)

    @classmethod
    def from_file(cls, path: str | os.PathLike, **kwargs) -> "CharTokenizer":
        return cls(Path(path), **kwargs)

    def __len__(self) -> int:
        return len(self.token_list)

    def __repr__(self) -> str:
        return f"CharTokenizer({self.source!r}, vocab={len(self)}, seg_dict={self.seg_dict is not None})"

    def text2tokens(self, text: str, missing: list[str] | None = None) -> list[str]:
        """Tokens of ``text``; with a seg_dict, words it cannot map go to ``missing``."""
        if self.seg_dict is not None:
            # split on single spaces like FunASR: a double space yields an empty word -> <unk>
            return seg_tokenize(text.strip().split(" "), self.seg_dict, self.unk_symbol, missing)
        return [c for c in text if c != " "]

    def tokens2text(self, tokens: Iterable[str]) -> str:
        return "".join(" " if t == self.space_symbol else t for t in tokens)

    def tokens2ids(self, tokens: Iterable[str]) -> list[int]:
        return [self.token2id.get(t, self.unk_id) for t in tokens]

    def ids2tokens(self, ids: Iterable[int]) -> list[str]:
        if getattr(ids, "ndim", 1) != 1:  # numpy arrays and torch tensors
            raise ValueError(f"ids must be 1-D, got shape {tuple(ids.shape)}")
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        out = []
        for i in ids:
            if not 0 <= i < len(self.token_list):
                raise IndexError(f"token id {i} outside the vocabulary (size {len(self.token_list)})")
            out.append(self.token_list[i])
        return out

    def encode(self, text: str, strict: bool = False) -> list[int]:
        """Token ids of ``text``; unknown tokens become ``<unk>`` unless ``strict``."""
        missing: list[str] = []
        tokens = self.text2tokens(text, missing)
        if strict:
            unknown = missing + [t for t in tokens if t not in self.token2id]
            if unknown:
                raise UnknownTokenError(text, list(dict.fromkeys(unknown)))
        return self.tokens2ids(tokens)

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokens2text(self.ids2tokens(ids))
