"""Paraformer's input features: Kaldi fbank, low frame rate (LFR) stacking and global CMVN.

This reproduces FunASR's ``WavFrontend`` (funasr/frontends/wav_frontend.py with the
kaldi-native-fbank backend of funasr/utils/fbank.py) so that a pretrained model sees the
features it was trained on. One deliberate difference: dither is only added in training
mode (see ``WavFrontend``).
"""
from __future__ import annotations

import os
from typing import Sequence

import kaldi_native_fbank as knf
import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence


class FrontendConfigError(ValueError):
    """A frontend setting or CMVN file that cannot be used."""


# the window types of torchaudio's kaldi.fbank, which kaldi-native-fbank also implements
WINDOWS = {"hamming", "hanning", "povey", "rectangular", "blackman"}


# ---------------------------------------------------------------------------------------
# CMVN
# ---------------------------------------------------------------------------------------


def _vector_after(lines: list[str], i: int, tag: str, path: str, dim: int) -> list[float]:
    """Numbers of the ``<LearnRateCoef> 0 [ v1 v2 ... ]`` line that follows line ``i``."""
    where = f"{path}:{i + 2}"
    if i + 1 >= len(lines):
        raise FrontendConfigError(f"{where}: file ends right after {tag} (truncated?)")
    items = lines[i + 1].split()
    if len(items) < 4 or items[0] != "<LearnRateCoef>" or items[2] != "[":
        raise FrontendConfigError(
            f"{where}: expected '<LearnRateCoef> <coef> [ values ... ]' after {tag}"
        )
    if items[-1] != "]":
        raise FrontendConfigError(f"{where}: values of {tag} are not closed by ']' (truncated?)")
    try:
        values = [float(v) for v in items[3:-1]]
    except ValueError as e:
        raise FrontendConfigError(f"{where}: non-numeric value in {tag}: {e}") from None
    if dim is not None and len(values) != dim:
        raise FrontendConfigError(
            f"{where}: {tag} declares {dim} values but the line has {len(values)}"
        )
    if not np.all(np.isfinite(values)):
        raise FrontendConfigError(f"{where}: {tag} contains non-finite values")
    return values


def load_cmvn(path: str | os.PathLike) -> torch.Tensor:
    """Read a Kaldi-nnet ``am.mvn`` into a (2, D) tensor: row 0 shifts, row 1 scales.

    The file holds an ``<AddShift> D D`` component (minus the feature means) and a
    ``<Rescale> D D`` component (inverse standard deviations), each followed by a
    ``<LearnRateCoef> 0 [ ... ]`` line with the D numbers.
    """
    path = str(path)
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise FrontendConfigError(f"{path}: CMVN file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise FrontendConfigError(f"{path}: cannot read CMVN file ({e})") from None
    if not any(line.strip() for line in lines):
        raise FrontendConfigError(f"{path}: CMVN file is empty")

    found: dict[str, list[float]] = {}
    for i, line in enumerate(lines):
        items = line.split()
        if not items or items[0] not in ("<AddShift>", "<Rescale>"):
            continue
        tag = items[0]
        if tag in found:
            raise FrontendConfigError(f"{path}:{i + 1}: second {tag} component")
        dim = None
        if len(items) >= 2:
            try:
                dim = int(items[1])
            except ValueError:
                raise FrontendConfigError(f"{path}:{i + 1}: bad dimension in {line.strip()!r}") from None
        found[tag] = _vector_after(lines, i, tag, path, dim)

    for tag in ("<AddShift>", "<Rescale>"):
        if tag not in found:
            raise FrontendConfigError(f"{path}: no {tag} component (not a Kaldi-nnet am.mvn?)")
    shift, scale = found["<AddShift>"], found["<Rescale>"]
    if len(shift) != len(scale):
        raise FrontendConfigError(
            f"{path}: <AddShift> has {len(shift)} values but <Rescale> has {len(scale)}"
        )
    if len(shift) == 0:
        raise FrontendConfigError(f"{path}: CMVN vectors are empty")
    return torch.tensor([shift, scale], dtype=torch.float32)


# ---------------------------------------------------------------------------------------
# LFR
# ---------------------------------------------------------------------------------------


def apply_lfr(feats: torch.Tensor, lfr_m: int, lfr_n: int) -> torch.Tensor:
    """Stack ``lfr_m`` consecutive frames every ``lfr_n`` frames: (T, D) -> (ceil(T/n), m*D).

    Like FunASR, the sequence is first padded on the left with (m-1)//2 copies of the first
    frame, and windows running past the end repeat the last frame. Here that padding is an
    index clamp, so no frame loop and no copies of the padded sequence are needed.
    """
    T, D = feats.shape
    if T == 0:
        raise ValueError("apply_lfr: no frames")
    t_lfr = -(-T // lfr_n)  # ceil(T / lfr_n)
    left = (lfr_m - 1) // 2
    starts = torch.arange(t_lfr, device=feats.device) * lfr_n - left
    idx = (starts[:, None] + torch.arange(lfr_m, device=feats.device)[None, :]).clamp_(0, T - 1)
    return feats[idx].reshape(t_lfr, lfr_m * D).to(torch.float32)


# ---------------------------------------------------------------------------------------
# Frontend
# ---------------------------------------------------------------------------------------


class WavFrontend(torch.nn.Module):
    """FunASR's ``WavFrontend``: fbank -> LFR -> CMVN, for 1-D waveforms in [-1, 1].

    Argument names follow FunASR's so a model config's ``frontend_conf`` can be passed as is
    (see ``from_config``). The module has no parameters; the CMVN statistics are a
    non-persistent buffer, so they follow ``.to(device)`` but never enter a checkpoint.

    Dither: FunASR adds ``dither`` (default 1.0) Gaussian noise whenever it extracts
    features, at inference too. Here noise is added only while the module is in training
    mode (``self.training``); in eval mode features are deterministic and equal FunASR's
    with ``dither=0``. The noise is drawn from torch's generator and added to the (int16
    scaled) waveform before framing, so ``torch.manual_seed`` makes training reproducible;
    every frame then carries noise of the same variance as Kaldi's per-frame dither.
    """

    def __init__(
        self,
        cmvn_file: str | os.PathLike | None = None,
        fs: int = 16000,
        window: str = "hamming",
        n_mels: int = 80,
        frame_length: float = 25,
        frame_shift: float = 10,
        lfr_m: int = 1,
        lfr_n: int = 1,
        dither: float = 1.0,
        snip_edges: bool = True,
        upsacle_samples: bool = True,  # sic: FunASR's spelling, kept for its configs
        cmvn: torch.Tensor | None = None,
    ):
        super().__init__()
        if cmvn_file is not None and cmvn is not None:
            raise FrontendConfigError("give either cmvn_file or cmvn, not both")
        # Fail at construction, not at the first batch, on settings from a hand-edited config.
        for name, value in (("fs", fs), ("n_mels", n_mels), ("lfr_m", lfr_m), ("lfr_n", lfr_n)):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise FrontendConfigError(f"{name} must be a positive integer, got {value!r}")
        for name, value in (("frame_length", frame_length), ("frame_shift", frame_shift), ("dither", dither)):
            if not isinstance(value, (int, float, np.number)) or isinstance(value, bool) or not np.isfinite(value):
                raise FrontendConfigError(f"{name} must be a number, got {value!r}")
        if frame_length <= 0 or frame_shift <= 0 or dither < 0:
            raise FrontendConfigError(
                f"need frame_length > 0, frame_shift > 0 (ms) and dither >= 0, got "
                f"{frame_length}, {frame_shift}, {dither}"
            )
        if window not in WINDOWS:
            raise FrontendConfigError(f"window must be one of {sorted(WINDOWS)}, got {window!r}")
        self.fs = int(fs)
        self.window = window
        self.n_mels = int(n_mels)
        self.frame_length = frame_length
        self.frame_shift = frame_shift
        self.lfr_m = int(lfr_m)
        self.lfr_n = int(lfr_n)
        self.dither = float(dither)
        self.snip_edges = bool(snip_edges)
        self.upsacle_samples = bool(upsacle_samples)
        self.cmvn_file = None if cmvn_file is None else str(cmvn_file)

        if cmvn_file is not None:
            cmvn = load_cmvn(cmvn_file)
        if cmvn is not None:
            cmvn = torch.as_tensor(cmvn, dtype=torch.float32)
            source = self.cmvn_file or "cmvn tensor"
            if cmvn.ndim != 2 or cmvn.shape[0] != 2:
                raise FrontendConfigError(f"{source}: CMVN must have shape (2, D), got {tuple(cmvn.shape)}")
            # FunASR slices the statistics to the feature size; fewer would not broadcast.
            if cmvn.shape[1] < self.output_size():
                raise FrontendConfigError(
                    f"{source}: CMVN has {cmvn.shape[1]} dims but features have "
                    f"{self.output_size()} (n_mels {self.n_mels} x lfr_m {self.lfr_m})"
                )
            cmvn = cmvn[:, : self.output_size()].contiguous()
        self.register_buffer("cmvn", cmvn, persistent=False)

    @classmethod
    def from_config(cls, frontend_conf: dict, cmvn_file: str | os.PathLike | None = None) -> "WavFrontend":
        """Build from a FunASR ``frontend_conf``; keys this frontend has no use for are ignored
        (FunASR configs carry e.g. ``filter_length_min``)."""
        known = ("fs", "window", "n_mels", "frame_length", "frame_shift", "lfr_m", "lfr_n",
                 "dither", "snip_edges", "upsacle_samples", "cmvn_file")
        kwargs = {k: v for k, v in (frontend_conf or {}).items() if k in known}
        if cmvn_file is not None:
            kwargs["cmvn_file"] = cmvn_file
        return cls(**kwargs)

    def output_size(self) -> int:
        return self.n_mels * self.lfr_m

    def extra_repr(self) -> str:
        return (f"fs={self.fs}, n_mels={self.n_mels}, lfr_m={self.lfr_m}, lfr_n={self.lfr_n}, "
                f"dither={self.dither}, cmvn={self.cmvn_file or (self.cmvn is not None)}")

    def _fbank(self, samples: np.ndarray, dither: float) -> torch.Tensor:
        n = samples.shape[0]
        opts = knf.FbankOptions()
        opts.frame_opts.samp_freq = float(self.fs)
        # FunASR shortens the window for clips under one frame so they still yield a frame.
        opts.frame_opts.frame_length_ms = float(min(self.frame_length, n / self.fs * 1000))
        opts.frame_opts.frame_shift_ms = float(self.frame_shift)
        opts.frame_opts.dither = 0.0  # our own dither is already in the samples
        opts.frame_opts.snip_edges = self.snip_edges
        opts.frame_opts.window_type = self.window
        opts.frame_opts.preemph_coeff = 0.97
        opts.frame_opts.remove_dc_offset = True
        opts.frame_opts.round_to_power_of_two = True
        opts.mel_opts.num_bins = self.n_mels
        opts.mel_opts.low_freq = 20.0
        opts.mel_opts.high_freq = 0.0
        opts.energy_floor = 0.0
        opts.raw_energy = True
        opts.use_energy = False
        opts.use_log_fbank = True
        opts.use_power = True
        opts.htk_compat = False

        if dither > 0:
            noise = torch.randn(n, dtype=torch.float32).numpy()
            samples = samples + np.float32(dither) * noise
        try:
            fb = knf.OnlineFbank(opts)
            fb.accept_waveform(float(self.fs), samples)
            fb.input_finished()
            frames = [fb.get_frame(i) for i in range(fb.num_frames_ready)]
        except Exception as e:  # knf rejects windows too short for n_mels bins
            frames, reason = [], str(e)
        else:
            reason = "no complete frame"
        if not frames:
            raise ValueError(
                f"cannot compute features of a {n}-sample waveform "
                f"({n / self.fs * 1000:.1f} ms at {self.fs} Hz): {reason}"
            )
        return torch.from_numpy(np.stack(frames).astype(np.float32, copy=False))

    def features(self, waveform: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Features (T, n_mels * lfr_m) of one 1-D waveform with samples in [-1, 1]."""
        if isinstance(waveform, torch.Tensor):
            waveform = waveform.detach().cpu().numpy()
        samples = np.asarray(waveform, dtype=np.float32)
        if samples.ndim != 1:
            raise ValueError(f"expected a 1-D mono waveform, got shape {samples.shape}")
        if samples.shape[0] == 0:
            raise ValueError("empty waveform")
        if self.upsacle_samples:
            # Kaldi features are computed on int16-range samples.
            samples = samples * np.float32(1 << 15)
        feats = self._fbank(samples, self.dither if self.training else 0.0)
        if self.lfr_m != 1 or self.lfr_n != 1:
            feats = apply_lfr(feats, self.lfr_m, self.lfr_n)
        if self.cmvn is not None:
            cmvn = self.cmvn.to(feats.device)
            feats = (feats + cmvn[0]) * cmvn[1]
        return feats

    def forward(self, waveforms: Sequence[np.ndarray | torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Features of a batch: (feats_pad (B, T_max, D) float32, lengths (B,) int32).

        Padding frames are zeros.
        """
        feats = [self.features(w) for w in waveforms]
        if not feats:
            raise ValueError("empty batch")
        lengths = torch.tensor([f.shape[0] for f in feats], dtype=torch.int32)
        return pad_sequence(feats, batch_first=True, padding_value=0.0), lengths
