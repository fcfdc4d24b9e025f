"""A fitted model of a training step's peak memory as a function of the batch shape.

B utterances, T input frames (after LFR), U target tokens. During a step the live bytes are

    resident (parameters, optimizer state)  +  gradients made so far  +  activations and temporaries.

The gradients made so far depend only on how far backward has got, not on the batch shape: autograd
visits the same nodes in the same order for every shape. So the step falls into stages j, one per
gradient figure G_j, and within a stage the most activation bytes ever live is fitted as

    A_j(B, T, U) = c0 + B * (c1 + a*T + b*T^2 + c*U + d*T*U + e*U^2)

(per-frame layers: T; encoder self-attention scores: T^2; decoder: U and U^2; source attention and CIF
weights: T*U; c1 per utterance, c0 for what every batch has). The prediction is

    peak(B, T, U) = resident + max_j (G_j + A_j(B, T, U)).

The probes are steps of two micro-batches, and each stage belongs to a part: the first micro-batch's
forward and backward, a later one's (every gradient already allocated, as in accumulation and in the
halves of a split batch), or the tail (gradient reduce, optimizer). A step of one micro-batch peaks at
the most of its first and tail stages; a later micro-batch at the most of its later and tail stages.

A SeACo-Paraformer's step also depends on its N hotword rows of L tokens: the bias encoder's LSTM runs
over N x L, and the seaco decoder's source attention over N hotword vectors per utterance (keys and
values B x N, weights B x U x N). Its stages have four more terms, N, N*L, B*N and B*N*U; N and L are
inputs, not fitted: by default the most the sampler can draw for (B, U) (`hotword_shape`), so the
prediction is an upper bound over the hotword draws. N grows with B (up to 2B + 1), so B*N is a B^2
term that takes a batch of many short utterances far past the [sos]-only step (+39 % at 128 x 40 frames
at SeACo medium); the probes vary N at fixed shapes to separate those terms.

A single quadratic fitted to the peak itself is the special case of one stage. It is good when the
peak always falls at the same point of the step, but activation checkpointing makes the peak move
with the shape (early in backward for long batches, late for short ones, when most gradients exist):
the single fit was 4 % off on the small config where the staged one is within 0.5 %. Resident bytes and
gradient figures are counted exactly, not fitted; the stage fits come from traced probe shapes.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import random
from dataclasses import dataclass, field

import numpy as np

from paratune.data.hotwords import HotwordSampling
from paratune.memory.trace import StepTracer, hotword_shape
from paratune.memory.tracker import FIRST, LATER, TAIL

SINGLE, ACCUMULATED = (FIRST, TAIL), (LATER, TAIL)  # the parts that bound each kind of micro-batch

TERMS = ("1", "B", "B*T", "B*T^2", "B*U", "B*T*U", "B*U^2")
HOTWORD_TERMS = ("N", "N*L", "B*N", "B*N*U")  # SeACo: N hotword rows of L tokens


def features(b, t, u, n=None, l=None) -> np.ndarray:  # noqa: E741 - L, as in the docstring
    """Rows of the design matrix, for scalars or arrays of equal length; with `n` and `l` (SeACo's
    hotword rows and tokens) the HOTWORD_TERMS too."""
    b, t, u = (np.asarray(x, dtype=float) for x in (b, t, u))
    cols = [np.ones_like(b), b, b * t, b * t * t, b * u, b * t * u, b * u * u]
    if n is not None:
        n, l = np.asarray(n, dtype=float), np.asarray(l, dtype=float)
        cols += [n, n * l, b * n, b * n * u]
    return np.stack(np.broadcast_arrays(*cols), axis=-1)


def hotword_shapes(b, u, sampling: dict) -> tuple[np.ndarray, np.ndarray]:
    """`paratune.memory.trace.hotword_shape` for arrays: the most hotword rows N and tokens L the
    sampling (a HotwordSampling's fields) can give batches of B utterances of U tokens."""
    b, u = np.asarray(b, dtype=float), np.asarray(u, dtype=float)
    lo, hi = sampling["min_length"], sampling["max_length"]
    some = (u >= lo) & (sampling["sample_rate"] > 0)
    per = np.where((sampling["double_rate"] > 0) & (u > hi + lo + 2), 2.0, 1.0)
    return np.where(some, per * b + 1, 1.0), np.where(some, np.maximum(1.0, np.minimum(hi, u)), 1.0)


@dataclass
class MemoryModel:
    resident: dict  # bytes: parameters, buffers, optimizer_state, gradients (full set)
    static_forward: int  # resident when a step starts
    gradients: list[int]  # G_j, one per kept stage
    coef: list[list[float]]  # A_j's coefficients over TERMS, one row per kept stage
    max_frames: int = 0  # the probes covered T up to this and U up to max_tokens
    max_tokens: int = 0
    options: dict = field(default_factory=dict)
    key: str = ""  # names the cached fit: fit_key's hash of config and options, and the range
    probes: list[dict] = field(default_factory=list)
    holdout: list[dict] = field(default_factory=list)
    calibration: dict | None = None
    parts: list[int] = field(default_factory=list)  # per kept stage: FIRST, LATER or TAIL
    # SeACo: the hotword sampling (HotwordSampling's fields) whose most rows and tokens a shape is
    # predicted with; the coefficients then run over TERMS + HOTWORD_TERMS. None: no hotwords
    hotwords: dict | None = None
    # a fit over a wider range that predicts the shapes past this one's (the plan's outliers); not stored
    beyond: MemoryModel | None = field(default=None, repr=False, compare=False)

    @property
    def static_step(self) -> int:
        """The least any step needs: resident bytes plus every gradient (at the optimizer step)."""
        return self.static_forward + self.resident["gradients"]

    @property
    def terms(self) -> tuple[str, ...]:
        return TERMS + (HOTWORD_TERMS if self.hotwords else ())

    def words(self, b, u) -> tuple[np.ndarray, np.ndarray] | None:
        """SeACo: the most hotword rows N and tokens L the sampling can give (B, U) batches; else None."""
        return hotword_shapes(b, u, self.hotwords) if self.hotwords else None

    def peaks(self, b, t, u, later: bool = False, words=None) -> np.ndarray:
        """Predicted peak bytes for arrays of batch shapes (vectorised): of a step of one micro-batch,
        or (`later`) of a micro-batch after the first of an accumulated or split step. SeACo: with the
        most hotwords the sampling can draw for each shape (an upper bound over the draws), or with
        `words` = (N, L). Past the fitted range the quadratic is an extrapolation: the prediction is
        never below the range's edge, which the step's true peak (growing with T and U) is not below
        either; `beyond`, where set, predicts there."""
        if self.hotwords and words is None:
            words = self.words(b, u)
        raw = self._peaks(b, t, u, later, words)
        t, u = np.asarray(t), np.asarray(u)
        past = (t > self.max_frames) | (u > self.max_tokens)
        if not self.max_frames or not past.any():
            return raw
        edge = self._peaks(b, np.minimum(t, self.max_frames), np.minimum(u, self.max_tokens), later, words)
        other = raw if self.beyond is None else self.beyond.peaks(b, t, u, later, words)
        out = np.where(past, np.maximum(edge, other), raw)
        return float(out) if out.ndim == 0 else out

    def _peaks(self, b, t, u, later: bool, words=None) -> np.ndarray:
        f = features(b, t, u, *(words if self.hotwords else (None, None)))
        use = [j for j, p in enumerate(self.parts) if p in (ACCUMULATED if later else SINGLE)]
        coef, grads = np.asarray(self.coef)[use].T, np.asarray(self.gradients, dtype=float)[use]
        if f.ndim == 1:
            return self.static_forward + max(float((f @ coef + grads).max()), 0.0)
        out = np.empty(len(f))
        for i in range(0, len(f), 4096):  # bounded memory for many shapes times many stages
            out[i:i + 4096] = (f[i:i + 4096] @ coef + grads).max(axis=1)
        return self.static_forward + np.maximum(out, 0.0)

    def peak(self, b: int, t: int, u: int, later: bool = False, words=None) -> int:
        return int(round(float(self.peaks(b, t, u, later, words))))

    def step_peak(self, shapes) -> int:
        """A step whose micro-batches have these (B, T, U) (SeACo: or (B, T, U, N, L)), in order
        (accumulation, or a split)."""
        return max(self.peak(*s[:3], later=i > 0, words=tuple(s[3:]) or None) for i, s in enumerate(shapes))

    @property
    def worst_holdout_error(self) -> float:
        return max((abs(h["error"]) for h in self.holdout), default=float("nan"))

    def covers(self, max_frames: int, max_tokens: int) -> bool:
        return max_frames <= self.max_frames and max_tokens <= self.max_tokens

    def to_dict(self) -> dict:
        return {"format": 1, "key": self.key, "options": self.options, "terms": list(self.terms),
                "resident": self.resident, "static_forward": self.static_forward,
                "gradients": self.gradients, "coef": self.coef, "max_frames": self.max_frames,
                "max_tokens": self.max_tokens, "probes": self.probes, "holdout": self.holdout,
                "calibration": self.calibration, "parts": self.parts, "hotwords": self.hotwords}

    @classmethod
    def from_dict(cls, d: dict) -> "MemoryModel":
        hotwords = d.get("hotwords")
        if d.get("format") != 1 or list(d.get("terms", [])) != list(TERMS + (HOTWORD_TERMS if hotwords else ())):
            raise ValueError("not a paratune memory model (format 1)")
        if hotwords is not None:
            hotwords = dataclasses.asdict(HotwordSampling(**hotwords))  # its fields, or a TypeError
        return cls(resident=d["resident"], static_forward=d["static_forward"], gradients=list(d["gradients"]),
                   coef=[list(c) for c in d["coef"]], max_frames=d["max_frames"], max_tokens=d["max_tokens"],
                   options=d.get("options", {}), key=d.get("key", ""), probes=d.get("probes", []),
                   holdout=d.get("holdout", []), calibration=d.get("calibration"), parts=list(d["parts"]),
                   hotwords=hotwords)


def first_probe(max_frames: int, max_tokens: int, sampling: HotwordSampling | None = None) -> tuple[int, ...]:
    """One utterance of half the frames and a quarter of the tokens (SeACo: with the [sos] entry alone):
    the probe traced first, whose activations set the batch size of the others (`fit`)."""
    return (1, max(8, max_frames // 2), max(1, min(max_tokens // 4, max_frames // 2)), *((1, 1) if sampling else ()))


def probe_shapes(max_frames: int, max_tokens: int, batch: int, dense: bool = False) -> list[tuple[int, int, int]]:
    """A design over (T, U) at four batch sizes that separates the seven terms: short and long T and U,
    so that no planned shape is far outside the probes (extrapolating the quadratic to T a tenth of the
    shortest probe was 3 % off), and the first probe (`first_probe`). Tokens never exceed frames (CIF
    emits at most one token per frame). `dense` adds the inside of the 3 x 3 (T, U) grid: the fit traces
    them only when its held-out shapes say the corners are not enough (without them the worst error of
    six small and medium fits at 22 unseen shapes moved by -0.3 to +0.4 points: benchmarks/fit_design.py)."""
    ts = sorted({max(8, max_frames // 10), max(8, max_frames // 3), max_frames})
    us = sorted({max(1, max_tokens // 10), max(1, max_tokens // 3), max_tokens})
    corners = {(ts[0], us[0]), (ts[0], us[-1]), (ts[1], us[-1]), (ts[-1], us[0]), (ts[-1], us[-1])}
    grid = [(t, u) for t, u in itertools.product(ts, us) if dense or (t, u) in corners]
    shapes = [(batch, t, min(u, t)) for t, u in grid]
    shapes += [(2 * batch, ts[1], min(us[1], ts[1])), (2 * batch, ts[-1], us[-1]),
               (max(1, batch // 2), max(8, 2 * max_frames // 3), min(max(1, max_tokens // 2), max_frames)),
               first_probe(max_frames, max_tokens)]
    return list(dict.fromkeys(shapes))


def hotword_probes(max_frames: int, max_tokens: int, batch: int, sampling: HotwordSampling):
    """SeACo's extra probes, (B, T, U, N, L): at three (B, U), short and long U at the probe batch and long U
    at four times it (enough to separate N, N*L, B*N and B*N*U), the [sos] entry alone, the most hotwords
    the sampling can draw, and about half as many rows of half as many tokens. The hotword tensors do not
    depend on T: the probes are short. (Two more (B, U), at U/3, moved the small SeACo config's error at
    its batches' own hotwords at 11 unseen shapes by at most 0.07 points: benchmarks/fit_design.py.)"""
    t = max(8, max_frames // 10)
    out = []
    for b, u in [(batch, max(1, max_tokens // 10)), (batch, max_tokens), (4 * batch, max_tokens)]:
        u = min(u, t)
        n, width = hotword_shape(b, u, sampling)
        out += [(b, t, u, 1, 1), (b, t, u, n, width), (b, t, u, (n + 1) // 2, max(1, (width + 1) // 2))]
    return list(dict.fromkeys(out))


def _hotword_coef(shapes: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Each stage's HOTWORD_TERMS coefficients, from the probes' bytes over the same (B, T, U) with the
    [sos] entry alone: what the hotwords add is fitted apart from everything else, so that a stage the
    hotword tensors never live in gets none (an error there grows as B x N, up to 2 B^2)."""
    index = {tuple(s): i for i, s in enumerate(shapes.tolist())}
    rows, diffs = [], []
    for i, (b, t, u, n, l) in enumerate(shapes.tolist()):  # noqa: E741
        ref = index.get((b, t, u, 1.0, 1.0))
        if ref is not None and (n, l) != (1.0, 1.0):
            rows.append(features(b, t, u, n, l)[len(TERMS):] - features(b, t, u, 1, 1)[len(TERMS):])
            diffs.append(table[i] - table[ref])
    coef, *_ = np.linalg.lstsq(np.array(rows), np.array(diffs), rcond=None)
    return coef.T  # (stages, 4)


def _stage_table(traces) -> tuple[list[tuple[int, int]], np.ndarray]:
    """Per probe, the activation bytes of each stage, and each stage's (gradient bytes, part). Stages
    are matched by position when every probe went through the same gradient figures and parts in the
    same order (the normal case), else by (figure, part)."""
    seqs = [[(g, p) for g, _, p in tr.stages] for tr in traces]
    if all(s == seqs[0] for s in seqs):
        return seqs[0], np.array([[a for _, a, _ in tr.stages] for tr in traces], dtype=float)
    stages = sorted({s for seq in seqs for s in seq})
    table = np.zeros((len(traces), len(stages)))
    index = {s: i for i, s in enumerate(stages)}
    for row, tr in enumerate(traces):
        for g, a, p in tr.stages:
            table[row, index[(g, p)]] = max(table[row, index[(g, p)]], a)
    return stages, table


def _keep_stages(stages, coef, shapes, rel: float = 2e-3) -> list[int]:
    """Stages that come within `rel` of the highest of their kind of micro-batch at some shape: the
    rest can never set a peak."""
    values = features(*shapes.T) @ coef.T + np.asarray([g for g, _ in stages], dtype=float)
    keep = set()
    for kind in (SINGLE, ACCUMULATED):
        cols = [j for j, (_, p) in enumerate(stages) if p in kind]
        if not cols:
            continue
        top = values[:, cols].max(axis=1, keepdims=True)
        near = values[:, cols] >= top - rel * np.abs(top)
        keep |= {cols[k] for k in range(len(cols)) if near[:, k].any()}
    return sorted(keep)


# A fit whose held-out shapes are off by more than this traces the inside of its (T, U) grid too
REFINE_ERROR = 0.02


def fit(tracer: StepTracer, max_frames: int, max_tokens: int, holdout: int = 0, seed: int = 0,
        key: str = "") -> MemoryModel:
    """Trace probes, fit the stages, and report the error on `holdout` random shapes not fitted (the
    step of one micro-batch, and a later micro-batch). Where that error is over REFINE_ERROR, the
    denser design is traced and fitted, and the same shapes are checked again."""
    max_tokens = max(1, min(max_tokens, max_frames))
    resident = tracer.resident()
    sampling = tracer.hotwords  # SeACo: shapes are (B, T, U, N, L)

    first = first_probe(max_frames, max_tokens, sampling)
    traced = {first: tracer.trace(*first)}
    batch = probe_batch(resident, traced[first])

    def fitted(dense: bool) -> MemoryModel:
        shapes = probe_shapes(max_frames, max_tokens, batch, dense)
        if sampling is not None:  # the base terms with the [sos] entry alone, the hotword terms from the rest
            shapes = list(dict.fromkeys([(*s, 1, 1) for s in shapes]
                                        + hotword_probes(max_frames, max_tokens, batch, sampling)))
        new = [s for s in shapes if s not in traced]
        traced.update(zip(new, tracer.trace_many(new)))
        return _fitted(tracer, resident, shapes, [traced[s] for s in shapes], (batch, max_frames, max_tokens), seed,
                       key)

    model = fitted(dense=False)
    held = random_shapes(holdout, 2 * batch, max_frames, max_tokens, seed)
    held_traces = tracer.trace_many(held)
    model.holdout = _held_out(model, held, held_traces)
    if held and model.worst_holdout_error > REFINE_ERROR:
        model = fitted(dense=True)
        model.holdout = _held_out(model, held, held_traces)
    return model


def static_forward_bytes(resident: dict) -> int:
    """What is resident when a step starts: parameters, buffers, optimizer state (`StepTracer.resident`)."""
    return resident["parameters"] + resident["buffers"] + resident["optimizer_state"]


def probe_batch(resident: dict, first) -> int:
    """The probes' batch size: one whose activations outweigh the resident bytes twice, so that the fit
    sees activations clearly, from the first probe's trace (one utterance, `first_probe`)."""
    static_forward = static_forward_bytes(resident)
    per_utterance = max(1, first.part_peak((FIRST,)) - static_forward)
    return int(min(4096, max(1, math.ceil(2 * (static_forward + resident["gradients"]) / per_utterance))))


def _fitted(tracer: StepTracer, resident: dict, shapes: list, traces: list, scale: tuple[int, int, int], seed: int,
            key: str) -> MemoryModel:
    """The memory model of these probes' traces: each stage's coefficients, and which stages can set a peak
    at a shape up to twice the probe batch and the range (`scale`: probe batch, frames, tokens)."""
    static_forward = static_forward_bytes(resident)
    sampling = tracer.hotwords
    batch, max_frames, max_tokens = scale
    stages, table = _stage_table(traces)
    if sampling is None:
        coef, *_ = np.linalg.lstsq(features(*np.array(shapes, dtype=float).T), table - static_forward, rcond=None)
        coef = coef.T  # one row per stage
    else:
        base = [i for i, s in enumerate(shapes) if tuple(s[3:]) == (1, 1)]
        hot = _hotword_coef(np.array(shapes, dtype=float), table)
        coef, *_ = np.linalg.lstsq(features(*np.array(shapes, dtype=float)[base, :3].T),
                                   table[base] - static_forward, rcond=None)
        coef = np.hstack([coef.T, hot])
        # features at (N, L) = (1, 1) hold the hotword terms once: the base coefficients already count them
        for term, hot_term in (("1", "N"), ("1", "N*L"), ("B", "B*N"), ("B*U", "B*N*U")):
            coef[:, TERMS.index(term)] -= coef[:, len(TERMS) + HOTWORD_TERMS.index(hot_term)]

    rng = np.random.default_rng(seed)
    grid = np.column_stack([rng.integers(1, 2 * batch + 1, 4000), rng.integers(8, max_frames + 1, 4000),
                            rng.integers(1, max_tokens + 1, 4000)]).astype(float)
    grid[:, 2] = np.minimum(grid[:, 2], grid[:, 1])
    if sampling is not None:  # the most hotwords, and any fewer
        n, l = hotword_shapes(grid[:, 0], grid[:, 2], dataclasses.asdict(sampling))  # noqa: E741
        fewer = np.column_stack([grid[:, :3], np.ceil(rng.random(len(grid)) * n), np.ceil(rng.random(len(grid)) * l)])
        grid = np.vstack([np.column_stack([grid, n, l]), fewer])
    keep = _keep_stages(stages, coef, np.vstack([grid, np.array(shapes, dtype=float)]))
    model = MemoryModel(resident=resident, static_forward=static_forward,
                        gradients=[int(stages[j][0]) for j in keep], coef=[[float(c) for c in coef[j]] for j in keep],
                        max_frames=max_frames, max_tokens=max_tokens, options=tracer.options.to_dict(), key=key,
                        parts=[int(stages[j][1]) for j in keep],
                        hotwords=None if sampling is None else dataclasses.asdict(sampling))
    model.probes = [{"batch": s[0], "frames": s[1], "tokens": s[2], **_words(s), "peak": tr.single,
                     "predicted": model.step_peak([s])} for s, tr in zip(shapes, traces)]
    return model


def _held_out(model: MemoryModel, shapes: list, traces: list) -> list[dict]:
    """The model's error at traced shapes it was not fitted to: a step of one micro-batch, and a later one."""
    out = []
    for (b, t, u), traced in zip(shapes, traces):
        for later, real in ((False, traced.single), (True, traced.part_peak(ACCUMULATED))):
            pred = model.peak(b, t, u, later)
            out.append({"batch": b, "frames": t, "tokens": u, "later": later, "peak": real, "predicted": pred,
                        "error": (pred - real) / real})
    return out


def _words(shape) -> dict:
    """A probe's hotword rows and tokens (SeACo), for its record."""
    return {"hotwords": shape[3], "hotword_tokens": shape[4]} if len(shape) > 3 else {}


def random_shapes(n: int, max_batch: int, max_frames: int, max_tokens: int, seed: int = 0):
    """`n` random (B, T, U) in the fitted range, U <= T: for holdout checks."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        t = rng.randint(8, max_frames)
        out.append((rng.randint(1, max_batch), t, rng.randint(1, max(1, min(max_tokens, t)))))
    return out
