"""Token timestamps from the upsampled CIF head of BiCifParaformer / SeacoParaformer.

The second CIF head (`CifPredictorV3.timestamp_alphas`) gives one weight per upsampled frame, scaled
so the weights sum to the number of decoded tokens; its integrator fires where a token starts. This
module turns those weights into one [start_ms, end_ms] per token, with FunASR 1.4.16's exact results:
`cif_wo_hidden` (funasr/models/paraformer/cif_predictor.py) and `ts_prediction_lfr6_standard`
(funasr/utils/timestamp_tools.py).
"""
from __future__ import annotations

import torch

# an upsampled frame counts as a fire from this integrator value on (FunASR: threshold 1.0 - 1e-4,
# so that float rounding of weights scaled to sum to an integer does not lose the last fire)
FIRE_THRESHOLD = 1.0 - 1e-4
# fires come late: the frame where a token starts is 1.5 upsampled frames before its fire
FORCE_TIME_SHIFT = -1.5
# more than this many upsampled frames before the first fire / after the last is a silence
START_END_THRESHOLD = 5
# a token lasts at most this many upsampled frames (240 ms at upsample_rate 3); the rest of a
# longer gap between two fires is a silence
MAX_TOKEN_DURATION = 12
# label of a silence span; quirk: a token spelled so is dropped as well
SILENCE = "<sil>"
# one encoder frame is 6 stacked (LFR) 10 ms feature frames, in seconds
LFR_FRAME_S = 10.0 * 6 / 1000


def fire_weights(alphas: torch.Tensor, threshold: float) -> torch.Tensor:
    """The CIF integrator over time without hidden states (FunASR's `cif_wo_hidden`).

    `alphas` (B, T); returns (B, T) float32: at each frame the integrator after adding that frame's
    weight. Where it reaches `threshold` a token fires and `threshold` (not 1) is taken off it.
    A loop over frames in float32, in FunASR's order of operations, so the values are bit-identical
    (a cumulative sum would round differently). Inference only. Zero frames give (B, 0), where
    FunASR's loop raises.
    """
    batch, frames = alphas.shape
    integrate = torch.zeros(batch, dtype=torch.float32, device=alphas.device)
    step = torch.full((batch,), threshold, dtype=torch.float32, device=alphas.device)
    fires = torch.empty(batch, frames, dtype=torch.float32, device=alphas.device)
    for t in range(frames):
        integrate += alphas[:, t]  # in place, as FunASR: float64 alphas are added into float32
        fires[:, t] = integrate
        integrate = torch.where(integrate >= threshold, integrate - step, integrate)
    return fires


def _fire_frames(alphas: torch.Tensor, peaks: torch.Tensor, num_fires: int) -> tuple[list[float], int]:
    """Where the upsampled CIF fires (shifted by FORCE_TIME_SHIFT, in upsampled frames), and the
    number of frames. When `peaks` does not fire exactly `num_fires` times the alphas are rescaled to
    sum to `num_fires` and integrated again."""
    fired = (peaks >= FIRE_THRESHOLD).nonzero().flatten().tolist()
    if len(fired) != num_fires:
        # not in place: FunASR divides the caller's (batch) tensor
        alphas = alphas / (alphas.sum() / num_fires)
        peaks = fire_weights(alphas[None], FIRE_THRESHOLD)[0]
        fired = (peaks >= FIRE_THRESHOLD).nonzero().flatten().tolist()
    return [i + FORCE_TIME_SHIFT for i in fired], peaks.shape[0]


def _spans(fires: list[float], num_frames: int, tokens: list[str]) -> list[list]:
    """[label, start, end] in upsampled frames, label a token or SILENCE: token i lasts from fire i
    to fire i + 1 (at most MAX_TOKEN_DURATION, then a silence), with silences at the start and the
    end when they are long."""
    spans: list[list] = []
    if fires[0] > START_END_THRESHOLD:
        spans.append([SILENCE, 0.0, fires[0]])
    for token, start, next_start in zip(tokens, fires, fires[1:]):
        if next_start - start <= MAX_TOKEN_DURATION:
            spans.append([token, start, next_start])
        else:
            split = start + MAX_TOKEN_DURATION
            spans += [[token, start, split], [SILENCE, split, next_start]]
    # the last fire closes the last token: it ends at the end of the audio, or half-way to it
    # before a long final silence (FunASR extends whatever span is last, silence or not)
    if num_frames - fires[-1] > START_END_THRESHOLD:
        end = (num_frames + fires[-1]) * 0.5
        spans[-1][2] = end  # IndexError with no span at all, as in FunASR
        spans.append([SILENCE, end, num_frames])
    elif spans:
        spans[-1][2] = num_frames
    return spans


def token_timestamps(us_alphas: torch.Tensor, us_peaks: torch.Tensor, tokens: list[str], begin_ms: float = 0,
                     upsample_rate: int = 3) -> list[list[int]]:
    """[start_ms, end_ms] of each token of one utterance (FunASR's `ts_prediction_lfr6_standard`).

    `us_alphas`, `us_peaks` (T,): the upsampled weights of the utterance's real frames and their
    `fire_weights`; `tokens`: the decoded tokens (a final "</s>" is ignored); `begin_ms`: where the
    utterance starts in the audio (FunASR's vad_offset). `us_alphas` is not modified.
    FunASR counts one more fire than tokens (the last closes the last token). Raises (IndexError)
    where FunASR does: when nothing fires, or when more than len(tokens) + 1 fire even after the
    alphas are rescaled.
    """
    if not tokens:
        return []
    if us_alphas.dim() != 1 or us_peaks.dim() != 1:
        raise ValueError(f"expected 1-D alphas and peaks, got shapes {tuple(us_alphas.shape)}, "
                         f"{tuple(us_peaks.shape)}")
    if tokens[-1] == "</s>":
        tokens = tokens[:-1]
    fires, num_frames = _fire_frames(us_alphas, us_peaks, len(tokens) + 1)
    if not fires:
        raise IndexError("no upsampled frame fired: cannot place any token")
    if len(fires) > len(tokens) + 1:
        raise IndexError(f"{len(fires)} fires for {len(tokens)} tokens: too many to place")
    seconds_per_frame = LFR_FRAME_S / upsample_rate
    offset_s = begin_ms / 1000.0
    # seconds first, offset next, then whole ms (truncated): FunASR's rounding
    return [[int((start * seconds_per_frame + offset_s) * 1000), int((end * seconds_per_frame + offset_s) * 1000)]
            for label, start, end in _spans(fires, num_frames, tokens) if label != SILENCE]
