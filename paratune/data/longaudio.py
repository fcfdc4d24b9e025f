"""Long clips: cut at silences, and divide the transcript by when each token was spoken.

Silences come from silero-vad (its PyPI package ships the weights). A clip longer than the limit is cut
at the pause nearest below the limit, again and again. Where the words are cut is found by an
alignment model: a Paraformer's CIF predictor run with the known number of tokens fires once per
token, and the frame where the accumulated weight crosses each token's midpoint (k + 0.5) is when that
token was spoken. Each token goes to the segment that contains its time.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

VAD_RATE = 16000


class SplitError(ValueError):
    """A clip that cannot be split as asked; the message says why."""


@functools.lru_cache(maxsize=1)
def _vad_model():
    """silero-vad, loaded once per process (it is read-only after loading). Importing silero_vad calls
    torch.set_num_threads(1) for the whole process: the caller's thread count is put back."""
    threads = torch.get_num_threads()
    try:
        import silero_vad
        return silero_vad.load_silero_vad(), silero_vad.get_speech_timestamps
    finally:
        torch.set_num_threads(threads)


def speech_segments(wave: np.ndarray, min_silence_s: float = 0.1) -> list[tuple[float, float]]:
    """(start, end) seconds of speech in a 16 kHz waveform."""
    model, get_speech_timestamps = _vad_model()
    with torch.no_grad():
        stamps = get_speech_timestamps(torch.from_numpy(np.ascontiguousarray(wave, dtype=np.float32)), model,
                                       sampling_rate=VAD_RATE, min_silence_duration_ms=int(min_silence_s * 1000),
                                       speech_pad_ms=30)
    return [(s["start"] / VAD_RATE, s["end"] / VAD_RATE) for s in stamps]


def cut_points(speech: list[tuple[float, float]], duration: float, max_duration: float) -> list[float]:
    """Times to cut at, each in the middle of a pause, so that no piece is longer than `max_duration`.
    Raises SplitError where a stretch longer than the limit has no pause."""
    pauses = [(a_end + b_start) / 2 for (_, a_end), (b_start, _) in zip(speech, speech[1:])]
    cuts, start = [], 0.0
    while duration - start > max_duration:
        inside = [p for p in pauses if start < p <= start + max_duration]
        if not inside:
            raise SplitError(f"no pause between {start:.1f} s and {start + max_duration:.1f} s to cut at")
        cuts.append(inside[-1])
        start = inside[-1]
    return cuts


def token_times(model, frontend, wave: np.ndarray, n_tokens: int) -> np.ndarray:
    """When each of the transcript's `n_tokens` tokens was spoken (seconds), from the alignment model."""
    frontend.eval()
    model.eval()
    feats = frontend.features(wave)[None]
    lengths = torch.tensor([feats.shape[1]])
    with torch.no_grad():
        enc, enc_lengths = model.encode(feats, lengths)
        target = torch.tensor([n_tokens + model.predictor_bias])
        _, _, alphas, _ = model.predict(enc, enc_lengths, target_lengths=target)
    cum = torch.cumsum(alphas[0].double(), 0).numpy()
    frame = np.searchsorted(cum, np.arange(n_tokens) + 0.5)  # the frame in which token k is half accumulated
    seconds_per_frame = frontend.lfr_n * frontend.frame_shift / 1000
    return (np.minimum(frame, len(cum) - 1) + 0.5) * seconds_per_frame


@dataclass
class Segment:
    start: float
    end: float
    tokens: list[str] | None  # None for unlabelled audio


def split(wave: np.ndarray, max_duration: float, tokens: list[str] | None = None, align=None) -> list[Segment]:
    """Cut a 16 kHz clip into pieces no longer than `max_duration` at pauses; with `tokens` (the
    transcript as the model's tokens) and `align` (model, frontend) divide the transcript too."""
    duration = len(wave) / VAD_RATE
    speech = speech_segments(wave)
    if not speech:
        raise SplitError("no speech found")
    cuts = cut_points(speech, duration, max_duration)
    bounds = [0.0, *cuts, duration]
    segments = [Segment(a, b, None) for a, b in zip(bounds, bounds[1:])]
    if tokens is not None:
        if align is None:
            raise SplitError("labelled audio needs an alignment model to divide its transcript (--align-model)")
        times = token_times(align[0], align[1], wave, len(tokens))
        which = np.searchsorted(np.array(cuts), times)  # segment index per token
        for i, seg in enumerate(segments):
            seg.tokens = [t for t, w in zip(tokens, which) if w == i]
    return segments
