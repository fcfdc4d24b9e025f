"""MemoryBoundedSampler: within budget, every utterance once per epoch, resume, DDP ranks."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import paratune
from paratune.data.lengths import read_lengths, write_synthetic_manifest
from paratune.data.sampler import MemoryBoundedSampler, bucket_boundaries
from paratune.memory.fit_cache import load_or_fit
from paratune.memory.plan import Limit
from paratune.memory.trace import StepOptions
from paratune.modeldir import read_model_dir

DEMO = Path(paratune.__file__).parent / "assets" / "demo_model"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """100k utterances, heavy-tailed 0.5-60 s, and the demo model's fitted memory model."""
    tmp = tmp_path_factory.mktemp("sampler")
    spec = read_model_dir(DEMO)
    path = write_synthetic_manifest(tmp / "train.jsonl", 100_000, seed=1)
    lengths, errors = read_lengths([path], spec.tokenizer, spec.frontend.lfr_n)
    assert not errors
    model, _ = load_or_fit(spec.config, spec.vocab_size, spec.input_size, StepOptions(),
                           int(lengths.frames.max()), int(lengths.tokens.max()), holdout=0, cache=tmp / "cache")
    return lengths, Limit(model, 2 * 2**30, device="cpu")


def _padding(sampler, batches):
    padded = sum(len(b) * sampler.padded(int(sampler.frames[b].max())) for b in batches)
    return 1 - sum(int(sampler.frames[b].sum()) for b in batches) / padded


@pytest.mark.slow
def test_100k_heavy_tailed_epoch_within_budget(corpus):
    lengths, limit = corpus
    sampler = MemoryBoundedSampler(lengths.frames, lengths.tokens, limit, seed=3)
    batches = sampler.batches(0)
    needs = np.array([sampler.cost(np.array(b)) for b in batches])
    assert (needs <= limit.budget).all()
    assert needs.mean() / limit.budget >= 0.90
    assert _padding(sampler, batches) <= 0.03
    seen = np.concatenate([np.array(b) for b in batches] + [np.array(sampler.excluded(0), dtype=int)])
    assert len(seen) == len(lengths) and len(np.unique(seen)) == len(lengths)
    # another epoch: another order, the same utterances
    other = sampler.batches(1)
    assert other != batches
    assert sorted(i for b in other for i in b) == sorted(i for b in batches for i in b)
    # same seed, same epoch: the same batches
    assert MemoryBoundedSampler(lengths.frames, lengths.tokens, limit, seed=3).batches(0) == batches


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 4])
def test_ddp_ranks_split_the_epoch(corpus, world_size):
    lengths, limit = corpus
    n = 20_000
    frames, tokens = lengths.frames[:n], lengths.tokens[:n]
    ranks = [MemoryBoundedSampler(frames, tokens, limit, seed=5, world_size=world_size, rank=r)
             for r in range(world_size)]
    per_rank = [s.batches(0) for s in ranks]
    assert len({len(b) for b in per_rank}) == 1  # the same number of steps on every rank
    flat = [i for batches in per_rank for b in batches for i in b]
    assert len(flat) == len(set(flat)) == n - len(ranks[0].excluded(0))
    # each step's batches cost about the same on every rank
    costs = np.array([[ranks[0].cost(np.array(b)) for b in batches] for batches in per_rank])
    assert (costs <= limit.budget).all()
    spread = costs.max(axis=0) / costs.min(axis=0)
    assert np.median(spread) < 1.05


def test_resume_in_a_new_process_gives_the_same_remaining_batches(tmp_path):
    rng = np.random.default_rng(0)
    frames = rng.integers(10, 600, 3000)
    tokens = np.maximum(1, frames // 5)
    np.save(tmp_path / "frames.npy", frames)
    np.save(tmp_path / "tokens.npy", tokens)
    full = MemoryBoundedSampler(frames, tokens, max_frames=6000, seed=9)
    full.set_epoch(2)
    expected = list(full)
    stop = len(expected) // 3
    script = f"""
import json, numpy as np
from paratune.data.sampler import MemoryBoundedSampler
s = MemoryBoundedSampler(np.load("{tmp_path}/frames.npy"), np.load("{tmp_path}/tokens.npy"), max_frames=6000, seed=9)
s.set_epoch(2)
it = iter(s)
for _ in range({stop}):
    next(it)
json.dump(s.state_dict(), open("{tmp_path}/state.json", "w"))
"""
    subprocess.run([sys.executable, "-c", script], check=True, cwd=ROOT)
    resumed = MemoryBoundedSampler(frames, tokens, max_frames=6000, seed=9)
    resumed.load_state_dict(json.loads((tmp_path / "state.json").read_text()))
    assert list(resumed) == expected[stop:]
    # and the epoch after goes on as in an uninterrupted run
    assert list(resumed) == list(full)


def test_state_from_another_sampler_is_refused():
    s = MemoryBoundedSampler([10, 20], [1, 2], max_frames=100, seed=1)
    with pytest.raises(ValueError, match="seed=2"):
        s.load_state_dict({**s.state_dict(), "seed": 2})


def test_frames_cost_buckets_and_costliest_first():
    rng = np.random.default_rng(1)
    frames = rng.integers(20, 1000, 5000)
    tokens = np.maximum(1, frames // 4)
    plain = MemoryBoundedSampler(frames, tokens, max_frames=20_000, seed=0)
    bounds = bucket_boundaries(int(frames.max()), 1.1)
    bucketed = MemoryBoundedSampler(frames, tokens, max_frames=20_000, seed=0, buckets=bounds)
    for s in (plain, bucketed):
        for b in s.batches(0):
            assert len(b) * s.padded(int(frames[b].max())) <= 20_000
    shapes = {s.padded(int(frames[b].max())) for s in (bucketed,) for b in bucketed.batches(0)}
    assert shapes <= set(bounds) and len(shapes) < len({int(frames[b].max()) for b in plain.batches(0)})
    assert _padding(bucketed, bucketed.batches(0)) < 0.12
    first = MemoryBoundedSampler(frames, tokens, max_frames=20_000, seed=0, costliest_first=True)
    costs = [first.cost(np.array(b)) for b in first.batches(0)]
    assert costs[0] == max(costs)


def test_too_big_alone_is_excluded_not_lost():
    s = MemoryBoundedSampler([10, 5000, 20], [1, 1, 1], max_frames=100, shuffle=False)
    assert s.excluded(0) == [1]
    assert sorted(i for b in s.batches(0) for i in b) == [0, 2]


def test_more_ranks_than_utterances_is_refused():
    s = MemoryBoundedSampler([10, 20], [1, 1], max_frames=100, world_size=4, rank=0)
    with pytest.raises(ValueError, match="cannot give each of 4 ranks"):
        s.batches(0)


def test_ranks_get_as_many_batches_when_every_batch_is_one_utterance(tmp_path):
    """Three clips too long to share a batch, two ranks: a one-utterance batch cannot be halved (it was,
    into an empty half whose cost raised numpy's "zero-size array" error), so an empty batch makes up the
    count, and the loader makes it a placeholder that trains no key."""
    from paratune.data.loader import collate
    ranks = [MemoryBoundedSampler([100, 100, 100], [5, 5, 5], max_frames=150, shuffle=False, world_size=2,
                                  rank=r).batches(0) for r in range(2)]
    assert [len(b) for b in ranks] == [2, 2]
    assert sorted(i for batches in ranks for b in batches for i in b) == [0, 1, 2]
    assert sorted(len(b) for batches in ranks for b in batches) == [0, 1, 1, 1]
    placeholder = collate([], feature_dim=560)
    assert placeholder["keys"] == [] and tuple(placeholder["speech"].shape) == (1, 8, 560)
