"""Validation and `paratune eval` score every readable utterance, however long (issue 13, defect 6: clips
over the batch's frame limit were left out without a word)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from paratune.modeldir import load_model
from paratune.train import distributed
from paratune.train.validation import load_split, validate
from tests.train.test_distributed import _two_ranks

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


def _manifests(tmp_path: Path) -> list[Path]:
    """The 24 bundled test clips and one that cannot be read."""
    (tmp_path / "bad.wav").write_bytes(b"not audio")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"key": "bad", "source": str(tmp_path / "bad.wav"), "source_len": 120,
                               "target": "\u4f60\u597d"}) + "\n")
    return [ASSETS / "finetune" / "test.jsonl", bad]


def _validate_share(rank, manifests):
    """This rank's validation of the DDP model (every rank holds it whole), then of the FSDP one: the
    scores, and how many utterances this rank ran forward."""
    out = []
    for fsdp in (False, True):
        asr = load_model(ASSETS / "demo_model")
        if fsdp:
            asr.model, _ = distributed.shard(asr.model)
        rows = []
        asr.model.register_forward_pre_hook(lambda m, args, kwargs: rows.append(len(kwargs["speech_lengths"])),
                                            with_kwargs=True)
        data, lengths, _ = load_split(manifests, asr)
        out.append((validate(asr, data, lengths, torch.device("cpu"), batch_frames=1, world_size=2, rank=rank),
                    sum(rows)))
    return out


def test_ranks_validate_their_share_and_score_as_one_process(tmp_path):
    """Issue 25, defect 7: under torchrun DDP validated on rank 0 alone while the others waited. Each rank
    now runs about half of the clips (under FSDP, whose forwards must stay in step, a rank short of a
    batch or with only an unreadable clip runs a placeholder), and every rank has one process's scores."""
    asr = load_model(ASSETS / "demo_model")
    data, lengths, _ = load_split(_manifests(tmp_path), asr)
    whole = validate(asr, data, lengths, torch.device("cpu"), batch_frames=1)
    assert whole["utterances"] == 24 and len(whole["excluded"]) == 1
    out = _two_ranks(_validate_share, tmp_path, args=(_manifests(tmp_path),))
    for rank in range(2):
        assert out[rank][0] == "ok", out
        for mode, (result, ran) in zip(("ddp", "fsdp"), out[rank][1]):
            assert 6 <= ran <= 19, (rank, mode, ran)
            assert {k: result[k] for k in ("cer", "wer", "utterances", "excluded")} == \
                   {k: whole[k] for k in ("cer", "wer", "utterances", "excluded")}, (rank, mode)
            assert abs(result["loss"] - whole["loss"]) <= 1e-5 * abs(whole["loss"]), (rank, mode)
