"""Training manifests and the lengths batching needs: T input frames (after LFR) and U target tokens.

A FunASR jsonl line is `{"key", "source", "target", "source_len", "target_len"}`. FunASR's own
`scp2jsonl` writes `source_len` as 10 ms frames (duration x 100) and `target_len` as characters (or
words when the text has spaces). When `source_len` is present no audio is opened; otherwise the
duration comes from the audio file's header, never from decoding it. U is counted with the model's
tokenizer when the line has its transcript, which is exact; `target_len` is used only without one.
"""
from __future__ import annotations

import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from paratune.data.audio import AudioError, audio_info
from paratune.data.inputs import InputError, _lines
from paratune.data.tokenizer import CharTokenizer


@dataclass
class Lengths:
    """One column per field, row i is the manifest's i-th usable line."""

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
    """The path as given if it exists (or is absolute), else relative to the manifest's folder."""
    p = Path(source)
    return p if p.is_absolute() or p.exists() else list_dir / p


def _int_field(obj: dict, name: str, path: Path, number: int, errors: list) -> int | None:
    value = obj.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or value != int(value):
        errors.append(InputError(path, number, f"{name} must be a non-negative whole number, got {value!r}"))
        return -1
    return int(value)


def lfr_frames(frames10, lfr_n: int, frame_shift_ms: float = 10.0, frame_length_ms: float = 25.0):
    """Model input frames for `frames10` 10 ms frames (int or array): fbank frames are
    1 + (samples - window) // shift, then LFR keeps ceil(frames / lfr_n)."""
    window = max(0, math.ceil(frame_length_ms / frame_shift_ms) - 1)
    return -(-np.maximum(np.asarray(frames10) - window, 1) // lfr_n)


def read_lengths(paths, tokenizer: CharTokenizer, lfr_n: int, frame_shift_ms: float = 10.0,
                 frame_length_ms: float = 25.0, workers: int = 16) -> tuple[Lengths, list[InputError]]:
    """Lengths of every line of the jsonl manifests `paths`; bad lines become errors naming file:line."""
    keys, frames10, tokens, origins, sources, list_dirs, targets, need_audio = [], [], [], [], [], [], [], []
    errors: list[InputError] = []
    seen: dict[str, str] = {}
    for path in map(Path, paths):
        if not path.is_file():
            errors.append(InputError(path, None, "manifest not found" if not path.exists() else "not a file"))
            continue
        before = len(keys)
        for number, text in _lines(path, errors):
            origin = f"{path}:{number}"
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                errors.append(InputError(path, number, f"malformed JSON ({e.msg} at column {e.colno})"))
                continue
            if not isinstance(obj, dict) or not isinstance(obj.get("key"), str) or not obj["key"]:
                errors.append(InputError(path, number, "expected a JSON object with a string 'key'"))
                continue
            key = obj["key"]
            if key in seen:
                errors.append(InputError(path, number, f"duplicate key {key!r} (first at {seen[key]}); skipped"))
                continue
            source_len = _int_field(obj, "source_len", path, number, errors)
            target_len = _int_field(obj, "target_len", path, number, errors)
            if source_len == -1 or target_len == -1:
                continue
            target = obj.get("target")
            if target is not None and not isinstance(target, str):
                errors.append(InputError(path, number, "field 'target' is not a string"))
                continue
            if target is not None:
                u = len(tokenizer.encode(target))
            elif target_len is not None:
                u = target_len
            else:
                errors.append(InputError(path, number, "no transcript: neither 'target' nor 'target_len'"))
                continue
            if u == 0:
                errors.append(InputError(path, number, "empty transcript"))
                continue
            source = obj.get("source") if isinstance(obj.get("source"), str) else ""
            if source_len is None:
                if not source:
                    errors.append(InputError(path, number, "no 'source_len' and no 'source' audio to measure"))
                    continue
                need_audio.append((len(keys), resolve_source(source, path.parent), path, number))
            seen[key] = origin
            keys.append(key)
            frames10.append(source_len if source_len is not None else 0)
            tokens.append(u)
            origins.append(origin)
            sources.append(source)
            list_dirs.append(str(path.parent))
            targets.append(target)
        if len(keys) == before and not any(e.path == str(path) for e in errors):
            errors.append(InputError(path, None, "empty manifest: no utterances"))

    frames10 = np.array(frames10, dtype=np.int64)
    bad = set()
    if need_audio:
        def measure(item):
            i, p, list_path, number = item
            try:
                sr, n, _ = audio_info(p)
                return i, n / sr, None
            except AudioError as e:
                return i, 0.0, InputError(list_path, number, str(e))
        with ThreadPoolExecutor(workers) as pool:  # headers are small reads: threads hide the latency
            for i, seconds, err in pool.map(measure, need_audio):
                if err is not None:
                    errors.append(err)
                    bad.add(i)
                else:
                    frames10[i] = int(seconds * 1000 / frame_shift_ms)
    seconds = frames10 * frame_shift_ms / 1000
    t = lfr_frames(frames10, lfr_n, frame_shift_ms, frame_length_ms)
    keep = [i for i in range(len(keys)) if i not in bad and frames10[i] > 0]
    for i in range(len(keys)):
        if i not in bad and frames10[i] <= 0:
            path, _, number = origins[i].rpartition(":")
            errors.append(InputError(path, int(number), "audio is empty (length 0)"))
    idx = np.array(keep, dtype=np.int64)
    lengths = Lengths([keys[i] for i in keep], t[idx], np.array(tokens, dtype=np.int64)[idx], seconds[idx],
                      [origins[i] for i in keep], [sources[i] for i in keep], [list_dirs[i] for i in keep],
                      [targets[i] for i in keep])
    return lengths, errors


def write_synthetic_manifest(path: str | os.PathLike, n: int, seed: int = 0, min_s: float = 0.5,
                             max_s: float = 60.0, chars_per_s: float = 4.0) -> Path:
    """A manifest of `n` utterances with heavy-tailed durations (log-normal, clipped to [min_s, max_s])
    and lengths only: for planning benchmarks, nothing to decode."""
    rng = np.random.default_rng(seed)
    seconds = np.clip(rng.lognormal(mean=np.log(5.0), sigma=0.8, size=n), min_s, max_s)
    tokens = np.maximum(1, np.round(seconds * chars_per_s * rng.uniform(0.6, 1.4, size=n))).astype(int)
    path = Path(path)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            f.write(json.dumps({"key": f"utt{i:06d}", "source": f"wav/utt{i:06d}.wav",
                                "source_len": int(seconds[i] * 100), "target_len": int(tokens[i])}) + "\n")
    return path
