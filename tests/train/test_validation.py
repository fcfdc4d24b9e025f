"""Validation and `paratune eval` score every readable utterance, however long (issue 13, defect 6: clips
over the batch's frame limit were left out without a word)."""
from __future__ import annotations

from pathlib import Path

import torch

from paratune.modeldir import load_model
from paratune.train.validation import load_split, validate

ASSETS = Path(__file__).resolve().parents[2] / "paratune" / "assets"


def test_clips_longer_than_a_batch_are_scored_alone():
    asr = load_model(ASSETS / "demo_model")
    rows, lengths, errors = load_split([ASSETS / "finetune" / "test.jsonl"], asr)
    assert not errors and len(rows) == 24
    limit = int(lengths.frames.min()) - 1  # every clip is longer than a batch may be
    whole = validate(asr, rows, lengths, torch.device("cpu"))
    alone = validate(asr, rows, lengths, torch.device("cpu"), batch_frames=limit)
    assert alone["utterances"] == whole["utterances"] == 24
    assert abs(alone["cer"] - whole["cer"]) < 1e-9  # the same clips, decoded the same
