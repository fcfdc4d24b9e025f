"""Reading audio files into mono float32 waveforms at the model's sample rate.

The result must equal what FunASR feeds its frontend, or features drift from the ones the
pretrained model was trained on. Without torchaudio FunASR reads with soundfile, averages
the channels and resamples with ``librosa.resample`` (res_type "soxr_hq"); this module does
the same with soundfile and soxr directly.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

PathLike = str | os.PathLike


class AudioError(Exception):
    """An audio file that cannot be used; the message names the file and the reason."""

    def __init__(self, path: PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class NonFiniteAudioError(AudioError):
    """A (float) audio file holding NaN or infinite samples: its features, and any loss on it, are NaN."""


def audio_error_kind(e: AudioError) -> str:
    """The kind of problem, in prepare's report's names (also the manifest readers' InputError kinds)."""
    if isinstance(e, NonFiniteAudioError):
        return "non_finite_audio"
    if "not found" in e.reason:
        return "missing_audio"
    if "empty file" in e.reason or "no audio samples" in e.reason:
        return "empty_audio"
    return "corrupt_audio"


def _first_non_finite(block: np.ndarray) -> int | None:
    bad = ~np.isfinite(block)
    return None if not bad.any() else int(np.flatnonzero(bad.any(axis=-1) if bad.ndim == 2 else bad)[0])


def _check_file(path: PathLike) -> Path:
    p = Path(path)
    if not p.exists():
        raise AudioError(path, "file not found")
    if not p.is_file():
        raise AudioError(path, "not a regular file")
    if p.stat().st_size == 0:
        raise AudioError(path, "empty file (0 bytes)")
    return p


def audio_info(path: PathLike) -> tuple[int, int, int]:
    """(sample_rate, num_frames, channels) read from the file header only."""
    p = _check_file(path)
    try:
        info = sf.info(str(p))
    except Exception as e:  # soundfile raises LibsndfileError/RuntimeError/TypeError
        raise AudioError(path, f"unreadable or corrupt audio ({e})") from e
    if info.frames <= 0:
        raise AudioError(path, "contains no audio samples")
    return int(info.samplerate), int(info.frames), int(info.channels)


def resample(x: np.ndarray, in_sr: int, out_sr: int) -> np.ndarray:
    """Resample a 1-D float32 signal exactly like ``librosa.resample(res_type="soxr_hq")``."""
    if in_sr == out_sr:
        return x
    y = soxr.resample(x, in_sr, out_sr, quality="HQ")
    # librosa forces the length to ceil(n * ratio), with the ratio computed first; the
    # product can land just above an integer, so the order of operations matters.
    n_out = int(np.ceil(x.shape[0] * (float(out_sr) / in_sr)))
    if y.shape[0] > n_out:
        y = y[:n_out]
    elif y.shape[0] < n_out:
        y = np.pad(y, (0, n_out - y.shape[0]))
    return np.asarray(y, dtype=np.float32)


def load_audio(path: PathLike, sample_rate: int = 16000) -> np.ndarray:
    """Read an audio file as a 1-D float32 mono waveform in [-1, 1] at ``sample_rate``."""
    p = _check_file(path)
    try:
        data, sr = sf.read(str(p), dtype="float32")
    except Exception as e:
        raise AudioError(path, f"unreadable or corrupt audio ({e})") from e
    if data.ndim == 2:
        # FunASR averages channels (after a squeeze, so one-channel files stay as they are)
        data = data[:, 0] if data.shape[1] == 1 else data.mean(axis=1, dtype=np.float32)
    if data.shape[0] == 0:
        raise AudioError(path, "contains no audio samples")
    at = _first_non_finite(data)
    if at is not None:
        raise NonFiniteAudioError(path, f"non-finite sample (NaN or inf) at {at / sr:.3f} s")
    data = resample(data, int(sr), int(sample_rate))
    return np.ascontiguousarray(data, dtype=np.float32)


def scan_audio(path: PathLike, block_frames: int = 1 << 18) -> tuple[int, int, int]:
    """(sample_rate, num_frames, channels) by decoding the whole file, in blocks: finds what a header
    cannot show, NaN/inf samples (NonFiniteAudioError) and data cut short or corrupt (AudioError)."""
    sr, _, channels = audio_info(path)
    n = 0
    try:
        with sf.SoundFile(str(path)) as f:
            for block in f.blocks(blocksize=block_frames, dtype="float32"):
                at = _first_non_finite(block)
                if at is not None:
                    raise NonFiniteAudioError(path, f"non-finite sample (NaN or inf) at {(n + at) / sr:.3f} s")
                n += len(block)
    except AudioError:
        raise
    except Exception as e:  # soundfile raises LibsndfileError/RuntimeError mid-file
        raise AudioError(path, f"unreadable or corrupt audio ({e})") from e
    if n == 0:
        raise AudioError(path, "contains no audio samples")
    return sr, n, channels
