"""The INPUT arguments of ``paratune transcribe``: audio files, Kaldi wav.scp lists and
FunASR jsonl lists.

One bad line in a list of thousands should not stop a run, so problems are collected as
``InputError``s next to the utterances that could be read, each naming the file and line.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

# Names that are audio without looking inside. Anything else is sniffed.
AUDIO_SUFFIXES = {".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a", ".aac", ".wma",
                  ".aiff", ".aif", ".au", ".pcm", ".sph", ".webm", ".amr"}


@dataclass(frozen=True)
class Utterance:
    key: str
    source: str  # path of the audio file
    target: str | None  # reference transcript, if the list has one
    origin: str  # where it came from: "list:line", or the audio path itself


class InputError(Exception):
    """A problem with one INPUT or one line of a list; ``str()`` gives "file:line: reason"."""

    def __init__(self, path: str | os.PathLike, line: int | None, reason: str):
        self.path = str(path)
        self.line = line
        self.reason = reason
        where = self.path if line is None else f"{self.path}:{line}"
        super().__init__(f"{where}: {reason}")


@dataclass
class Inputs:
    """Result of ``read_inputs``; unpacks as ``utterances, errors = read_inputs(...)``."""

    utterances: list[Utterance] = field(default_factory=list)
    errors: list[InputError] = field(default_factory=list)

    def __iter__(self) -> Iterator:
        return iter((self.utterances, self.errors))


def _resolve(source: str, list_dir: Path) -> Path | None:
    """The audio path as given if it exists, else relative to the list's folder."""
    p = Path(source)
    if p.exists():
        return p
    if not p.is_absolute() and (list_dir / p).exists():
        return list_dir / p
    return None


def _lines(path: Path, errors: list[InputError]) -> Iterator[tuple[int, str]]:
    """(line number, text) of the non-blank lines; undecodable lines become errors."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                errors.append(InputError(path, number, f"not valid UTF-8 ({e.reason} at byte {e.start})"))
                continue
            if number == 1:
                text = text.removeprefix("\ufeff")  # BOM written by some editors
            text = text.strip()
            if text:
                yield number, text


def _source(value: str, list_path: Path, number: int, errors: list[InputError]) -> str | None:
    if value.endswith("|"):
        errors.append(InputError(list_path, number, f"piped commands are not supported: {value!r}"))
        return None
    if value.startswith(("http://", "https://")):
        errors.append(InputError(list_path, number, f"URLs are not supported: {value!r}"))
        return None
    resolved = _resolve(value, list_path.parent)
    if resolved is None:
        errors.append(InputError(list_path, number, f"audio file not found: {value!r}"))
        return None
    return str(resolved)


def _read_scp(path: Path, errors: list[InputError]) -> list[tuple[Utterance, int]]:
    utts = []
    for number, text in _lines(path, errors):
        fields = text.split()
        if len(fields) != 2:
            errors.append(InputError(
                path, number, f"expected 2 columns 'key path', found {len(fields)}: {text[:80]!r}"
            ))
            continue
        source = _source(fields[1], path, number, errors)
        if source is not None:
            utts.append((Utterance(fields[0], source, None, f"{path}:{number}"), number))
    return utts


def _read_jsonl(path: Path, errors: list[InputError]) -> list[tuple[Utterance, int]]:
    utts = []
    for number, text in _lines(path, errors):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            errors.append(InputError(path, number, f"malformed JSON ({e.msg} at column {e.colno})"))
            continue
        if not isinstance(obj, dict):
            errors.append(InputError(path, number, "expected a JSON object"))
            continue
        bad = [k for k in ("key", "source") if not isinstance(obj.get(k), str) or not obj.get(k)]
        if bad:
            errors.append(InputError(path, number, f"missing or non-string field(s): {', '.join(bad)}"))
            continue
        target = obj.get("target")
        if target is not None and not isinstance(target, str):
            errors.append(InputError(path, number, "field 'target' is not a string"))
            continue
        source = _source(obj["source"], path, number, errors)
        if source is not None:
            # source_len / target_len are only batching hints for FunASR's trainer
            utts.append((Utterance(obj["key"], source, target, f"{path}:{number}"), number))
    return utts


def _list_kind(path: Path) -> str:
    """"audio", "scp" or "jsonl", from the name or else from the first non-blank line."""
    suffix = path.suffix.lower()
    if suffix in AUDIO_SUFFIXES:
        return "audio"
    if suffix == ".scp":
        return "scp"
    if suffix in (".jsonl", ".json"):
        return "jsonl"
    with open(path, "rb") as f:
        head = f.read(4096)
    if b"\0" in head:  # binary: an audio container under an unusual name
        return "audio"
    first = next((line for line in head.splitlines() if line.strip()), b"")
    return "jsonl" if first.lstrip(b"\xef\xbb\xbf \t").startswith(b"{") else "scp"


def read_inputs(paths: Iterable[str | os.PathLike]) -> Inputs:
    """Utterances named by the INPUT arguments, in order, plus the problems found.

    An audio file gives one utterance keyed by its file stem; a wav.scp or jsonl list gives
    one per good line. Relative audio paths in a list that do not exist as given are looked
    up next to the list. A repeated key is reported and the later utterance skipped.
    """
    result = Inputs()
    seen: dict[str, str] = {}
    for arg in paths:
        path = Path(arg)
        if not path.exists():
            result.errors.append(InputError(path, None, "input not found"))
            continue
        if path.is_dir():
            result.errors.append(InputError(path, None, "is a folder, not an audio file or list"))
            continue
        n_errors = len(result.errors)
        try:
            kind = _list_kind(path)
            if kind == "audio":
                utts = [(Utterance(path.stem, str(path), None, str(path)), None)]
            elif kind == "scp":
                utts = _read_scp(path, result.errors)
            else:
                utts = _read_jsonl(path, result.errors)
        except OSError as e:
            result.errors.append(InputError(path, None, f"cannot read ({e.strerror or e})"))
            continue
        if not utts and len(result.errors) == n_errors:
            # say so, or an empty list would make a run that silently does nothing
            result.errors.append(InputError(path, None, f"empty {kind} list: no utterances"))
        for utt, line in utts:
            if utt.key in seen:
                result.errors.append(InputError(
                    path, line, f"duplicate key {utt.key!r} (first at {seen[utt.key]}); skipped"
                ))
                continue
            seen[utt.key] = utt.origin
            result.utterances.append(utt)
    return result
