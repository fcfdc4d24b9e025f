"""PeakMemory, the tracker the memory model is fitted with, against PyTorch's MemTracker."""
from __future__ import annotations

import pytest
import torch
from torch.distributed._tools.mem_tracker import MemTracker

from paratune.memory.trace import StepOptions, StepTracer, fake_batch
from paratune.memory.tracker import PeakMemory
from tests.model.reference import load_config, small_config


@pytest.fixture(scope="module")
def config(large_dir):
    return small_config(load_config(large_dir))


def _memtracker_peak(tracer, shape):
    with tracer.mode:
        data = fake_batch(*shape, tracer.input_size, tracer.vocab)
        if not isinstance(tracer.mode, torch._subclasses.fake_tensor.FakeTensorMode):
            data["speech"] = torch.randn_like(data["speech"])
        tracker = MemTracker()
        # the batch exists before the step: MemTracker counts it from the start (PeakMemory not at all)
        tracker.track_external(tracer.model, tracer.optimizer, *data.values())
        with tracker:
            tracer._step([data])  # one micro-batch: MemTracker follows one forward per step only
        return int(next(iter(tracker.get_tracker_snapshot("peak").values()))["Total"])


@pytest.mark.parametrize("options", [StepOptions(), StepOptions(checkpointing=True),
                                     StepOptions(precision="bf16", optimizer="sgd")], ids=str)
@pytest.mark.slow
@pytest.mark.parametrize("fake", [True, False], ids=["fake", "real"])
def test_peak_equals_memtracker(config, options, fake):
    tracer = StepTracer(config, 100, 560, options, fake=fake)
    for shape in [(3, 120, 20), (5, 60, 9)]:
        ours = tracer.trace_step([shape])
        inputs = sum(t.untyped_storage().nbytes() for t in fake_batch(*shape, 560, 100).values())
        assert ours.peak == _memtracker_peak(tracer, shape) - inputs, shape
        assert sum(ours.breakdown.values()) == ours.peak
        assert ours.breakdown["parameters"] == tracer.resident()["parameters"]


def test_stages_follow_the_gradients(config):
    tracer = StepTracer(config, 100, 560)
    traced = tracer.trace(4, 100, 12)
    grads = [g for g, _, _ in traced.stages]
    assert grads[0] == 0  # forward: no gradients yet (the step frees them)
    assert max(grads) == tracer.resident()["gradients"]  # every parameter's gradient at the optimizer step
    assert max(a + g for g, a, _ in traced.stages) == traced.peak
    # the second micro-batch runs with every gradient allocated: its stages are the step's peak
    parts = [p for _, _, p in traced.stages]
    assert parts[1] == 0 and 1 in parts and parts[-1] == 2
    assert traced.part_peak((1,)) == traced.peak > traced.single
    # the tags name the top-level modules that made the activations
    assert any(k.startswith("forward: encoder") for k in traced.breakdown)


def test_tracker_counts_frees():
    x = torch.zeros(1000)
    with PeakMemory(torch.nn.Linear(1, 1)) as m:
        a = x + 1  # 4000 bytes
        del a
        b = x * 2  # another 4000: the peak stays one tensor above the parameters
    assert m.peak == 8 + 4000
    assert m.current == 8 + 4000 and b.numel() == 1000
