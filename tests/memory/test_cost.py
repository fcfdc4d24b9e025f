"""The plan's throughput model (`paratune.memory.cost`): measured step time weighs the batch count against
recomputation. With little per-step time the fewest checkpointed blocks are kept without fitting every
block; with much, every block's fewer, larger batches win and the run is planned with them; the plan says
which, with its figures. The timing comes from `paratune plan --calibrate` (tests/memory/test_plan.py
checks a real CPU calibration stores one)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import paratune
from paratune.data.lengths import read_lengths, write_synthetic_manifest
from paratune.memory.cost import StepTiming, step_timing
from paratune.memory.fit_cache import load_or_fit
from paratune.memory.plan import plan_run
from paratune.memory.trace import StepOptions
from paratune.modeldir import read_model_dir
from paratune.train.config import load_config

DEMO = Path(paratune.__file__).parent / "assets" / "demo_model"
LONG_FRAMES, LONG_TOKENS = 3000, 120  # source_len (10 ms frames) and tokens of the one long utterance


def test_step_timing_is_the_line_through_timed_steps():
    rows = [{"flops": f, "seconds": 0.25 + f / 2e9} for f in (1e9, 3e9, 8e9)]
    timing = step_timing(rows)
    assert timing.per_step == pytest.approx(0.25) and timing.rate == pytest.approx(2e9)
    assert timing.seconds(10, 4e9) == pytest.approx(10 * 0.25 + 2.0)
    assert step_timing(rows[:1]) is None  # one FLOP count: no line
    assert step_timing([{"flops": 1e9, "seconds": 2.0}, {"flops": 2e9, "seconds": 1.0}]) is None  # not a rate
    # a negative intercept (noise) is no time at all, not time given back
    assert step_timing([{"flops": f, "seconds": f / 1e9 - 0.01} for f in (1e9, 2e9)]).per_step == 0.0
    assert StepTiming.of_calibration({"timing": {"per_step": 0.5, "rate": 1e9}}) == StepTiming(0.5, 1e9)
    assert StepTiming.of_calibration({"timing": None}) is None and StepTiming.of_calibration(None) is None


@pytest.fixture
def planned(tmp_path, monkeypatch):
    """plan_run on many short utterances and one that fits only with some blocks checkpointed."""
    spec = read_model_dir(DEMO)
    manifest = write_synthetic_manifest(tmp_path / "train.jsonl", 300, seed=5, max_s=4.0)
    with open(manifest, "a", encoding="utf-8") as f:
        f.write(json.dumps({"key": "long", "source": "x.wav", "source_len": LONG_FRAMES,
                            "target_len": LONG_TOKENS}) + "\n")
    fe = spec.frontend
    lengths, _ = read_lengths([manifest], spec.tokenizer, fe.lfr_n, fe.frame_shift, fe.frame_length)
    t, u = -(-(LONG_FRAMES - 2) // 6), LONG_TOKENS
    need = [load_or_fit(spec.config, spec.vocab_size, spec.input_size, StepOptions(checkpointing=c), t, u,
                        holdout=0)[0].peak(1, t, u) for c in (False, True)]
    budget = (need[0] + need[1]) // 2  # the long one fits only with checkpointing
    config = load_config(spec.config, None, [])
    return lambda timing: plan_run(spec, lengths, config, budget, device="cpu", timing=timing)


@pytest.mark.slow
def test_the_batch_count_is_weighed_with_measured_step_time(planned):
    unweighed = planned(None)  # no calibration: the fewest blocks, nothing said of batches
    fewest = unweighed.options.checkpointing
    assert unweighed.options.checkpointed and fewest != unweighed.blocks  # some blocks, not all
    assert not any(n.startswith("batch count weighed") for n in unweighed.notes)

    # little per-step time: the fewest blocks' steps cost less than every block's recomputation
    cheap = planned(StepTiming(per_step=1e-6, rate=1e9))
    assert cheap.options.checkpointing == fewest and len(cheap.sampler) == len(unweighed.sampler)
    note = next(n for n in cheap.notes if n.startswith("batch count weighed"))
    assert "kept" in note and "activation checkpointing of" in " ".join(cheap.notes)

    # much per-step time: every block's fewer, larger batches are the faster epoch
    costly = planned(StepTiming(per_step=100.0, rate=1e9))
    assert costly.options.checkpointing == costly.blocks and len(costly.sampler) < len(unweighed.sampler)
    note = next(n for n in costly.notes if n.startswith("batch count weighed"))
    assert f"{len(unweighed.sampler)} batches" in note and f"{len(costly.sampler)} batches" in note
    assert "every block checkpointed, the faster epoch" in note
    assert not any(n.startswith("activation checkpointing of") and "the fewest" in n for n in costly.notes)
    assert not costly.sampler.excluded(0)
