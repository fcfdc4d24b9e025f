"""Fits on fake tensors that several test modules check against other steps: one per (model, options,
range, seed) in the session, made where first asked for."""
from __future__ import annotations

import copy
import json

import pytest

from paratune.io import atomic_write_text
from paratune.memory.estimate import MemoryModel, fit
from paratune.memory.trace import StepOptions, StepTracer, fit_key


@pytest.fixture(scope="session")
def fake_fit(fit_cache):
    """`fake_fit(config, vocab, input_size, options, max_frames, max_tokens, holdout=0, seed=0)`: what
    `fit(StepTracer(...), ...)` returns, a copy of it when an earlier test made it (asked for no held-out
    shapes, any fit of the same seed will do: the holdout traces do not change the fit). Kept in the
    session's fit cache too, under a name of its own, so that pytest-xdist workers share them."""
    made: dict[tuple, MemoryModel] = {}

    def get(config: dict, vocab: int, input_size: int, options: StepOptions, max_frames: int, max_tokens: int,
            holdout: int = 0, seed: int = 0) -> MemoryModel:
        key = (fit_key(config, vocab, input_size, options), max_frames, max_tokens, seed)
        path = fit_cache / f"fake-{key[0]}.t{max_frames}.u{max_tokens}.s{seed}.test"
        if key not in made and path.exists():
            made[key] = MemoryModel.from_dict(json.loads(path.read_text(encoding="utf-8")))
        if key not in made or (holdout and len(made[key].holdout) != 2 * holdout):
            made[key] = fit(StepTracer(config, vocab, input_size, options), max_frames, max_tokens,
                            holdout=holdout, seed=seed)
            atomic_write_text(path, json.dumps(made[key].to_dict()))
        return copy.deepcopy(made[key])

    return get
