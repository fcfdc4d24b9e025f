"""SpecAugment on LFR features, as FunASR's SpecAugLFR applies it (no time warp)."""
from __future__ import annotations

import torch


def spec_augment(feats: torch.Tensor, gen: torch.Generator, n_mels: int = 80, lfr_m: int = 7,
                 max_freq: int = 30, max_time: int = 4) -> torch.Tensor:
    """One (T, lfr_m * n_mels) matrix: one band of mel bins masked in every stacked frame, one short
    run of LFR frames masked (to zero: the CMVN'd mean)."""
    feats = feats.clone()
    t = feats.shape[0]
    view = feats.view(t, lfr_m, n_mels)
    # a model with fewer mel bins than max_freq (a small recipe's n_mels: 24) masks at most all of them
    w = int(torch.randint(0, min(max_freq, n_mels) + 1, (1,), generator=gen))
    if w:
        f0 = int(torch.randint(0, n_mels - w + 1, (1,), generator=gen))
        view[:, :, f0:f0 + w] = 0.0
    w = min(int(torch.randint(0, max_time + 1, (1,), generator=gen)), t // 5)
    if w:
        t0 = int(torch.randint(0, t - w + 1, (1,), generator=gen))
        feats[t0:t0 + w] = 0.0
    return feats


def augment_batch(speech: torch.Tensor, lengths: torch.Tensor, gen: torch.Generator, n_mels: int,
                  lfr_m: int) -> torch.Tensor:
    """Each utterance's real frames masked on its own; padding stays zero."""
    out = speech.clone()
    for i, n in enumerate(lengths.tolist()):
        out[i, :n] = spec_augment(speech[i, :n], gen, n_mels, lfr_m)
    return out
