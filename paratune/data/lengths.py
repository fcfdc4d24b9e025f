"""The lengths batching needs: T input frames (after LFR) and U target tokens of every utterance.

FunASR's own `scp2jsonl` writes `source_len` as 10 ms frames (duration x 100) and `target_len` as
characters (or words when the text has spaces). When `source_len` is present no audio is opened; otherwise
the duration comes from the audio file's header, never from decoding it. U is counted with the model's
tokenizer when the line has its transcript, which is exact; `target_len` is used only without one.
"""
from __future__ import annotations

import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from paratune.data.audio import AudioError, audio_error_kind, audio_info
from paratune.data.manifest import InputError, Lengths, Record, read_manifests
from paratune.data.tokenizer import CharTokenizer


def lfr_frames(frames10, lfr_n: int, frame_shift_ms: float = 10.0, frame_length_ms: float = 25.0):
    """Model input frames for `frames10` 10 ms frames (int or array): fbank frames are
    1 + (samples - window) // shift, then LFR keeps ceil(frames / lfr_n)."""
    window = max(0, math.ceil(frame_length_ms / frame_shift_ms) - 1)
    return -(-np.maximum(np.asarray(frames10) - window, 1) // lfr_n)


def unknown_tokens(tokenizer: CharTokenizer, text: str) -> tuple[list[str], list[str]]:
    """(the tokens of `text`, the distinct words or tokens the model does not know)."""
    missing: list[str] = []
    pieces = tokenizer.text2tokens(text, missing)
    return pieces, list(dict.fromkeys(missing + [t for t in pieces if t not in tokenizer.token2id]))


def target_tokens(record: Record, tokenizer: CharTokenizer) -> int:
    """U for one record; InputError where the transcript gives nothing to learn from."""
    if record.target is None:
        u = record.target_len or 0
    else:
        pieces, unknown = unknown_tokens(tokenizer, record.target)
        u = len(pieces)
        # a transcript of only <unk> trains the model to say <unk>: never what anyone wants
        if pieces and all(t not in tokenizer.token2id or t == tokenizer.unk_symbol for t in pieces):
            raise record.error("transcript has only unknown tokens for this model: " + " ".join(unknown),
                               "unknown_tokens")
    if u == 0:
        raise record.error("empty transcript", "empty_transcript")
    return u


def _measure(records: list[Record], errors: list[InputError], frame_shift_ms: float, workers: int) -> np.ndarray:
    """10 ms frames per record: `source_len`, else from the audio header (-1 where that fails)."""
    def measure(r: Record) -> tuple[int, InputError | None]:
        if r.source_len is not None:
            return r.source_len, None
        try:
            sr, n, _ = audio_info(r.audio)
        except AudioError as e:
            return -1, r.error(str(e), audio_error_kind(e))
        return int(n / sr * 1000 / frame_shift_ms), None
    with ThreadPoolExecutor(workers) as pool:  # headers are small reads: threads hide the latency
        measured = list(pool.map(measure, records))
    errors += [e for _, e in measured if e is not None]
    return np.array([f for f, _ in measured], dtype=np.int64)


def read_lengths(paths, tokenizer: CharTokenizer, lfr_n: int, frame_shift_ms: float = 10.0,
                 frame_length_ms: float = 25.0, workers: int = 16,
                 need_audio: bool = False) -> tuple[Lengths, list[InputError]]:
    """Lengths of every usable utterance of the manifests `paths`; bad lines become errors naming file:line.

    `need_audio` (finetune, eval): every line must name its audio file (whether it can be read is found at
    load time); without it (plan) a `source_len` is enough."""
    records, errors = read_manifests(paths, need_audio=need_audio, targets="required", workers=workers,
                                     find_audio=False)
    usable, tokens = [], []
    for r in records:
        try:
            tokens.append(target_tokens(r, tokenizer))
            usable.append(r)
        except InputError as e:
            errors.append(e)
    frames10 = _measure(usable, errors, frame_shift_ms, workers)
    for r, f in zip(usable, frames10):
        if f == 0:
            errors.append(r.error("audio is empty (length 0)", "empty_audio"))
    keep = np.flatnonzero(frames10 > 0)
    kept = [usable[i] for i in keep]
    frames10 = frames10[keep]
    lengths = Lengths([r.key for r in kept], lfr_frames(frames10, lfr_n, frame_shift_ms, frame_length_ms),
                      np.array(tokens, dtype=np.int64)[keep] if len(keep) else np.zeros(0, np.int64),
                      frames10 * frame_shift_ms / 1000, [r.origin for r in kept], [r.source for r in kept],
                      [str(Path(r.file).parent) for r in kept], [r.target for r in kept])
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
