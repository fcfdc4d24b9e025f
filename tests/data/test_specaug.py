"""SpecAugment on LFR features: one frequency band in every stacked frame, one run of frames."""
from __future__ import annotations

import torch

from paratune.data.specaug import augment_batch, spec_augment


def _masks(out: torch.Tensor, n_mels: int, lfr_m: int):
    """(masked mel bins, masked frames) of features that were all ones."""
    t = out.shape[0]
    zero = out.view(t, lfr_m, n_mels) == 0
    frames = zero.flatten(1).all(1)
    bins = zero[~frames].all(0).all(0) if (~frames).any() else torch.ones(n_mels, dtype=torch.bool)
    return bins, frames


def test_one_band_and_one_run_each_contiguous_and_bounded():
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        feats = torch.ones(40, 7 * 80)
        out = spec_augment(feats, gen, n_mels=80, lfr_m=7, max_freq=30, max_time=4)
        assert torch.equal(feats, torch.ones(40, 7 * 80))  # the input is left alone
        bins, frames = _masks(out, 80, 7)
        for mask, limit in ((bins, 30), (frames, min(4, 40 // 5))):
            idx = mask.nonzero().flatten()
            assert len(idx) <= limit
            if len(idx):
                assert idx[-1] - idx[0] + 1 == len(idx)  # one contiguous band or run
        # the same mel bins are masked in all 7 stacked frames of a frame
        assert ((out.view(40, 7, 80) == 0).all(1) == (out.view(40, 7, 80) == 0).any(1)).all()


def test_fewer_mel_bins_than_the_widest_mask():
    # n_mels 24 < max_freq 30: used to raise in torch.randint
    gen = torch.Generator().manual_seed(1)
    widths = set()
    for _ in range(300):
        bins, _ = _masks(spec_augment(torch.ones(30, 7 * 24), gen, n_mels=24, lfr_m=7), 24, 7)
        widths.add(int(bins.sum()))
    assert max(widths) <= 24 and len(widths) > 10


def test_batch_padding_stays_zero_and_generator_decides():
    speech = torch.zeros(3, 20, 2 * 10)
    lengths = torch.tensor([20, 12, 5])
    for i, n in enumerate(lengths.tolist()):
        speech[i, :n] = 1.0
    a = augment_batch(speech, lengths, torch.Generator().manual_seed(5), n_mels=10, lfr_m=2)
    b = augment_batch(speech, lengths, torch.Generator().manual_seed(5), n_mels=10, lfr_m=2)
    assert torch.equal(a, b)
    for i, n in enumerate(lengths.tolist()):
        assert (a[i, n:] == 0).all()
    assert (a == 0).sum() > (speech == 0).sum()  # something was masked
