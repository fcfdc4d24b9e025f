"""The fitted memory model: predicted against traced and real tracked peaks, the options, the cache."""
from __future__ import annotations

import json

import pytest

from paratune.memory import estimate
from paratune.memory.estimate import MemoryModel, fit, random_shapes
from paratune.memory.fit_cache import entry_key, fit_range, load_or_fit
from paratune.memory.plan_tracer import PlanTracer
from paratune.memory.trace import StepOptions, StepTracer, fit_key
from paratune.memory.tracker import LATER, TAIL
from tests.model.reference import load_config, small_config


@pytest.fixture(scope="module")
def config(large_dir):
    return small_config(load_config(large_dir))


@pytest.mark.slow
def test_fake_trace_equals_the_real_tracked_peak(config):
    for checkpointing in (False, True):
        options = StepOptions(checkpointing=checkpointing)
        fake = StepTracer(config, 100, 560, options)
        real = StepTracer(config, 100, 560, options, fake=False)
        for shape in [(3, 120, 20), (5, 60, 9)]:
            f, r = fake.trace(*shape), real.trace(*shape)
            assert f.peak == r.peak, shape
            assert f.breakdown == r.breakdown, shape
            assert f.stages == r.stages, shape


@pytest.mark.slow
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
def test_fit_predicts_unseen_shapes_within_3_percent(config, checkpointing, fake_fit):
    """The fit as `paratune plan` makes it for a run that asks no held-out shapes (so never refined), at 8
    random shapes traced fake, each as a step of one micro-batch and as a later micro-batch, and at 3 real
    steps."""
    tracer = StepTracer(config, 100, 560, StepOptions(checkpointing=checkpointing))
    model = fake_fit(config, 100, 560, tracer.options, 200, 40)
    held = random_shapes(8, 2 * model.probes[0]["batch"], 200, 40, seed=0)
    off = [(s, later, (model.peak(*s, later) - real) / real) for s, traced in zip(held, tracer.trace_many(held))
           for later, real in ((False, traced.single), (True, traced.part_peak((LATER, TAIL))))]
    assert len(off) == 16 and max(abs(e) for *_, e in off) <= 0.03, off
    # and against real tensors in a real step, on shapes the fit never saw
    real = StepTracer(config, 100, 560, StepOptions(checkpointing=checkpointing), fake=False)
    for b, t, u in random_shapes(3, 8, 200, 40, seed=7):
        measured = real.trace_step([(b, t, u)]).peak
        assert abs(model.peak(b, t, u) - measured) <= 0.03 * measured, (b, t, u)
    resident = tracer.resident()
    assert model.static_step == resident["parameters"] + resident["optimizer_state"] + resident["gradients"]
    # AdamW: two fp32 moments per parameter, plus a scalar step count per tensor
    extra = resident["optimizer_state"] - 2 * resident["parameters"]
    assert 0 <= extra <= 8 * sum(1 for _ in tracer.model.parameters())


def test_a_fit_off_at_its_held_out_shapes_traces_the_inside_of_the_grid(config, monkeypatch):
    """Nine probes (the corners of the (T, U) grid and the extras) unless a held-out shape is more than
    REFINE_ERROR off: then the four inside the grid too, and the same held-out shapes are checked again."""
    tracer = PlanTracer(config, 100, 560, StepOptions())  # real tensors: 0.3 M parameters, short shapes
    coarse = fit(tracer, 64, 16, holdout=2)
    assert len(coarse.probes) == 9 and coarse.worst_holdout_error <= estimate.REFINE_ERROR
    monkeypatch.setattr(estimate, "REFINE_ERROR", -1.0)  # every fit is off by more
    dense = fit(tracer, 64, 16, holdout=2)
    shapes = [{(p["batch"], p["frames"], p["tokens"]) for p in m.probes} for m in (coarse, dense)]
    assert len(dense.probes) == 13 and shapes[0] < shapes[1]
    held = [[(h["batch"], h["frames"], h["tokens"], h["later"], h["peak"]) for h in m.holdout] for m in (coarse, dense)]
    assert held[0] == held[1] and len(held[0]) == 4
    assert [h["predicted"] for h in dense.holdout] == [dense.peak(h["batch"], h["frames"], h["tokens"], h["later"])
                                                       for h in dense.holdout]


def test_static_memory_follows_the_options(config):
    base = StepTracer(config, 100, 560).resident()
    sgd = StepTracer(config, 100, 560, StepOptions(optimizer="sgd")).resident()
    assert sgd["optimizer_state"] == base["parameters"]  # one momentum buffer per parameter
    frozen = StepTracer(config, 100, 560, StepOptions(frozen=("encoder.",)))
    trainable = sum(p.numel() * 4 for n, p in frozen.model.named_parameters() if not n.startswith("encoder."))
    assert frozen.resident()["gradients"] == trainable < base["gradients"]
    assert frozen.resident()["optimizer_state"] < base["optimizer_state"]


def test_ddp_traces_the_gradient_reduce(config):
    """Under DDP the step all-reduces the gradients in flat buckets after the backward: the tracer runs
    that code, so the bucket is in the tail of the step, on top of every gradient."""
    plain = StepTracer(config, 100, 560)
    ddp = StepTracer(config, 100, 560, StepOptions(ddp=True))
    p, d = plain.trace_step([(4, 100, 12)]), ddp.trace_step([(4, 100, 12)])
    grads = plain.resident()["gradients"]
    assert d.stages[0][0] == 0  # gradients do not outlive a step
    tail = d.part_peak((2,)) - p.part_peak((2,))
    # one bucket (here every gradient fits in one), less what the plain tail held at the same moment
    assert 0.99 * grads <= tail <= grads


def test_mixed_precision_lowers_the_activation_peak(config):
    shape = (8, 200, 30)
    fp32 = StepTracer(config, 100, 560).trace(*shape).peak
    for precision in ("bf16", "fp16"):
        assert StepTracer(config, 100, 560, StepOptions(precision=precision)).trace(*shape).peak < fp32


def test_cuda_steps_round_to_blocks_and_keep_no_attention_weights(config):
    cpu = StepTracer(config, 100, 560)
    cuda = StepTracer(config, 100, 560, StepOptions(device="cuda"))
    assert all(v % 512 == 0 for v in cuda.resident().values())
    assert sum(cuda.resident().values()) > sum(cpu.resident().values())
    # same frames in all, one long utterance against two short ones: the CPU's math attention keeps
    # B x h x T x T weights (twice as many for the long one); CUDA's memory-efficient kernel keeps none
    cpu_growth = cpu.trace(1, 800, 10).peak - cpu.trace(2, 400, 10).peak
    cuda_growth = cuda.trace(1, 800, 10).peak - cuda.trace(2, 400, 10).peak
    assert cpu_growth > 0 and abs(cuda_growth) < 0.1 * cpu_growth, (cpu_growth, cuda_growth)


def test_cache_reuses_a_fit_that_covers_the_range(config, tmp_path):
    options = StepOptions()
    model, cached = load_or_fit(config, 100, 560, options, 100, 20, holdout=0, cache=tmp_path)
    assert not cached
    # one file per range, named by the hash of config and options and by the range (rounded up)
    assert model.key == entry_key(fit_key(config, 100, 560, options), 128, 24) and fit_range(100, 20) == (128, 24)
    path = tmp_path / f"{model.key}.json"
    assert json.loads(path.read_text())["key"] == model.key
    again, cached = load_or_fit(config, 100, 560, options, 90, 18, holdout=0, cache=tmp_path)
    assert cached and again.to_dict() == model.to_dict()
    assert again.peak(3, 77, 9) == model.peak(3, 77, 9)
    # other options are another fit
    assert not fit_key(config, 100, 560, StepOptions(precision="bf16")).startswith(model.key.split(".")[0])
    # a range the fit does not cover is another fit, cached beside it; a damaged entry is refitted
    wide, cached = load_or_fit(config, 100, 560, options, 400, 20, holdout=0, cache=tmp_path)
    assert not cached and (tmp_path / f"{wide.key}.json").exists() and path.exists()
    path.write_text("{not json")
    fresh, cached = load_or_fit(config, 100, 560, options, 100, 20, holdout=0, cache=tmp_path)
    assert not cached and MemoryModel.from_dict(json.loads(path.read_text())).key == fresh.key == model.key


def test_unknown_options_are_refused():
    with pytest.raises(ValueError, match="fp8.*fp32, bf16, fp16"):
        StepOptions(precision="fp8")
    with pytest.raises(ValueError, match="lamb.*adamw, sgd"):
        StepOptions(optimizer="lamb")


def test_freezing_everything_is_refused(config):
    with pytest.raises(ValueError, match="no parameter to train"):
        StepTracer(config, 100, 560, StepOptions(frozen=("",)))


def test_lora_is_traced_like_a_real_step(config):
    fake = StepTracer(config, 100, 560, StepOptions(lora_r=4))
    real = StepTracer(config, 100, 560, StepOptions(lora_r=4), fake=False)
    assert fake.trace(3, 80, 9).peak == real.trace(3, 80, 9).peak
    full = StepTracer(config, 100, 560).resident()
    lora = fake.resident()
    assert lora["gradients"] < full["gradients"] / 5  # only the adapters train
    assert lora["optimizer_state"] < full["optimizer_state"] / 5 and lora["parameters"] > full["parameters"]


def test_fit_key_reads_grad_clip_as_a_number():
    """FunASR configs write `grad_clip: 5`; paratune's default is 5.0: one step, one cached fit."""
    from paratune.memory.trace import StepOptions, fit_key
    assert fit_key({}, 10, 80, StepOptions(grad_clip=5)) == fit_key({}, 10, 80, StepOptions(grad_clip=5.0))
    assert fit_key({}, 10, 80, StepOptions(grad_clip=1)) != fit_key({}, 10, 80, StepOptions(grad_clip=5.0))


@pytest.mark.slow
def test_spawned_tracers_trace_as_forked_ones(config, monkeypatch):
    """With a GPU present autograd refuses forked children: the spawned workers (each with its own
    tracer) must give the same figures as the forked ones and as tracing in this process."""
    tracer = StepTracer(config, 50, 560)
    shapes = [(2, 40, 6), (3, 24, 5)]
    here = [tracer.trace(*s) for s in shapes]
    forked = tracer.trace_many(shapes, workers=2)
    monkeypatch.setenv("PARATUNE_TRACE_SPAWN", "1")
    spawned = tracer.trace_many(shapes, workers=2)
    for a, b, c in zip(here, forked, spawned):
        assert a.peak == b.peak == c.peak and a.stages == b.stages == c.stages


def test_cuda_steps_keep_dropout_masks_as_bytes(config):
    """CUDA's fused dropout saves a bool mask, the CPU a float one: 4x the bytes in fp32. Traced the CPU
    way, a CUDA step of paraformer-large came out 21-24 % too high on an H200 (BENCHMARKS.md)."""
    import torch
    import torch.nn.functional as F

    from paratune.memory.trace import cuda_kernels

    def saved(fn):
        out = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: out.append(t) or t, lambda t: t):
            fn(torch.randn(64, 32, requires_grad=True), 0.1, True)
        return [(t.dtype, t.numel()) for t in out]

    assert (torch.float32, 64 * 32) in saved(F.dropout)
    with cuda_kernels():
        assert saved(F.dropout) == [(torch.bool, 64 * 32)]
        x = torch.randn(8)
        assert F.dropout(x, 0.1, False) is x and F.dropout(x, 0.0, True) is x
    assert F.dropout is torch.nn.functional.dropout and "fused" not in F.dropout.__name__

    # a whole step: what dropout (not attention's, which the CUDA kernel draws inside) adds to the peak
    # shrinks when traced for CUDA: its output costs the same, its mask a quarter
    def with_dropout(rate):
        return {**config, "encoder_conf": {**config["encoder_conf"], "dropout_rate": rate, "attention_dropout_rate": 0.0},
                "decoder_conf": {**config["decoder_conf"], "dropout_rate": rate, "src_attention_dropout_rate": 0.0,
                                 "self_attention_dropout_rate": 0.0}}
    added = {}
    for device in ("cpu", "cuda"):
        options = StepOptions(device=device)
        added[device] = (StepTracer(with_dropout(0.1), 100, 560, options).trace(4, 300, 20).peak
                         - StepTracer(with_dropout(0.0), 100, 560, options).trace(4, 300, 20).peak)
    assert added["cuda"] > 0 and added["cuda"] < 0.6 * added["cpu"], added
