"""Hotwords for SeACo-Paraformer: sampled from the transcripts in training, read from the user for decoding.

Training (FunASR's `AudioDatasetHotword`): each utterance gets zero, one or two spans of its own target
(`sample_spans`, FunASR's `generate_index` with its defaults); a batch's hotwords are every utterance's
spans plus a last `[sos]` entry, shared by the whole batch, and the SeACo label of a target token is the
token itself inside a span and `no_bias` elsewhere (`hotword_tensors`, FunASR's collator). The spans are
kept in the batch ("hotword_spans"): a batch split after an OOM rebuilds each half's hotwords from them.

Decoding (FunASR's `SeacoParaformer.generate_hotwords_list`): `read_hotwords` takes a string (one
hotword per whitespace-separated word) and/or a file (one hotword per line, its whitespace-separated
pieces its tokens). With the model directory's seg_dict, the tokens are looked up as FunASR's
`seg_tokenize` does; without one, each piece is one token (a multi-character word that is not in the
vocabulary is `<unk>`, as in FunASR). Differences from FunASR: a file is read whatever its name (FunASR
reads a path only if it ends in `.txt`, otherwise it takes the path itself as the hotwords), blank lines
are skipped (FunASR makes an empty hotword of them), and the trailing `[sos]` entry is the model's to add.
"""
from __future__ import annotations

import os
import random
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.utils.rnn import pad_sequence

NO_SPAN = [-1]


class HotwordError(ValueError):
    """Hotwords that cannot be used: the message names the file (or `--hotword`) and line."""


@dataclass(frozen=True, kw_only=True)
class HotwordSampling:
    """FunASR's training-time hotword sampling; `no_bias` is the model's NO_BIAS label, `sos` its start id."""

    no_bias: int
    min_length: int = 2
    max_length: int = 8
    sample_rate: float = 0.75  # the share of utterances that get a hotword
    double_rate: float = 0.1  # of those, the share that get two (when long enough)
    sos: int = 1

    def __post_init__(self):
        if not 1 <= self.min_length <= self.max_length:
            raise ValueError(f"hotword lengths: expected 1 <= min_length <= max_length, got {self.min_length} "
                             f"and {self.max_length}")


# the dataset_conf key of each HotwordSampling field the configuration sets
CONFIG_KEYS = {"min_length": "hotword_min_length", "max_length": "hotword_max_length",
               "sample_rate": "hotword_sample_rate", "double_rate": "hotword_double_rate"}


def hotword_sampling(dataset_conf: dict, no_bias: int | None) -> HotwordSampling | None:
    """The sampling `dataset_conf` asks for, for a model with this NO_BIAS id (None: not a SeACo model, no
    hotwords; the values are checked all the same, so that a bad one is refused before anything runs)."""
    from paratune.train.config import ConfigError
    values = {name: dataset_conf[key] for name, key in CONFIG_KEYS.items()}
    if values["min_length"] > values["max_length"]:
        raise ConfigError(f"dataset_conf.hotword_max_length: expected >= hotword_min_length "
                          f"({values['min_length']}), got {values['max_length']}")
    return None if no_bias is None else HotwordSampling(no_bias=int(no_bias), **values)


def sample_spans(length: int, rng: random.Random, sampling: HotwordSampling) -> list[int]:
    """[-1] (no hotword), [start, end] or [start1, end1, start2, end2] (inclusive token positions) in a
    target of `length` tokens: FunASR's `generate_index`, the same draws from `rng` in the same order."""
    lo, hi = sampling.min_length, sampling.max_length
    if length < lo or not rng.random() < sampling.sample_rate:
        return list(NO_SPAN)
    if length == lo:
        return [0, length - 1]
    # the draw comes first: FunASR draws it whatever the length
    if rng.random() < sampling.double_rate and length > hi + lo + 2:
        longest = min(hi, length // 2)
        start1 = rng.randint(0, length // 3)
        end1 = rng.randint(start1 + lo - 1, start1 + longest - 1)
        start2 = rng.randint(end1 + 1, length - lo)
        end2 = rng.randint(min(length - 1, start2 + lo - 1), min(length - 1, start2 + hi - 1))
        return [start1, end1, start2, end2]
    start = rng.randint(0, length - lo)
    end = rng.randint(min(length - 1, start + lo - 1), min(length - 1, start + hi - 1))
    return [start, end]


def span_rng(seed: int, epoch: int, index: int) -> random.Random:
    """The generator of utterance `index`'s spans: the same in any worker and after a resume."""
    return random.Random(f"hotwords {seed} {epoch} {index}")


def hotword_tensors(text: torch.Tensor, text_lengths: torch.Tensor, spans: list[list[int]], sos: int,
                    no_bias: int) -> dict:
    """FunASR's collator: `hotword_pad` (N + 1, longest) padded with 0, its last row [sos];
    `hotword_lengths` (N + 1,) int32; `seaco_label_pad` (B, text width): -1 on padding, the token inside
    a span, `no_bias` elsewhere. `text` is (B, width), `spans` one `sample_spans` list per row."""
    words, labels = [], torch.full_like(text, -1)
    for row, (span, n) in enumerate(zip(spans, text_lengths.tolist())):
        labels[row, :n] = no_bias
        for start, end in zip(span[0::2], span[1::2]):
            if start == -1:
                break
            words.append(text[row, start:end + 1])
            labels[row, start:end + 1] = text[row, start:end + 1]
    words.append(torch.tensor([sos], dtype=text.dtype))
    return {"hotword_pad": pad_sequence(words, batch_first=True, padding_value=0),
            "hotword_lengths": torch.tensor([len(w) for w in words], dtype=torch.int32), "seaco_label_pad": labels}


def with_hotwords(batch: dict, spans: list[list[int]], sampling: HotwordSampling) -> dict:
    """`batch` (its "text" and "text_lengths" set) with these rows' spans and the hotword tensors they make."""
    tensors = hotword_tensors(batch["text"], batch["text_lengths"], spans, sampling.sos, sampling.no_bias)
    return {**batch, "hotword_spans": [list(s) for s in spans], "hotwords": sampling, **tensors}


# -- decoding

_SPLIT_BY_CHAR = re.compile(r"^[\u4E00-\u9FA50-9]+$")  # FunASR's hotword seg_tokenize: the whole word


def seg_tokenize(pieces: list[str], seg_dict: dict[str, list[str]], unk: str = "<unk>") -> list[str]:
    """FunASR's hotword `seg_tokenize`: a lower-cased piece in the seg_dict gives its entry; a piece of
    Chinese characters and digits, each character's entry (or unk); anything else, unk. (Transcripts'
    seg_tokenize in paratune.data.tokenizer looks at a word's first character only.)"""
    out = []
    for piece in pieces:
        piece = piece.lower()
        if piece in seg_dict:
            out += seg_dict[piece]
        elif _SPLIT_BY_CHAR.match(piece):
            out += [t for char in piece for t in seg_dict.get(char, [unk])]
        else:
            out.append(unk)
    return out


def hotword_ids(words: list[str], tokenizer) -> list[list[int]]:
    """Token ids of each hotword; a hotword's whitespace-separated pieces are its tokens (through the
    tokenizer's seg_dict when it has one). No trailing [sos]: the model adds it."""
    out = []
    for word in words:
        pieces = word.split()
        if tokenizer.seg_dict is not None:
            pieces = seg_tokenize(pieces, tokenizer.seg_dict, tokenizer.unk_symbol)
        out.append(tokenizer.tokens2ids(pieces))
    return out


def _control(text: str) -> str | None:
    bad = [c for c in text if unicodedata.category(c) == "Cc" and c not in " \t"]
    return None if not bad else ", ".join(dict.fromkeys(f"U+{ord(c):04X}" for c in bad))


def _read_lines(file: str | os.PathLike) -> list[str]:
    path = Path(file)
    try:
        raw = path.read_text(encoding="utf-8-sig")  # a BOM is not part of the first hotword
    except FileNotFoundError:
        raise HotwordError(f"hotword file {path}: not found") from None
    except IsADirectoryError:
        raise HotwordError(f"hotword file {path}: is a folder, not a file") from None
    except UnicodeDecodeError as e:
        raise HotwordError(f"hotword file {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise HotwordError(f"hotword file {path}: cannot read it ({e.strerror or e})") from None
    words = []
    for number, line in enumerate(raw.split("\n"), 1):
        line = line.strip()
        bad = _control(line)
        if bad:
            raise HotwordError(f"hotword file {path}, line {number}: control character(s) {bad} in {line!r}")
        if line:
            words.append(line)
    if not words:
        raise HotwordError(f"hotword file {path}: no hotword in it (empty, or blank lines only)")
    return words


def read_hotwords(text: str | None, file: str | os.PathLike | None, tokenizer) -> list[list[int]] | None:
    """The hotwords of `text` (one per whitespace-separated word) and then of `file` (one per non-blank
    line, any file name), as token ids; None when neither is given. Raises HotwordError."""
    if text is None and file is None:
        return None
    words = []
    if text is not None:
        bad = _control(text.replace("\n", " "))
        if bad:
            raise HotwordError(f"--hotword: control character(s) {bad} in {text!r}")
        words = text.split()
        if not words:
            raise HotwordError("--hotword: no hotword in it (empty or blank)")
    if file is not None:
        words += _read_lines(file)
    return hotword_ids(words, tokenizer)

