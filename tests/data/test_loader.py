"""The loader: features from worker processes equal the frontend's, padded as the sampler says."""
from __future__ import annotations

import json

import torch

from paratune.data.audio import load_audio
from paratune.data.loader import FeatureDataset, make_loader, model_inputs
from paratune.data.sampler import MemoryBoundedSampler
from paratune.modeldir import read_model_dir


def test_workers_compute_the_same_features_padded(tmp_path, zh_real, large_dir):
    spec = read_model_dir(large_dir)
    text = dict(line.split(maxsplit=1) for line in (zh_real / "text").read_text(encoding="utf-8").splitlines())
    rows = [{"key": p.stem, "source": str(p), "target": text[p.stem].strip()}
            for p in sorted(zh_real.glob("*.wav")) if not p.stem.startswith("librispeech")]
    frames = [spec.frontend.eval().features(load_audio(r["source"], 16000)).shape[0] for r in rows]
    tokens = [len(spec.tokenizer.encode(r["target"])) for r in rows]
    sampler = MemoryBoundedSampler(frames, tokens, max_frames=250, seed=0, buckets=[40, 80, 120])
    loader = make_loader(FeatureDataset(rows, spec.frontend, spec.tokenizer, train=False), sampler, workers=2)
    seen = []
    for batch, expected in zip(loader, sampler.batches(0)):
        assert batch["indices"] == expected
        longest = max(frames[i] for i in expected)
        assert batch["speech"].shape[1] == sampler.padded(longest) >= longest
        for row, i in enumerate(expected):
            ref = spec.frontend.eval().features(load_audio(rows[i]["source"], 16000))
            n = int(batch["speech_lengths"][row])
            assert n == ref.shape[0] and torch.equal(batch["speech"][row, :n], ref)
            assert (batch["speech"][row, n:] == 0).all()
            ids = batch["text"][row, :batch["text_lengths"][row]].tolist()
            assert ids == spec.tokenizer.encode(rows[i]["target"])
            assert (batch["text"][row, len(ids):] == -1).all()
        seen += expected
        assert set(model_inputs(batch, "cpu")) == {"speech", "speech_lengths", "text", "text_lengths"}
    assert sorted(seen) == list(range(len(rows)))
    json.dumps(sampler.state_dict())  # the position is plain data: goes into a checkpoint


def test_training_features_depend_on_seed_epoch_and_utterance_only(zh_real, large_dir):
    spec = read_model_dir(large_dir)
    rows = [{"key": p.stem, "source": str(p), "target": ""} for p in sorted(zh_real.glob("*.wav"))[:2]]
    aug = dict(speed_perturb=[0.9, 1.0, 1.1], gain_db=10, noise_snr_db=[10, 30], tilt=0.5)
    a = FeatureDataset(rows, spec.frontend, spec.tokenizer, train=True, seed=3, **aug)
    b = FeatureDataset(rows, spec.frontend, spec.tokenizer, train=True, seed=3, **aug)
    b[1]  # another order of reads changes nothing
    assert torch.equal(a[0]["speech"], b[0]["speech"])
    a.epoch = 1
    assert not torch.equal(a[0]["speech"], b[0]["speech"])  # a new epoch, new noise and perturbation
    plain = FeatureDataset(rows, spec.frontend, spec.tokenizer, train=False)[0]["speech"]
    assert not torch.equal(plain, b[0]["speech"])
    state = torch.get_rng_state()
    a[0]
    assert torch.equal(state, torch.get_rng_state())  # the global generator is left alone
