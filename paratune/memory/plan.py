"""`paratune plan`: batches for a manifest under a memory budget, from the fitted memory model.

The batches are the ones training will use: `paratune.data.sampler.MemoryBoundedSampler`'s first
epoch, every rank's, step by step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from paratune.data.manifest import Lengths
from paratune.data.sampler import MemoryBoundedSampler, bucket_boundaries
from paratune.memory.estimate import MemoryModel

# Without a calibration on the GPU the plan keeps this share of the budget for what tensor bytes do
# not show: the caching allocator's reserved-but-free blocks and cuBLAS/cuDNN workspaces.
UNCALIBRATED_MARGIN = {"cuda": 0.10, "cpu": 0.0}


class PlanError(ValueError):
    """The plan cannot be made: the message says why and what to change."""


def parse_bytes(text: str) -> int:
    """'24GiB', '24G', '24GB', '1.5TiB', '800MiB', '123456' -> bytes (G and GB mean GiB, as nvidia-smi)."""
    s = str(text).strip().replace(" ", "")
    units = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "kib": 2**10, "m": 2**20, "mb": 2**20, "mib": 2**20,
             "g": 2**30, "gb": 2**30, "gib": 2**30, "t": 2**40, "tb": 2**40, "tib": 2**40}
    number = s.rstrip("kKmMgGtTiIbB")
    unit = s[len(number):].lower()
    try:
        value = float(number)
    except ValueError:
        value = -1
    if unit not in units or value <= 0 or not math.isfinite(value):
        raise PlanError(f"cannot read the budget {text!r}: give a size like 24GiB, 800MiB or a number of bytes")
    return int(value * units[unit])


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


@dataclass
class Limit:
    """What a batch may need: the predicted peak times the calibration (or the uncalibrated margin)."""

    model: MemoryModel
    budget: int
    device: str = "cuda"
    margin: float | None = None  # None: calibration if any, else UNCALIBRATED_MARGIN[device]

    @property
    def scale(self) -> float:
        if self.margin is not None:
            return 1.0 + self.margin
        cal = self.model.calibration
        if cal and self.device == "cuda" and cal.get("reserved_ratio"):
            return float(cal["reserved_ratio"])
        return 1.0 + UNCALIBRATED_MARGIN[self.device]

    @property
    def calibrated(self) -> bool:
        return self.margin is None and bool(self.model.calibration) and self.device == "cuda"

    def expected(self, b: int, t: int, u: int) -> float:
        """The step's peak as the allocator will count it: the model's figure, corrected by the
        calibration's allocated/predicted ratio where there is one (no safety margin)."""
        peak = float(self.model.peak(b, t, u))
        if self.calibrated and self.model.calibration.get("allocated_ratio"):
            peak *= float(self.model.calibration["allocated_ratio"])
        return peak

    def need(self, b, t, u) -> np.ndarray:
        return self.model.peaks(b, t, u) * self.scale

    def fits(self, b: int, t: int, u: int) -> bool:
        return float(self.need(b, t, u)) <= self.budget


@dataclass
class Plan:
    budget: int
    limit: Limit
    batches: list[np.ndarray]  # indices into lengths, one array per batch
    excluded: list[dict]  # {"key", "reason"}
    lengths: Lengths
    world_size: int = 1
    notes: list[str] = field(default_factory=list)

    sampler: object = None

    def batch_shapes(self) -> np.ndarray:
        """(B, T, U) per batch, T padded as the sampler pads it."""
        pad = self.sampler.padded if self.sampler is not None else (lambda t: t)
        return np.array([(len(b), pad(int(self.lengths.frames[b].max())), self.lengths.tokens[b].max())
                         for b in self.batches], dtype=np.int64).reshape(-1, 3)

    def predicted(self) -> np.ndarray:
        shapes = self.batch_shapes()
        if not len(shapes):
            return np.zeros(0)
        return self.limit.model.peaks(shapes[:, 0], shapes[:, 1], shapes[:, 2])

    def padding_waste(self) -> float:
        """Share of the padded frames that are padding."""
        shapes = self.batch_shapes()
        padded = float((shapes[:, 0] * shapes[:, 1]).sum()) if len(shapes) else 0.0
        real = float(sum(self.lengths.frames[b].sum() for b in self.batches))
        return 0.0 if padded == 0 else 1 - real / padded

    def to_dict(self) -> dict:
        shapes, peaks = self.batch_shapes(), self.predicted()
        m = self.limit.model
        return {
            "budget_bytes": self.budget,
            "options": m.options,
            "calibrated": self.limit.calibrated,
            "scale": self.limit.scale,
            "static_bytes": m.static_step,
            "world_size": self.world_size,
            "padding_waste": self.padding_waste(),
            "batches": [{"keys": [self.lengths.keys[i] for i in b], "size": int(s[0]), "max_frames": int(s[1]),
                         "max_tokens": int(s[2]), "predicted_peak_bytes": int(round(p))}
                        for b, s, p in zip(self.batches, shapes, peaks)],
            "excluded": self.excluded,
            "notes": self.notes,
        }


def longest_alone(limit: Limit, tokens_per_frame: float) -> int:
    """The most frames one utterance may have and still fit (with the corpus's token rate)."""
    lo, hi = 0, max(1, limit.model.max_frames)
    if limit.fits(1, hi, max(1, int(hi * tokens_per_frame))):
        return hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if limit.fits(1, mid, max(1, int(mid * tokens_per_frame))) else (lo, mid)
    return lo


def make_plan(lengths: Lengths, limit: Limit, frame_seconds: float, world_size: int = 1,
              max_batch: int | None = None, seed: int = 0, buffer_size: int = 20_000, buckets: float | None = None,
              costliest_first: bool = False) -> Plan:
    if not len(lengths):
        raise PlanError("the manifest has no usable utterances: nothing to plan")
    need_static = limit.model.static_step * limit.scale
    if need_static > limit.budget:
        raise PlanError(f"the budget {gib(limit.budget)} is below the static memory of a step, "
                        f"{gib(need_static)} (parameters, gradients and optimizer state"
                        f"{', with the margin' if limit.scale > 1 else ''}): no batch can fit. "
                        "Raise the budget, shard with --world-size N --fsdp, freeze modules, or use --optimizer sgd")
    bounds = bucket_boundaries(int(lengths.frames.max()), buckets) if buckets else None
    sampler = MemoryBoundedSampler(lengths.frames, lengths.tokens, limit, seed=seed, buffer_size=buffer_size,
                                   buckets=bounds, costliest_first=costliest_first, world_size=world_size,
                                   max_batch=max_batch)
    try:
        per_rank = [sampler.batches(0, r) for r in range(world_size)]
    except ValueError as e:
        raise PlanError(str(e)) from e
    batches = [np.asarray(per_rank[r][step]) for step in range(len(per_rank[0])) for r in range(world_size)]
    alone = sampler.excluded(0)
    rate = float(np.median(lengths.tokens / np.maximum(lengths.frames, 1)))
    excluded = []
    if alone:
        most = longest_alone(limit, rate)
        seconds = most * frame_seconds
        for i in alone:
            need = float(limit.need(1, int(lengths.frames[i]), int(lengths.tokens[i])))
            excluded.append({"key": lengths.keys[i], "origin": lengths.origins[i],
                             "reason": f"needs {gib(need)} alone, over the budget of {gib(limit.budget)} "
                                       f"({lengths.seconds[i]:.1f} s, {int(lengths.frames[i])} frames, "
                                       f"{int(lengths.tokens[i])} tokens); split it below {seconds:.1f} s "
                                       f"(paratune prepare --max-duration {math.floor(seconds)} --long-audio split) "
                                       "or drop it (--long-audio drop)"})
    plan = Plan(limit.budget, limit, batches, excluded, lengths, world_size)
    plan.sampler = sampler
    return plan


def summary(plan: Plan) -> str:
    """The plan in a few readable lines."""
    m, limit = plan.limit.model, plan.limit
    sizes = np.array([len(b) for b in plan.batches]) if plan.batches else np.zeros(1, dtype=int)
    peaks = plan.predicted() * limit.scale
    lines = [
        f"budget {gib(plan.budget)} per device; static {gib(m.static_step)} "
        f"(parameters {gib(m.resident['parameters'])}, optimizer state {gib(m.resident['optimizer_state'])}, "
        f"gradients {gib(m.resident['gradients'])})",
        f"options: precision {m.options.get('precision')}, checkpointing "
        f"{'on' if m.options.get('checkpointing') else 'off'}, optimizer {m.options.get('optimizer')}"
        + (f", FSDP over {m.options['fsdp_world_size']} ranks" if m.options.get("fsdp_world_size") else "")
        + (", DDP" if m.options.get("ddp") else ""),
        ("calibrated on " + str(m.calibration.get("device")) + f": predicted x {limit.scale:.3f}")
        if limit.calibrated else
        (f"uncalibrated: predicted tensor bytes + {100 * (limit.scale - 1):.0f} % margin for the allocator "
         "and workspaces (run `paratune plan --calibrate` on the GPU to measure it)" if limit.scale > 1
         else "tensor bytes, no margin"),
        f"{len(plan.lengths)} utterances -> {len(plan.batches)} batches"
        + (f" ({math.ceil(len(plan.batches) / plan.world_size)} per rank over {plan.world_size})"
           if plan.world_size > 1 else ""),
        f"batch size: min {sizes.min()}, median {int(np.median(sizes))}, max {sizes.max()}",
        f"predicted need: max {gib(peaks.max() if len(peaks) else 0)}, mean {gib(peaks.mean() if len(peaks) else 0)}"
        f" ({100 * (peaks.mean() if len(peaks) else 0) / plan.budget:.1f} % of the budget)",
        f"padding waste {100 * plan.padding_waste():.1f} % of padded frames",
    ]
    if plan.excluded:
        lines.append(f"{len(plan.excluded)} utterances cannot fit even alone:")
        lines += [f"  {e['key']} ({e['origin']}): {e['reason']}" for e in plan.excluded[:10]]
        if len(plan.excluded) > 10:
            lines.append(f"  ... and {len(plan.excluded) - 10} more (--json lists them all)")
    lines += plan.notes
    return "\n".join(lines)


def write_png(plan: Plan, path) -> None:
    """Predicted need per batch (in plan order) against the budget."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from paratune.io import atomic_write

    peaks = plan.predicted() * plan.limit.scale / 2**30
    fig, ax = plt.subplots(figsize=(9, 4), dpi=110)
    ax.plot(np.arange(len(peaks)), peaks, lw=0.8, label="predicted need per batch")
    ax.axhline(plan.budget / 2**30, color="red", ls="--", label="budget")
    ax.axhline(plan.limit.model.static_step * plan.limit.scale / 2**30, color="gray", ls=":",
               label="static (parameters, gradients, optimizer)")
    ax.set_xlabel("batch, in training order (epoch 0" + (", step-major over ranks)" if plan.world_size > 1 else ")"))
    ax.set_ylabel("GiB")
    ax.set_ylim(0, plan.budget / 2**30 * 1.08)
    ax.set_title(f"{len(plan.batches)} batches, padding waste {100 * plan.padding_waste():.1f} %")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png"), mode="wb")
    plt.close(fig)
