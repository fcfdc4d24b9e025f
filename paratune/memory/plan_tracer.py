"""The tracer a plan fits and weighs levers with (`PlanTracer`): fake tensors, or real ones where a small
CPU model's step is cheaper to run than to fake."""
from __future__ import annotations

import dataclasses

import torch

from paratune.data.hotwords import HotwordSampling
from paratune.memory.trace import StepTracer, Traced, hotword_bound
from paratune.model.build import build_paraformer
from paratune.train.step import StepOptions

# A CPU step of a model up to this size, of a shape up to this many attention scores (heads x encoder blocks
# x B x T^2: a few hundred MiB), may be traced on real tensors by the plan (`PlanTracer`): the same step and
# tracker, the same bytes. It is, where that is the faster trace: a real one's time grows with the shape, a
# fake one's with the model's blocks only. One thread, two micro-batches (benchmarks/plan_trace.py, the
# demo, FSDD and small models, 0.3-0.9 M parameters: the rule picked the faster kind at 49 of 54 shapes,
# the other picks within 23 % of it), in seconds:
#   real: 0.15 + 0.3 ns per frame and parameter + 61 ns per attention score;  fake: 0.18 per block - 0.37
REAL_TRACE_PARAMETERS = 2_000_000
REAL_TRACE_SCORES = 2 ** 26
REAL_SECONDS = (0.15, 0.3e-9, 61e-9)  # fixed, per frame and parameter, per score
FAKE_SECONDS = (-0.37, 0.18)  # fixed, per block


class PlanTracer:
    """The tracer a plan fits and weighs levers with: a `StepTracer` on fake tensors, but for a CPU step of
    a model of at most REAL_TRACE_PARAMETERS, whose shapes up to REAL_TRACE_SCORES attention scores it
    traces on real tensors where that is predicted to be faster (REAL_SECONDS, FAKE_SECONDS): the same
    step and tracker, the same bytes (tests/memory checks both ways agree). Longer shapes (a 3-hour
    clip's) and GPU steps, which only fake tensors can stand for here, are traced fake."""

    def __init__(self, config: dict, vocab: int, input_size: int, options: StepOptions,
                 hotwords: HotwordSampling | None = None):
        self.config, self.vocab, self.input_size, self.options = config, vocab, input_size, options
        self.hotwords = hotword_bound(config, hotwords)
        self._fake: StepTracer | None = None
        self.real: StepTracer | None = None
        if options.device == "cpu":  # a GPU step is traced fake: no real tracer, no sizes to weigh it by
            with torch.device("meta"):
                model = build_paraformer(config, vocab, input_size)
            self._parameters = sum(p.numel() for p in model.parameters())
            self._blocks = sum(len(stack) for stack in model.block_stacks().values())
            if self._parameters <= REAL_TRACE_PARAMETERS:
                self.real = StepTracer(config, vocab, input_size, options, fake=False, hotwords=hotwords)
        conf = config.get("encoder_conf") or {}
        self._scores = int(conf.get("attention_heads", 4)) * int(conf.get("num_blocks", 1) + conf.get("tp_blocks", 0))

    def checkpoint(self, counts: tuple[int, int]) -> None:
        """`StepTracer.checkpoint` on both tracers (the fake one, if not built yet, is built so)."""
        self.options = dataclasses.replace(self.options, checkpointing=counts)
        for tracer in (self.real, self._fake):
            if tracer is not None:
                tracer.checkpoint(counts)

    @property
    def fake(self) -> StepTracer:
        if self._fake is None:
            self._fake = StepTracer(self.config, self.vocab, self.input_size, self.options, hotwords=self.hotwords)
        return self._fake

    def _for(self, batch: int, frames: int) -> StepTracer:
        if self.real is None:
            return self.fake
        scores = self._scores * batch * frames * frames
        fixed, per_frame, per_score = REAL_SECONDS
        real_s = fixed + per_frame * batch * frames * self._parameters + per_score * scores
        cheap = scores <= REAL_TRACE_SCORES and real_s <= FAKE_SECONDS[0] + FAKE_SECONDS[1] * self._blocks
        return self.real if cheap else self.fake

    def trace(self, batch: int, frames: int, tokens: int, *words: int) -> Traced:
        return self._for(batch, frames).trace(batch, frames, tokens, *words)

    def trace_many(self, shapes) -> list[Traced]:
        shapes = list(shapes)
        fake = [s for s in shapes if self._for(*s[:2]) is not self.real]
        out = dict(zip(fake, self.fake.trace_many(fake))) if fake else {}
        return [out[s] if s in out else self.real.trace(*s) for s in shapes]

    def flops(self, batch: int, frames: int, tokens: int) -> int:
        return self._for(batch, frames).flops(batch, frames, tokens)

    def resident(self) -> dict:
        return (self.real or self.fake).resident()
