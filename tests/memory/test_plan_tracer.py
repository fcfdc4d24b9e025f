"""The plan's tracer (`PlanTracer`): real tensors where a small CPU model's step is cheaper to run than to
fake, with the same bytes; fake tensors elsewhere."""
from __future__ import annotations

import pytest
import torch

from paratune.memory import plan_tracer
from paratune.memory.plan_tracer import PlanTracer
from paratune.memory.trace import StepOptions, StepTracer
from tests.model.reference import load_config, small_config


@pytest.fixture(scope="module")
def config(large_dir):
    return small_config(load_config(large_dir))


def test_a_plan_traces_a_small_cpu_step_on_real_tensors_with_the_same_bytes(config, monkeypatch):
    shapes = [(3, 120, 20), (1, 200, 40)]
    tracer = PlanTracer(config, 100, 560, StepOptions(checkpointing=True))
    assert tracer.real is not None  # 0.3 M parameters, a CPU step
    state = torch.random.get_rng_state()
    real = tracer.trace_many(shapes)
    assert tracer._fake is None  # no fake tracer was needed
    # real dropout and weights draw random numbers: the run's own stream is left as it was
    assert torch.equal(torch.random.get_rng_state(), state)
    fake = StepTracer(config, 100, 560, StepOptions(checkpointing=True)).trace_many(shapes)
    assert [r.stages for r in real] == [f.stages for f in fake] and [r.peak for r in real] == [f.peak for f in fake]
    assert tracer.resident() == tracer.fake.resident()
    # a shape a real step computes for longer than a fake one takes is traced fake, though it fits the bound
    assert tracer._scores * 64 * 200 * 200 <= plan_tracer.REAL_TRACE_SCORES and tracer._for(64, 200) is tracer.fake
    # a shape past the real-trace bound (a long clip) is traced fake, and so is every GPU step
    monkeypatch.setattr(plan_tracer, "REAL_TRACE_SCORES", 4 * 3 * 120 * 120)
    assert tracer._for(1, 120) is tracer.real and tracer._for(1, 121) is tracer.fake
    assert tracer.trace_many(shapes)[1].stages == fake[1].stages
    assert PlanTracer(config, 100, 560, StepOptions(device="cuda")).real is None
