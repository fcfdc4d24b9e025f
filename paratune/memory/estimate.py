"""A fitted model of a training step's peak memory as a function of the batch shape.

    peak(B, T, U) = max(S_step, S_fwd + c0 + B * (a*T + b*T^2 + c*U + d*T*U + e*U^2))

B utterances, T input frames (after LFR), U target tokens. S_step = parameters + gradients +
optimizer state, the footprint of the optimizer step, and S_fwd = parameters + optimizer state, what is
resident when a forward starts (the step drops gradients): both are counted exactly, not fitted. The
bracket is what forward and backward add: activations, linear in B because each utterance's
activations are its own, with T (per-frame layers), T^2 (encoder self-attention scores), U, T*U
(source attention, CIF weights) and U^2 (decoder) terms; c0 covers the gradients backward has
allocated by the time activations are freed. It is fitted by least squares to traced probe shapes
large enough that activations, not the optimizer step, set the peak.
"""
from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, field

import numpy as np

from paratune.memory.trace import StepOptions, StepTracer

TERMS = ("B*T", "B*T^2", "B*U", "B*T*U", "B*U^2")


def _features(b: int, t: int, u: int) -> list[float]:
    return [1.0, b * t, b * t * t, b * u, b * t * u, b * u * u]


@dataclass
class MemoryModel:
    static_step: int
    static_forward: int
    coef: list[float]
    probes: list[dict] = field(default_factory=list)
    holdout: list[dict] = field(default_factory=list)

    def activation(self, b: int, t: int, u: int) -> float:
        return float(np.dot(self.coef, _features(b, t, u)))

    def peak(self, b: int, t: int, u: int) -> int:
        return int(round(max(self.static_step, self.static_forward + self.activation(b, t, u))))

    @property
    def worst_holdout_error(self) -> float:
        return max((abs(h["error"]) for h in self.holdout), default=float("nan"))

    def to_dict(self) -> dict:
        return {"static_step": self.static_step, "static_forward": self.static_forward, "coef": self.coef,
                "terms": ["1", *TERMS], "probes": self.probes, "holdout": self.holdout}

    @classmethod
    def from_dict(cls, d: dict) -> "MemoryModel":
        return cls(d["static_step"], d["static_forward"], list(d["coef"]), d.get("probes", []), d.get("holdout", []))


def probe_shapes(max_frames: int, max_tokens: int, batch: int) -> list[tuple[int, int, int]]:
    """A small design over (T, U) at two batch sizes: enough spread to separate the six terms."""
    ts = sorted({max(8, max_frames // 4), max(8, max_frames // 2), max_frames})
    us = sorted({max(1, max_tokens // 4), max_tokens})
    shapes = [(batch, t, u) for t, u in itertools.product(ts, us)]
    shapes += [(2 * batch, ts[1], us[0]), (2 * batch, ts[-1], us[-1])]
    return shapes


def fit(tracer: StepTracer, max_frames: int, max_tokens: int, holdout: int = 0, seed: int = 0) -> MemoryModel:
    """Trace probes, fit, and (optionally) report the error on `holdout` random shapes not fitted."""
    resident = tracer.resident()
    static_forward = resident["parameters"] + resident["optimizer_state"]
    static_step = static_forward + resident["gradients"]

    # choose a batch size at which activations clearly dominate the optimizer step's footprint
    batch = 1
    while batch < 4096:
        if tracer.peak(batch, max_frames // 2, max(1, max_tokens // 4)).peak > 1.3 * static_step:
            break
        batch *= 2
    rows, targets, probes = [], [], []
    for b, t, u in probe_shapes(max_frames, max_tokens, batch):
        p = tracer.peak(b, t, u).peak
        probes.append({"batch": b, "frames": t, "tokens": u, "peak": p})
        rows.append(_features(b, t, u))
        targets.append(p - static_forward)
    coef, *_ = np.linalg.lstsq(np.array(rows), np.array(targets, dtype=float), rcond=None)
    model = MemoryModel(static_step, static_forward, [float(c) for c in coef], probes)

    rng = random.Random(seed)
    for _ in range(holdout):
        t = rng.randint(8, max_frames)
        u = rng.randint(1, max(1, min(max_tokens, t)))
        b = rng.randint(1, 2 * batch)
        real = tracer.peak(b, t, u).peak
        pred = model.peak(b, t, u)
        model.holdout.append({"batch": b, "frames": t, "tokens": u, "peak": real, "predicted": pred,
                              "error": (pred - real) / real})
    return model


def fit_for(config: dict, vocab: int, input_size: int, options: StepOptions, max_frames: int, max_tokens: int,
            holdout: int = 0) -> MemoryModel:
    return fit(StepTracer(config, vocab, input_size, options), max_frames, max_tokens, holdout)
