"""The memory model's tracer and fit (issue 3, in progress)."""
from __future__ import annotations

import pytest

from paratune.memory.estimate import fit
from paratune.memory.trace import StepOptions, StepTracer
from tests.model.reference import load_config, small_config


@pytest.fixture(scope="module")
def config(large_dir):
    return small_config(load_config(large_dir))


@pytest.mark.parametrize("checkpointing", [False, True])
def test_fake_trace_equals_the_real_tracked_peak(config, checkpointing):
    options = StepOptions(checkpointing=checkpointing)
    fake = StepTracer(config, 100, 560, options)
    real = StepTracer(config, 100, 560, options, fake=False)
    for shape in [(3, 120, 20), (5, 60, 9)]:
        f, r = fake.peak(*shape), real.peak(*shape)
        assert f.peak == r.peak, shape
        assert f.breakdown == r.breakdown, shape


@pytest.mark.slow
def test_fit_predicts_unseen_shapes_within_3_percent(config):
    model = fit(StepTracer(config, 100, 560), max_frames=200, max_tokens=40, holdout=6, seed=1)
    assert len(model.holdout) == 6
    assert model.worst_holdout_error <= 0.03, model.holdout
    resident = StepTracer(config, 100, 560).resident()
    assert model.static_step == resident["parameters"] + resident["optimizer_state"] + resident["gradients"]
    # AdamW: two fp32 moments per parameter, plus a scalar step count per tensor
    extra = resident["optimizer_state"] - 2 * resident["parameters"]
    assert 0 <= extra <= 8 * sum(1 for _ in StepTracer(config, 100, 560).model.parameters())


def test_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="fp8.*fp32, bf16, fp16"):
        StepOptions(precision="fp8")
