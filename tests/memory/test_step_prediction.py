"""The memory model against real training steps: accumulation, a step split by an OOM, DDP per rank.

The model is fitted once on fake tensors (as `paratune plan` does); each check then runs real steps of
`paratune.train.step.train_step` on CPU tensors, measured by `PeakMemory`, at 10 (B, T, U) shapes the fit
never saw, and compares the peak with `MemoryModel.step_peak` of the step's micro-batch shapes
(benchmarks/step_memory.py gives the same figures), for the small and the medium config.
"""
from __future__ import annotations

import json

import pytest

from paratune.memory.calibrate import ddp_rank_peaks, spawn_ranks
from paratune.memory.estimate import random_shapes
from paratune.memory.trace import StepOptions, StepTracer
from paratune.train.guard import InjectOOM
from tests.model.reference import load_config, medium_config, small_config

INPUT = 560
SIZES = {"small": (small_config, 100), "medium": (medium_config, 2000)}  # config, vocabulary
MAX_FRAMES, MAX_TOKENS, MAX_BATCH = 200, 40, 8
N, SEED, TOL = 10, 21, 0.03


def error(predicted: int, real: int) -> float:
    return (predicted - real) / real


def unseen(n: int, seed: int, min_batch: int = 1) -> list[tuple[int, int, int]]:
    shapes = [s for s in random_shapes(10 * n, MAX_BATCH, MAX_FRAMES, MAX_TOKENS, seed) if s[0] >= min_batch]
    return shapes[:n]


def assert_within(rows, what: str) -> None:
    """rows: (micro-batch shapes, real peak, predicted peak)."""
    bad = [(shapes, real, pred, f"{100 * error(pred, real):+.2f} %") for shapes, real, pred in rows
           if abs(error(pred, real)) > TOL]
    assert not bad, f"{what}: {len(bad)} of {len(rows)} steps off by more than {TOL:.0%}: {bad}"


@pytest.fixture(scope="module", params=list(SIZES))
def sized(request, large_dir):
    """(name, config, vocabulary): the small and the medium config."""
    make, vocab = SIZES[request.param]
    return request.param, make(load_config(large_dir)), vocab


@pytest.fixture(scope="module")
def model(sized, fake_fit):
    _, config, vocab = sized
    return fake_fit(config, vocab, INPUT, StepOptions(), MAX_FRAMES, MAX_TOKENS)


@pytest.fixture(scope="module")
def ddp_model(sized, fake_fit):
    _, config, vocab = sized
    return fake_fit(config, vocab, INPUT, StepOptions(ddp=True), MAX_FRAMES, MAX_TOKENS)


@pytest.fixture(scope="module")
def real(sized):
    _, config, vocab = sized
    return StepTracer(config, vocab, INPUT, StepOptions(), fake=False)


@pytest.mark.slow
def test_the_shapes_are_unseen(model, ddp_model):
    probes = {(p["batch"], p["frames"], p["tokens"]) for m in (model, ddp_model) for p in m.probes}
    shapes = unseen(N, SEED) + unseen(N, SEED + 1, min_batch=2)
    assert len(shapes) == 2 * N and not probes & set(shapes)


@pytest.mark.slow
@pytest.mark.parametrize("accum", [1, 2], ids=["accum1", "accum2"])
def test_accumulated_steps(sized, model, real, accum):
    """Micro-batches of different shapes: the first grows the gradients as its backward runs, the later
    ones run with every gradient allocated."""
    check_accumulated(sized, model, real, accum)


@pytest.mark.slow
@pytest.mark.parametrize("sized", ["small"], indirect=True)
def test_four_accumulated_steps(sized, model, real):
    """Three later micro-batches in a row, each with every gradient allocated: on the small config (on the
    medium one the third and fourth run the code of the second, which test_accumulated_steps checks)."""
    check_accumulated(sized, model, real, 4)


def check_accumulated(sized, model, real, accum: int) -> None:
    others = iter(random_shapes(N * (accum - 1), MAX_BATCH, MAX_FRAMES, MAX_TOKENS, seed=SEED + 10 + accum))
    steps = [[s] + [next(others) for _ in range(accum - 1)] for s in unseen(N, SEED)]
    rows = [(shapes, real.trace_step(shapes).peak, model.step_peak(shapes)) for shapes in steps]
    assert_within(rows, f"accum_grad {accum}")
    if accum > 1 and sized[0] == "small":
        # the shapes make the later micro-batches matter: a model that priced every micro-batch as a
        # first one (gradients growing) would miss some steps by more than the tolerance
        as_first = [error(max(model.peak(*s) for s in shapes), r) for shapes, r, _ in rows]
        assert max(map(abs, as_first)) > TOL, as_first


def halves(shape):
    """The two micro-batches `train_step` splits a batch of `shape` into (`paratune.train.step.take`:
    rows [0:n//2] and [n//2:n], each trimmed to its own longest row; here every row is full length)."""
    b, t, u = shape
    return [(b // 2, t, u), (b - b // 2, t, u)]


@pytest.fixture(scope="module")
def split_steps(model, real):
    """Real steps whose only micro-batch runs out of memory in the encoder's forward (injected) and is
    split once: (shape, real peak, predicted peak of the halves)."""
    inject = InjectOOM(real.model, [])
    rows = []
    for shape in unseen(N, SEED + 1, min_batch=2):
        inject.steps.add(1)
        inject.count = 0  # odd: the injection is in forward
        inject.arm(1)
        peak = real.trace_step([shape]).peak
        assert not inject.armed, "the injected OOM did not fire"
        rows.append((shape, peak, model.step_peak(halves(shape))))
    # the halves' figure differs from the whole batch's: what is compared is the split step, not the batch
    assert all(model.step_peak([s]) != pred for s, _, pred in rows)
    return rows


@pytest.mark.slow
def test_split_step(split_steps):
    """The halves are views of the batch's tensors (`take`), which allocate nothing: the tracker counts
    them so, and the step is predicted as its halves."""
    assert_within([(halves(s), r, p) for s, r, p in split_steps], "split once by an OOM")


@pytest.mark.slow
def test_ddp_per_rank(sized, model, ddp_model, tmp_path):
    # and three short batches, whose peak is the gradient bucket of the all-reduce (on top of every
    # gradient) rather than the activations: there the plain step's figure would be 18-24 % low
    short = random_shapes(3, 3, 30, 5, seed=SEED + 2)
    shapes = unseen(N, SEED) + short
    name, config, vocab = sized
    spawn_ranks(ddp_rank_peaks, (2, config, vocab, INPUT, shapes, str(tmp_path)), 2, 600)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["checksum"] == ranks[1]["checksum"]  # the all-reduce ran
    for r, got in enumerate(ranks):
        assert_within([([s], peak, ddp_model.step_peak([s])) for s, peak in zip(shapes, got["peaks"])],
                      f"DDP rank {r} of 2")
    if name == "small":
        without_reduce = [error(model.step_peak([s]), p) for s, p in zip(short, ranks[0]["peaks"][N:])]
        assert min(map(abs, without_reduce)) > TOL, without_reduce
