"""The memory model on the plan's levers: partial and full activation checkpointing, 8-bit AdamW, 8-bit
AdamW with partial checkpointing, and AdamW with its state in host memory (whose host tensors, as on a GPU,
are not counted: on a CPU the tracker is told which they are).

For every lever on the small config (and on the medium config the levers two at a time: 8-bit AdamW with
partial checkpointing, host state with every block checkpointed), the model is fitted on fake tensors (as
`paratune plan` does) and real tracked steps (`StepTracer(..., fake=False)`: `train_step` on CPU tensors,
measured by `PeakMemory`) at 10 (B, T, U) shapes the fit never saw come within 3 % of its prediction. And the 8-bit
optimizer keeps about a quarter of fp32 AdamW's state: 2 bytes per parameter and a scale per block of 256,
tensors under 4,096 elements in fp32.
"""
from __future__ import annotations

import math

import pytest
import torch

from paratune.memory.estimate import random_shapes
from paratune.memory.trace import StepOptions, StepTracer
from paratune.train.step import ALL
from tests.model.reference import load_config, medium_config, small_config

INPUT = 560
SIZES = {"small": (small_config, 100), "medium": (medium_config, 2000)}  # config, vocabulary
# partial checkpointing: the first (encoder, decoder) blocks; the medium config has 12 + 6 blocks
PARTIAL = {"small": (2, 1), "medium": (6, 1)}
LEVERS = {
    "partial": lambda size: StepOptions(checkpointing=PARTIAL[size]),
    "all_blocks": lambda size: StepOptions(checkpointing=True),
    "adamw8bit": lambda size: StepOptions(optimizer="adamw8bit"),
    "adamw8bit_partial": lambda size: StepOptions(optimizer="adamw8bit", checkpointing=PARTIAL[size]),
    "adamw_offload": lambda size: StepOptions(optimizer="adamw_offload"),
    "adamw_offload_all_blocks": lambda size: StepOptions(optimizer="adamw_offload", checkpointing=True),
}
OPTIMIZER_CLASS = {"adamw": "AdamW", "adamw8bit": "AdamW8bit", "adamw_offload": "HostAdamW"}
MAX_FRAMES, MAX_TOKENS, MAX_BATCH = 200, 40, 8
N, FIT_SEED, SEED, TOL = 10, 0, 21, 0.03  # SEED: the checked shapes, never the fit's


@pytest.fixture(scope="module")
def large(large_dir):
    return load_config(large_dir)


def sized(large: dict, size: str) -> tuple[dict, int]:
    make, vocab = SIZES[size]
    return make(large), vocab


def error(predicted: int, real: int) -> float:
    return (predicted - real) / real


# at the medium size the levers are fitted two at a time (8-bit AdamW with partial checkpointing, host state
# with every block): alone, each runs the same code at the same size, which the small config's fits check,
# and test_a_medium_step_with_one_lever_is_traced_fake_as_it_runs checks each alone at the medium size
MEDIUM = ("adamw8bit_partial", "adamw_offload_all_blocks")
SINGLE = ("partial", "all_blocks", "adamw8bit", "adamw_offload")  # one lever each
CASES = [pytest.param(size, lever, id=f"{size}-{lever}", marks=pytest.mark.slow)
         for size, levers in (("small", SINGLE + ("adamw8bit_partial",)), ("medium", MEDIUM)) for lever in levers]


@pytest.mark.parametrize("size, lever", CASES)
def test_real_steps_within_3_percent_of_the_fit(large, size, lever, fake_fit):
    config, vocab = sized(large, size)
    options = LEVERS[lever](size)
    model = fake_fit(config, vocab, INPUT, options, MAX_FRAMES, MAX_TOKENS, seed=FIT_SEED)
    shapes = random_shapes(N, MAX_BATCH, MAX_FRAMES, MAX_TOKENS, seed=SEED)
    probes = {(p["batch"], p["frames"], p["tokens"]) for p in model.probes}
    assert len(set(shapes)) == N and not probes & set(shapes)  # 10 shapes, none of them fitted

    real = StepTracer(config, vocab, INPUT, options, fake=False)
    # the lever is on in the real step: the blocks it checkpoints, the optimizer it names
    enc, dec = options.checkpointing
    stacks = real.model.block_stacks()
    for stack, n in (("encoder", enc), ("decoder", dec)):
        blocks = list(stacks[stack])
        assert [b.checkpoint for b in blocks] == [i < (len(blocks) if n == -1 else n) for i in range(len(blocks))]
    assert type(real.optimizer).__name__ == OPTIMIZER_CLASS[options.optimizer]

    rows = [(s, real.trace_step([s]).peak, model.peak(*s)) for s in shapes]
    bad = [(s, r, p, f"{100 * error(p, r):+.2f} %") for s, r, p in rows if abs(error(p, r)) > TOL]
    assert not bad, f"{size} {lever}: {len(bad)} of {N} real steps off by more than {TOL:.0%}: {bad}"


@pytest.mark.slow
@pytest.mark.parametrize("lever", SINGLE)
def test_a_medium_step_with_one_lever_is_traced_fake_as_it_runs(large, lever):
    """The levers the medium config's fits check only two at a time: alone, at an unseen shape of two
    micro-batches, the fake trace the fit is made of has the real tracked step's stages, byte for byte."""
    config, vocab = sized(large, "medium")
    options = LEVERS[lever]("medium")
    shapes = [(5, 170, 33), (3, 90, 21)]
    fake = StepTracer(config, vocab, INPUT, options).trace_step(shapes)
    real = StepTracer(config, vocab, INPUT, options, fake=False).trace_step(shapes)
    assert (fake.peak, fake.stages) == (real.peak, real.stages)


def test_host_state_is_not_counted_as_device_memory(large):
    """Host-memory AdamW keeps an fp32 copy of the weights, their gradients and both moments on the host: on
    a GPU none of it is device memory. On a CPU the tracker is told which tensors those are (`host_tensors`):
    an offloaded step's peak is fp32 AdamW's less its state, and nothing of the host update is counted. (The
    fits against real steps cannot see this: both sides are counted by the same tracker.)"""
    config, vocab = sized(large, "small")
    shape = (2, 60, 10)
    plain = StepTracer(config, vocab, INPUT, StepOptions(), fake=False).trace(*shape)
    host = StepTracer(config, vocab, INPUT, StepOptions(optimizer="adamw_offload"), fake=False).trace(*shape)
    assert "optimizer state" not in host.breakdown
    assert host.peak == plain.peak - plain.breakdown["optimizer state"]


def expected_8bit_state(model: torch.nn.Module) -> int:
    """bitsandbytes' AdamW8bit: both moments in uint8 with one fp32 scale per block of 256 elements, and
    one pair of 256-entry fp32 quantization maps shared by every tensor; tensors under 4,096 elements
    keep both moments in fp32."""
    quantized = [p.numel() for p in model.parameters() if p.requires_grad and p.numel() >= 4096]
    small = [p.numel() for p in model.parameters() if p.requires_grad and p.numel() < 4096]
    return sum(2 * n + 2 * 4 * math.ceil(n / 256) for n in quantized) + 8 * sum(small) + 2 * 256 * 4


def stored_bytes(optimizer: torch.optim.Optimizer) -> int:
    """The optimizer state's bytes, each storage once (as `PeakMemory` counts them)."""
    storages = {}
    for state in optimizer.state.values():
        for t in state.values():
            if isinstance(t, torch.Tensor):
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


@pytest.mark.parametrize("size", [pytest.param("small"), pytest.param("medium", marks=pytest.mark.slow)])
def test_8bit_state_is_about_a_quarter_of_adamw(large, size):
    config, vocab = sized(large, size)
    adamw = StepTracer(config, vocab, INPUT, StepOptions())
    fp32 = adamw.resident()
    eight = StepTracer(config, vocab, INPUT, StepOptions(optimizer="adamw8bit"), fake=False)
    state = eight.resident()["optimizer_state"]
    assert eight.resident()["parameters"] == fp32["parameters"]
    # fp32 AdamW: two fp32 moments per parameter (8 bytes), a scalar step count per tensor
    extra = fp32["optimizer_state"] - 2 * fp32["parameters"]
    assert 0 <= extra <= 8 * sum(1 for _ in adamw.model.parameters())
    # what the 8-bit optimizer holds, byte for byte, once per storage
    assert stored_bytes(eight.optimizer) == expected_8bit_state(eight.model) == state
    # well under fp32 AdamW's: a quarter, plus the block scales and the small tensors kept in fp32
    assert 0.25 * fp32["optimizer_state"] < state < 0.35 * fp32["optimizer_state"], (state, fp32)


def test_which_optimizer_levers_a_plan_may_use():
    from paratune.memory.levers import choose_levers, optimizer_candidates
    from paratune.train.config import load_config as run_config

    def config(state, optimizer="adamw"):
        return run_config({}, None, [f"++memory.optimizer_state={state}", f"++optim_conf.optimizer={optimizer}"])

    assert optimizer_candidates(config("auto"), "cuda") == ["adamw", "adamw8bit", "adamw_offload"]
    assert optimizer_candidates(config("auto"), "cpu") == ["adamw", "adamw8bit"]  # host memory already
    assert optimizer_candidates(config("fp32"), "cuda") == ["adamw"]
    assert optimizer_candidates(config("auto", "sgd"), "cuda") == ["sgd"]
    assert optimizer_candidates(config("offload"), "cuda") == ["adamw_offload"]
    with pytest.raises(ValueError, match="on a CPU it is in host memory already"):
        optimizer_candidates(config("offload"), "cpu")
    with pytest.raises(ValueError, match="only AdamW"):
        optimizer_candidates(config("8bit", "sgd"), "cuda")
    # FSDP shards the parameters: neither state lever updates them (refused before anything is traced)
    for state in ("8bit", "offload"):
        with pytest.raises(ValueError, match="--fsdp"):
            choose_levers(None, StepOptions(device="cuda"), config(state), (4, 2), (100, 10), fsdp=True)


@pytest.mark.slow
def test_a_tracer_switched_to_other_blocks_traces_as_one_built_with_them(large):
    """`LeverSearch` steps through the checkpointing ladder on one tracer per optimizer (`checkpoint`): each
    setting's step is byte for byte a tracer's built with it, fake and real, back and forth."""
    from paratune.memory.levers import ladder
    config, vocab = sized(large, "small")
    settings = [ladder((3, 3))[1], (ALL, ALL), (0, 0)]
    for fake in (True, False):
        switched = StepTracer(config, vocab, INPUT, StepOptions(optimizer="adamw8bit"), fake=fake)
        for counts in settings:
            switched.checkpoint(counts)
            built = StepTracer(config, vocab, INPUT, StepOptions(optimizer="adamw8bit", checkpointing=counts), fake=fake)
            a, b = switched.trace(3, 120, 20), built.trace(3, 120, 20)
            assert (a.peak, a.stages, a.breakdown) == (b.peak, b.stages, b.breakdown), (fake, counts)
            assert switched.options == built.options
