"""The one reader of utterance lists: FunASR jsonl, Kaldi data folders (wav.scp + text), a bare wav.scp,
a folder of audio with a transcript TSV (`name<TAB>text`), and single audio files.

Every command (transcribe, prepare, plan, finetune, eval) reads its inputs here and says what it needs:
`need_audio` (each utterance names an audio file that exists) and `targets` ("optional", "paired": a
transcript wherever the input lists transcripts, "required": a transcript or a `target_len`). One bad
line in thousands should not stop a run, so problems are collected as ``InputError``s naming file:line.
"""
from __future__ import annotations

import json
import math
import os
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

# Names that are audio without looking inside. Anything else is sniffed.
AUDIO_SUFFIXES = {".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a", ".aac", ".wma",
                  ".aiff", ".aif", ".au", ".pcm", ".sph", ".webm", ".amr"}
TARGETS = ("optional", "paired", "required")


class InputError(Exception):
    """A problem with one input or one line of a list; ``str()`` gives "file:line: reason".

    ``kind`` names the problem for counting (prepare's report uses the same names); "input" is a whole
    argument that cannot be used (not found, unreadable, empty)."""

    def __init__(self, path: str | os.PathLike, line: int | None, reason: str, kind: str = "bad_line",
                 key: str = ""):
        self.path = str(path)
        self.key = key  # the utterance's key where it is known
        self.line = line
        self.reason = reason
        self.kind = kind
        where = self.path if line is None else f"{self.path}:{line}"
        super().__init__(f"{where}: {reason}")


@dataclass(frozen=True)
class Record:
    """One utterance as its list writes it."""

    key: str
    source: str  # the audio path as written ("" if none), resolved where the reader checked it (need_audio)
    target: str | None  # reference transcript, if the list has one
    file: str  # the list (or the audio file itself)
    line: int | None = None  # None for an audio file given directly
    source_len: int | None = None  # 10 ms frames, FunASR's batching hint
    target_len: int | None = None

    @property
    def origin(self) -> str:
        return self.file if self.line is None else f"{self.file}:{self.line}"

    @property
    def audio(self) -> Path:
        """The audio file (a stat: only where it is about to be opened)."""
        return resolve_source(self.source, Path(self.file).parent)

    def error(self, reason: str, kind: str = "bad_line") -> InputError:
        return InputError(self.file, self.line, reason, kind, self.key)


@dataclass
class Manifest:
    """Result of ``read_manifests``; unpacks as ``records, errors = read_manifests(...)``."""

    records: list[Record] = field(default_factory=list)
    errors: list[InputError] = field(default_factory=list)

    def __iter__(self) -> Iterator:
        return iter((self.records, self.errors))


@dataclass
class Lengths:
    """One column per field, row i is the manifest's i-th usable line (made by lengths.read_lengths)."""

    keys: list[str]
    frames: np.ndarray  # T: model input frames after LFR
    tokens: np.ndarray  # U: target tokens
    seconds: np.ndarray
    origins: list[str]  # "file:line"
    sources: list[str]  # audio paths as the manifest writes them ("" if none)
    list_dirs: list[str]  # each line's manifest folder, which relative sources may be relative to
    targets: list[str | None]  # transcripts (None where the line has only target_len)

    def source(self, i: int) -> Path:
        """Utterance i's audio file (a stat: only where the file is about to be opened)."""
        return resolve_source(self.sources[i], Path(self.list_dirs[i]))

    def __len__(self) -> int:
        return len(self.keys)


def resolve_source(source: str, list_dir: Path) -> Path:
    """The path as given if it exists (or is absolute), else relative to the list's folder."""
    p = Path(source)
    return p if p.is_absolute() or p.exists() else list_dir / p


def control_char(text: str) -> str | None:
    """The first control, line-separator or lone surrogate character in `text`, if any: a key holding one
    could split or forge a `key<TAB>text` output line, or fail to print at all."""
    for c in text:
        if unicodedata.category(c) in ("Cc", "Zl", "Zp", "Cs"):
            return c
    return None


def output_line(key: str, text: str) -> str:
    """`key<TAB>text` that stays one line with two fields whatever the text holds."""
    if control_char(key) is not None:
        raise ValueError(f"key {key!r} has a control character")
    return f"{key}\t" + "".join(" " if control_char(c) else c for c in text)


# -- lines and fields ----------------------------------------------------------------------------------

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


def _length_field(obj: dict, name: str) -> int | None:
    value = obj.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < 0 or value != int(value):
        raise ValueError(f"{name} must be a non-negative whole number, got {value!r}")
    return int(value)


def _jsonl_record(path: Path, number: int, text: str) -> Record:
    """One jsonl line; ValueError says what is wrong with it."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"malformed JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise ValueError("expected a JSON object")
    if not isinstance(obj.get("key"), str) or not obj["key"]:
        raise ValueError("missing or non-string field: key")
    source = obj.get("source")
    if source is not None and not isinstance(source, str):
        raise ValueError("field 'source' is not a string")
    target = obj.get("target")
    if target is not None and not isinstance(target, str):
        raise ValueError("field 'target' is not a string")
    for name in ("source", "target"):
        if any(unicodedata.category(c) == "Cs" for c in obj.get(name) or ""):  # "\ud800" in JSON: no UTF-8 for it
            raise ValueError(f"field {name!r} holds a lone surrogate (not valid Unicode)")
    return Record(obj["key"], source or "", target, str(path), number,
                  _length_field(obj, "source_len"), _length_field(obj, "target_len"))


def _read_jsonl(path: Path, errors: list[InputError]) -> list[Record]:
    records = []
    for number, text in _lines(path, errors):
        try:
            records.append(_jsonl_record(path, number, text))
        except ValueError as e:
            errors.append(InputError(path, number, str(e)))
    return records


def _read_table(path: Path, errors: list[InputError], what: str) -> dict[str, tuple[str, int]]:
    """`key<space or tab>rest of line` per line (wav.scp, Kaldi text, transcript TSV) -> {key: (rest, line)}."""
    out: dict[str, tuple[str, int]] = {}
    for number, text in _lines(path, errors):
        # a tab ends the key where there is one (TSV names may hold spaces), else any whitespace
        key, rest = text.split("\t", 1) if "\t" in text else (text.split(None, 1) + [""])[:2]
        if key in out:
            errors.append(InputError(path, number, f"duplicate key {key!r} in the {what} (first at {path}:"
                                                   f"{out[key][1]}); skipped", "duplicate_key", key))
            continue
        out[key] = (rest.strip(), number)
    return out


# -- inputs --------------------------------------------------------------------------------------------

def _pair(audio: dict[str, tuple[str, Path, int | None]], texts: dict[str, tuple[str, int]] | None,
          text_path: Path | None, targets: str, errors: list[InputError]) -> list[Record]:
    """Records from {key: (source, list, line)} and transcripts {key: (text, line)}; the unmatched on
    either side are errors unless transcripts are optional."""
    records = []
    for key, (source, where, line) in audio.items():
        target = texts[key][0] if texts is not None and key in texts else None
        if target is None and texts is not None and targets != "optional":
            errors.append(InputError(where, line, f"no transcript for key {key!r} in {text_path}", "no_transcript",
                                     key))
            continue
        records.append(Record(key, source, target, str(where), line))
    if texts is not None and targets != "optional":
        for key in texts.keys() - audio.keys():
            errors.append(InputError(text_path, texts[key][1], f"transcript without audio: key {key!r}", "no_audio",
                                     key))
    return records


def _read_scp(scp: Path, targets: str, errors: list[InputError]) -> list[Record]:
    """A wav.scp, with the Kaldi `text` beside it where there is one."""
    wavs = _read_table(scp, errors, "wav.scp")
    for key, (source, number) in list(wavs.items()):
        if not source:
            errors.append(InputError(scp, number, f"expected 'key path', found only a key: {key!r}"))
            del wavs[key]
    text_path = scp.parent / "text"
    texts = _read_table(text_path, errors, "text") if scp.name == "wav.scp" and text_path.is_file() else None
    return _pair({k: (s, scp, n) for k, (s, n) in wavs.items()}, texts, text_path, targets, errors)


def _read_folder(folder: Path, transcripts: Path | None, targets: str, errors: list[InputError]) -> list[Record]:
    """Audio files under `folder`, keyed by stem; a TSV line may name a file by name, stem or relative path."""
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file())
    texts = _read_table(transcripts, errors, "transcript TSV") if transcripts is not None else None
    audio: dict[str, tuple[str, Path, int | None]] = {}
    matched: dict[str, tuple[str, int]] = {}
    for p in files:
        if p.stem in audio:
            errors.append(InputError(p, None, f"duplicate key {p.stem!r} (first at {audio[p.stem][1]}); skipped",
                                     "duplicate_key", p.stem))
            continue
        audio[p.stem] = (str(p), p, None)
        name = next((n for n in (p.name, p.stem, str(p.relative_to(folder))) if texts and n in texts), None)
        if name is not None:
            matched[p.stem] = texts.pop(name)
    if texts is not None and targets != "optional":
        for name, (_, number) in texts.items():
            errors.append(InputError(transcripts, number, f"no audio file named {name!r} in {folder}", "no_audio",
                                     name))
    return _pair(audio, matched if texts is not None else None, transcripts, targets, errors)


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


def _read_one(path: Path, transcripts: Path | None, targets: str, errors: list[InputError]) -> list[Record]:
    if path.is_dir():
        if (path / "wav.scp").is_file():
            return _read_scp(path / "wav.scp", targets, errors)
        return _read_folder(path, transcripts, targets, errors)
    kind = _list_kind(path)
    if kind == "audio":
        return [Record(path.stem, str(path), None, str(path))]
    return _read_scp(path, targets, errors) if kind == "scp" else _read_jsonl(path, errors)


def _check(record: Record, need_audio: bool, targets: str) -> InputError | None:
    """What makes a record unusable for the caller, before any file is opened."""
    bad = control_char(record.key)
    if bad is not None:
        return record.error(f"key {record.key!r} holds a control character ({bad!r}): it would break output lines")
    src = record.source
    if src.endswith("|"):
        return record.error(f"piped commands are not supported: {src!r}")
    if src.startswith(("http://", "https://")):
        return record.error(f"URLs are not supported: {src!r}")
    if need_audio and not src:
        return record.error("no 'source': this command needs the audio", "no_audio")
    if not src and record.source_len is None:
        return record.error("no 'source_len' and no 'source' audio to measure", "no_audio")
    if targets == "required" and record.target is None and record.target_len is None:
        return record.error("no transcript: neither 'target' nor 'target_len'", "no_transcript")
    return None


def _resolve_audio(records: list[Record], errors: list[InputError], workers: int) -> list[Record]:
    """The records whose audio file exists, each with `source` resolved to it."""
    def find(r: Record) -> Path | None:
        path = r.audio
        return path if path.is_file() else None
    with ThreadPoolExecutor(workers) as pool:  # stats are small reads: threads hide the latency
        found = list(pool.map(find, records))
    for r, path in zip(records, found):
        if path is None:
            errors.append(r.error(f"audio file not found: {r.source!r}", "missing_audio"))
    return [replace(r, source=str(path)) for r, path in zip(records, found) if path is not None]


def read_manifests(paths: Iterable[str | os.PathLike], need_audio: bool = False, targets: str = "optional",
                   transcripts: str | os.PathLike | None = None, workers: int = 16,
                   find_audio: bool | None = None) -> Manifest:
    """Records of every input in order, plus the problems found (each naming file:line).

    A repeated key is reported and the later record skipped. With `need_audio` each record must name its
    audio; `find_audio` (default: `need_audio`) also looks for each file here, in parallel, and resolves
    `source` to it (training leaves that to load time, where a clip that cannot be read is left out
    with a ledger entry). `transcripts` is the TSV for folders of audio.
    """
    assert targets in TARGETS, targets
    result = Manifest()
    seen: dict[str, str] = {}
    tsv = Path(transcripts) if transcripts else None
    for path in map(Path, paths):
        if not path.exists():
            result.errors.append(InputError(path, None, "not found", "input"))
            continue
        errors: list[InputError] = []
        try:
            records = _read_one(path, tsv, targets, errors)
        except OSError as e:
            result.errors.append(InputError(path, None, f"cannot read ({e.strerror or e})", "input"))
            continue
        if not records and not errors:
            # say so, or an empty list would make a run that silently does nothing
            errors.append(InputError(path, None, "empty manifest: no utterances", "input"))
        result.errors += errors
        for r in records:
            problem = _check(r, need_audio, targets)
            if problem is None and r.key in seen:
                problem = r.error(f"duplicate key {r.key!r} (first at {seen[r.key]}); skipped", "duplicate_key")
            if problem is not None:
                result.errors.append(problem)
                continue
            seen[r.key] = r.origin
            result.records.append(r)
    if (need_audio if find_audio is None else find_audio) and result.records:
        result.records = _resolve_audio(result.records, result.errors, workers)
    # found in several passes: list them by file, then line, as a person reads the lists
    files = {e.path: i for i, e in reversed(list(enumerate(result.errors)))}
    result.errors.sort(key=lambda e: (files[e.path], e.line or 0))
    return result

