"""Cached memory-model fits per shape range: one outlier clip never degrades other runs (issue 13, 9)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from paratune.memory.estimate import MemoryModel, fit
from paratune.memory.fit_cache import entry_key, load_or_fit
from paratune.memory.plan import Limit, fitted_limit
from paratune.memory.trace import StepOptions, StepTracer, fit_key
from paratune.memory.tracker import FIRST
from tests.model.reference import load_config, small_config

SMALL = (17, 36, 10)  # B, T, U of a short batch


@pytest.fixture(scope="module")
def config(large_dir):
    return small_config(load_config(large_dir))


def _error(model: MemoryModel, traced: int) -> float:
    return (model.peak(*SMALL) - traced) / traced


@pytest.mark.slow
def test_a_fit_to_an_outlier_range_does_not_serve_short_runs(config, tmp_path):
    options = StepOptions()
    key = fit_key(config, 100, 560, options)
    tracer = StepTracer(config, 100, 560, options)
    traced = tracer.trace(*SMALL).single
    # what one run with a very long clip left in the cache before: a single entry, named by the hash
    huge = fit(tracer, 4096, 512, key=key)
    (tmp_path / f"{key}.json").write_text(json.dumps(huge.to_dict()))
    assert _error(huge, traced) > 0.3  # the wide fit is poor at a short batch (+79 % here)
    # a damaged entry where the short range's fit goes, and a foreign one
    (tmp_path / f"{entry_key(key, 64, 16)}.json").write_text("{not json")
    (tmp_path / f"{entry_key(key, 96, 16)}.json").write_text("[1, 2]")

    short, cached = load_or_fit(config, 100, 560, options, 36, 10, holdout=0, cache=tmp_path)
    assert not cached and (short.max_frames, short.max_tokens) == (64, 16)
    assert abs(_error(short, traced)) <= 0.03, _error(short, traced)
    assert MemoryModel.from_dict(json.loads((tmp_path / f"{short.key}.json").read_text())).key == short.key

    # the wide fit still serves a run as long as it; the short one serves short runs
    again, cached = load_or_fit(config, 100, 560, options, 4000, 500, holdout=0, cache=tmp_path)
    assert cached and again.to_dict() == huge.to_dict()
    again, cached = load_or_fit(config, 100, 560, options, 40, 12, holdout=0, cache=tmp_path)
    assert cached and again.to_dict() == short.to_dict()
    again, cached = load_or_fit(config, 100, 560, options, 64, 16, holdout=0, cache=tmp_path)
    assert cached and again.key == short.key


def _model(t: int, u: int, coef=(1e5, 1e3, 10.0, 1.0, 0.0, 0.0, 0.0)) -> MemoryModel:
    """A synthetic exact quadratic fitted up to (t, u)."""
    return MemoryModel(resident={"parameters": 0, "buffers": 0, "optimizer_state": 0, "gradients": 0},
                       static_forward=0, gradients=[0], coef=[list(coef)], max_frames=t, max_tokens=u,
                       parts=[FIRST])


def test_a_prediction_past_the_range_is_never_below_its_edge():
    # a fit whose quadratic bends down past its range
    m = _model(100, 20, coef=(1e5, 1e3, 500.0, -1.0, 0.0, 0.0, 0.0))
    assert m.peak(1, 1000, 20) >= m.peak(1, 100, 20) > m.peak(1, 50, 20)
    t = np.array([50, 100, 1000, 5000])
    assert np.all(np.diff(m.peaks(np.ones(4), t, np.full(4, 20))) >= 0)
    assert m.peak(2, 80, 500) >= m.peak(2, 80, 20)


def _ranges(frames, tokens, budget):
    calls = []

    def limit_for(t, u):
        calls.append((t, u))
        return Limit(_model(t, u), budget, "cpu")
    return fitted_limit(limit_for, np.asarray(frames), np.asarray(tokens)), calls


def test_one_outlier_does_not_stretch_the_fit_range():
    frames = [30 + i % 70 for i in range(300)] + [180_032]  # 0.3-1 s clips and a 3-hour one
    tokens = [f // 4 for f in frames]
    limit, calls = _ranges(frames, tokens, budget=4e8)  # one utterance alone fits up to ~20,000 frames
    # the batches' fit reaches twice the longest clip but the top 1 %; a wider one only to past
    # what can fit alone, to tell the outlier cannot
    assert calls[0] == (198, 24) and limit.model.max_frames == 198
    assert len(calls) == 2 and 20_000 < calls[1][0] < 30_000
    assert float(limit.need(1, 180_032, 45_008)) > 4e8 and float(limit.need(1, 198, 24)) < 2e5
    assert float(limit.need(1, 20_000, 5000)) == pytest.approx(_model(1, 1).peak(1, 20_000, 5000))
    # an outlier that fits the budget alone is trained: the range grows to it
    limit, calls = _ranges(frames[:-1] + [3000], tokens[:-1] + [750], budget=4e8)
    assert calls[-1] == (3000, 750) and limit.model.max_frames == 3000
    # and only that far when a bigger one cannot fit
    limit, calls = _ranges(frames + [3000], tokens + [750], budget=4e8)
    assert limit.model.max_frames == 3000 and max(t for t, _ in calls) < 30_000
    assert limit.fits(1, 3000, 750) and not limit.fits(1, 180_032, 45_008)


@pytest.mark.slow
def test_plan_with_a_3_hour_clip_fits_short_and_excludes_it(capsys, tmp_path, monkeypatch):
    """`paratune plan` on the demo model: the 3-hour clip is excluded, and no cached fit reaches it."""
    from pathlib import Path

    import paratune
    from paratune.cli import main

    monkeypatch.setenv("PARATUNE_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(3)
    rows = [{"key": f"u{i}", "source": "x.wav", "source_len": int(n), "target_len": max(1, int(n) // 40)}
            for i, n in enumerate(rng.integers(50, 2000, 200))]  # 0.5-20 s of 10 ms frames
    rows.append({"key": "3h", "source": "x.wav", "source_len": 1_080_000, "target_len": 30_000})  # 180,000 after LFR
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    demo = Path(paratune.__file__).parent / "assets" / "demo_model"
    code = main(["plan", "--model", str(demo), "--device", "cpu", "--png", "", "--data", str(data),
                 "--budget", "160MiB", "--json", "--checkpointing", "off"])
    plan = json.loads(capsys.readouterr().out)
    assert code == 1 and [e["key"] for e in plan["excluded"]] == ["3h"]
    ranges = [json.loads(p.read_text())["max_frames"] for p in (tmp_path / "cache").glob("*.json")]
    # one fit, to twice the batches' longest clip (rounded up on the grid): 768 frames here, not 180,032
    assert ranges and max(ranges) <= 3 * max(b["max_frames"] for b in plan["batches"]), ranges
