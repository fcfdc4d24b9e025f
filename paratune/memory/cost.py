"""The plan's throughput model: of two checkpointing settings with which the run fits, which trains an
epoch sooner.

    epoch seconds = batches x per_step + epoch FLOPs x factor / rate

`factor` is the traced step's FLOP ratio with recomputation (`LeverSearch.factor`); `batches` the
sampler's count under the setting's fit (more checkpointing: more utterances per batch, fewer steps);
the epoch's FLOPs are its padded frames times the FLOPs per frame of the longest utterance's step.
`per_step` (seconds a step costs whatever its size: the optimizer update, launches) and `rate` (FLOP/s)
are measured: `paratune plan --calibrate` times its real steps, on the CPU or the GPU, and fits
seconds = per_step + FLOPs / rate over them (`step_timing`). Without a timed calibration the batch count
is not weighed, and the fewest checkpointed blocks (the least recomputation) are kept.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class StepTiming:
    """Measured step time: seconds = per_step + FLOPs / rate."""

    per_step: float  # seconds
    rate: float  # FLOP/s

    def seconds(self, batches: int, flops: float) -> float:
        return batches * self.per_step + flops / self.rate

    @classmethod
    def of_calibration(cls, calibration: dict | None) -> StepTiming | None:
        timing = (calibration or {}).get("timing")
        return cls(float(timing["per_step"]), float(timing["rate"])) if timing else None


def step_timing(rows) -> StepTiming | None:
    """The least-squares line seconds = per_step + FLOPs / rate through timed steps ({"flops",
    "seconds"}); None without two different FLOP counts or with a line that is not a rate."""
    flops = np.array([float(r["flops"]) for r in rows])
    seconds = np.array([float(r["seconds"]) for r in rows])
    if len(set(flops)) < 2:
        return None
    slope, intercept = np.polyfit(flops, seconds, 1)
    if slope <= 0:
        return None
    return StepTiming(per_step=max(0.0, float(intercept)), rate=float(1.0 / slope))


def seconds_text(x: float) -> str:
    return f"{x:.1f} s" if x >= 1 else f"{1000 * x:.0f} ms"


@dataclass(frozen=True)
class EpochEstimate:
    batches: int
    flops: float  # with recomputation
    seconds: float


def estimate(timing: StepTiming, sampler, frame_flops: float, factor: float) -> EpochEstimate:
    """An epoch under this sampler (epoch 0, this rank): its batches, FLOPs and predicted seconds."""
    shapes = [(len(b), sampler.padded(int(sampler.frames[b].max()))) for b in sampler.batches(0)]
    flops = sum(n * t for n, t in shapes) * frame_flops * factor
    return EpochEstimate(len(shapes), flops, timing.seconds(len(shapes), flops))


def weigh_batches(timing: StepTiming, search, options, sampler, blocks: tuple[int, int], longest, sampler_for,
                  too_big) -> tuple:
    """The fewest checkpointed blocks (`options`, `sampler`) against every block: every block wins if its
    fewer, larger batches save more per-step time than its recomputation costs. Returns the options,
    sampler and a note. Every block's fit is made only when the bound says it could win: when all of
    the fewest setting's per-step time is less than its extra recomputation, it cannot."""
    every = dataclasses.replace(options, checkpointing=blocks)
    plain = dataclasses.replace(options, checkpointing=(0, 0))
    frame_flops = search.flops(plain, *longest) / max(1, longest[0])
    few_factor, every_factor = search.factor(options, *longest), search.factor(every, *longest)
    few = estimate(timing, sampler, frame_flops, few_factor)
    extra = few.flops * (every_factor / few_factor - 1) / timing.rate
    head = (f"batch count weighed (measured: {seconds_text(timing.per_step)} per step, "
            f"{timing.rate / 1e9:.1f} GFLOP/s): ")
    if few.batches * timing.per_step <= extra:
        return options, sampler, head + (
            f"the fewest blocks' {few.batches} steps cost {seconds_text(few.batches * timing.per_step)} of per-step "
            f"time, less than every block's extra recomputation ({seconds_text(extra)}): kept")
    every_sampler = sampler_for(every)
    if too_big(every_sampler):
        return options, sampler, head + "every block would exclude utterances: kept the fewest"
    full = estimate(timing, every_sampler, frame_flops, every_factor)
    keep = few.seconds <= full.seconds
    text = (f"the fewest blocks {few.batches} batches, predicted epoch {seconds_text(few.seconds)}; every block "
            f"{full.batches} batches, {seconds_text(full.seconds)}: "
            + ("kept the fewest" if keep else "every block checkpointed, the faster epoch"))
    return (options, sampler, head + text) if keep else (every, every_sampler, head + text)
