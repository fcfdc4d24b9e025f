"""Fits on fake tensors that several test modules check against other steps: one per (model, options,
range, seed) in the session, made where first asked for."""
from __future__ import annotations

import copy

import pytest

from paratune.memory.estimate import MemoryModel, fit
from paratune.memory.trace import StepOptions, StepTracer, fit_key


@pytest.fixture(scope="session")
def fake_fit():
    """`fake_fit(config, vocab, input_size, options, max_frames, max_tokens, holdout=0, seed=0)`: what
    `fit(StepTracer(...), ...)` returns, a copy of it when an earlier test made it (asked for no held-out
    shapes, any fit of the same seed will do: the holdout traces do not change the fit)."""
    made: dict[tuple, MemoryModel] = {}

    def get(config: dict, vocab: int, input_size: int, options: StepOptions, max_frames: int, max_tokens: int,
            holdout: int = 0, seed: int = 0) -> MemoryModel:
        key = (fit_key(config, vocab, input_size, options), max_frames, max_tokens, seed)
        if key not in made or (holdout and len(made[key].holdout) != 2 * holdout):
            made[key] = fit(StepTracer(config, vocab, input_size, options), max_frames, max_tokens,
                            holdout=holdout, seed=seed)
        return copy.deepcopy(made[key])

    return get
