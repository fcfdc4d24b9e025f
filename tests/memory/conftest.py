"""Fits on fake tensors that several test modules check against other steps: one per (model, options,
range, seed) in the session, made where first asked for."""
from __future__ import annotations

import json

import pytest

from paratune.io import atomic_write_text
from paratune.memory.estimate import MemoryModel, fit
from paratune.memory.fit_cache import entry_key
from paratune.memory.trace import StepOptions, StepTracer, fit_key


@pytest.fixture(scope="session")
def fake_fit(fit_cache):
    """`fake_fit(config, vocab, input_size, options, max_frames, max_tokens, seed=0)`: what
    `fit(StepTracer(...), ...)` returns without held-out shapes (a fit with some may refine itself, so it
    is another fit), read from the session's fit cache (under a name `load_or_fit` does not read, so
    pytest-xdist workers share them) when an earlier test made it."""
    def get(config: dict, vocab: int, input_size: int, options: StepOptions, max_frames: int, max_tokens: int,
            seed: int = 0) -> MemoryModel:
        name = entry_key(fit_key(config, vocab, input_size, options), max_frames, max_tokens)
        path = fit_cache / f"fake-{name}.s{seed}.test"
        if path.exists():
            return MemoryModel.from_dict(json.loads(path.read_text(encoding="utf-8")))
        model = fit(StepTracer(config, vocab, input_size, options), max_frames, max_tokens, seed=seed)
        atomic_write_text(path, json.dumps(model.to_dict()))
        return model

    return get
