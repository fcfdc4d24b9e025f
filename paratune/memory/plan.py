"""The memory plan of a run: the levers (`paratune.memory.levers`: checkpointed blocks, 8-bit or
host-memory AdamW state), the fitted memory model under the budget (`Limit`), and the sampler whose
batches training will use. `plan_run` is the one entry: `paratune plan` reports what it decides
(`paratune.memory.report`), and `paratune finetune` trains with it, from the same configuration.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np

from paratune.data.hotwords import HotwordSampling
from paratune.data.manifest import Lengths
from paratune.data.sampler import MemoryBoundedSampler, bucket_boundaries
from paratune.memory.cost import StepTiming, weigh_batches
from paratune.memory.estimate import MemoryModel
from paratune.memory.fit_cache import load_or_fit
from paratune.memory.levers import (LABELS, LeverSearch, block_counts, choose_levers, levers_dict, optimizer_candidates,
                                    weighed)
from paratune.memory.trace import hotword_bound
from paratune.train.lora import DEFAULT_TARGETS
from paratune.train.step import StepOptions

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
    accumulate: bool = False  # micro-batches after the first run with every gradient allocated

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

    def expected(self, shapes) -> float:
        """The peak of a step whose micro-batches have these (B, T, U) as the allocator will count it:
        the model's figure, corrected by the calibration's allocated/predicted ratio where there is one
        (no safety margin)."""
        peak = float(self.model.step_peak(shapes))
        if self.calibrated and self.model.calibration.get("allocated_ratio"):
            peak *= float(self.model.calibration["allocated_ratio"])
        return peak

    def need(self, b, t, u) -> np.ndarray:
        """What a micro-batch of (B, T, U) may need: as the first of its step, and (with accumulation)
        as a later one."""
        peaks = self.model.peaks(b, t, u)
        if self.accumulate:
            peaks = np.maximum(peaks, self.model.peaks(b, t, u, later=True))
        return peaks * self.scale

    def fits(self, b: int, t: int, u: int) -> bool:
        return float(self.need(b, t, u)) <= self.budget


def step_options(config: dict, device: str, world_size: int = 1, fsdp: bool = False,
                 checkpointing=(0, 0)) -> StepOptions:
    """The step a run with this configuration takes, as the memory model needs to know it."""
    mc, lora, r = config["memory"], config["lora"], int(config["lora"]["r"])
    return StepOptions(precision=mc["precision"], checkpointing=checkpointing, frozen=tuple(config["freeze"]),
                       grad_clip=config["train_conf"]["grad_clip"], optimizer=config["optim_conf"]["optimizer"],
                       ddp=world_size > 1 and not fsdp, device=device, lora_r=r,
                       lora_targets=tuple(lora["targets"] or DEFAULT_TARGETS) if r else (),
                       lora_dropout=float(lora["dropout"]) if r else 0.05)


def run_hotwords(model_config: dict, config: dict) -> HotwordSampling | None:
    """The hotword sampling a run of this model with this configuration trains with (SeACo; None for the
    other models): the run's `dataset_conf` hotword keys, the model's NO_BIAS."""
    return hotword_bound({**model_config, "dataset_conf": config["dataset_conf"]})


def with_hotwords(model: MemoryModel, sampling: HotwordSampling | None) -> MemoryModel:
    """The fit predicting with the most hotwords `sampling` can draw. A SeACo fit is a function of the
    hotword rows and tokens (N, L) too, so a fit made with another sampling predicts this one's as well."""
    if not model.hotwords or sampling is None or model.hotwords == dataclasses.asdict(sampling):
        return model
    return dataclasses.replace(model, hotwords=dataclasses.asdict(sampling))


def planned_frames(lengths: Lengths, config: dict) -> np.ndarray:
    """Each utterance's frames as planned: speed perturbation below 1 lengthens an utterance after
    planning, so the slowest version is planned."""
    slowest = min([1.0] + [float(x) for x in config["dataset_conf"]["speed_perturb"] or []])
    return np.ceil(lengths.frames / slowest).astype(np.int64) + (slowest < 1.0)


@dataclass
class RunPlan:
    """What `plan_run` decides: the step options (checkpointing on or off), the sampler and its limit."""

    options: StepOptions
    sampler: MemoryBoundedSampler
    frames: np.ndarray  # planned frames per utterance
    accum: int
    notes: list[str] = field(default_factory=list)
    alternatives: list = field(default_factory=list)  # levers.Alternative, with `explain`
    blocks: tuple[int, int] = (0, 0)  # the model's encoder and decoder blocks

    @property
    def limit(self) -> Limit:
        return self.sampler.limit

    def step_of(self, position: int) -> int:
        """The optimizer step (from 1) that trains a rank's batch at `position` (from 0) of the epoch."""
        return position // self.accum + 1


def _too_big(sampler: MemoryBoundedSampler) -> int:
    """How many utterances do not fit even alone (padded as the sampler pads them), without packing."""
    frames = np.array([sampler.padded(int(t)) for t in sampler.frames], dtype=np.int64)
    limit = sampler.limit
    return int((limit.need(np.ones_like(frames), frames, sampler.tokens) > limit.budget).sum())


def fitted_limit(limit_for, frames: np.ndarray, tokens: np.ndarray) -> Limit:
    """The limit of a fit whose range covers every utterance that fits the budget alone, and not the
    outlier that cannot: a fit stretched to a 3-hour clip is poor at the short batches trained. The
    range starts at twice the longest utterance but the longest 1 %. Utterances past it that may fit
    (their peak at the range's edge, below their true one, is within the budget) are checked on a
    wider fit (`beyond`): those that fit widen the range, the rest are predicted by it, and excluded."""
    order = np.sort(frames)
    t_fit = int(min(order[-1], 2 * order[len(order) - 1 - len(order) // 100]))
    while True:
        limit = limit_for(t_fit, int(tokens[frames <= t_fit].max()))
        m = limit.model
        past = (frames > m.max_frames) | (tokens > m.max_tokens)
        if not m.max_frames or not past.any():
            return limit
        t, u = frames[past], tokens[past]
        if not (maybe := _edge_fits(limit, t, u)).any():
            return limit
        wide = _wider(limit, limit_for, frames, tokens, t[maybe], u[maybe])
        fit = (t <= wide.model.max_frames) & (wide.need(np.ones(len(t)), t, u) <= wide.budget)
        if not fit.any() or int(t[fit].max()) <= t_fit:
            if wide.model is not m:
                m.beyond = wide.model
            return limit
        t_fit = int(t[fit].max())  # an utterance that fits is trained: the range covers it


def _edge_fits(limit: Limit, t: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Whether each utterance alone, cut to the fitted range, fits: past the range the step is bigger,
    so those that do not cannot fit."""
    m = limit.model
    return limit.need(np.ones(len(t)), np.minimum(t, m.max_frames), np.minimum(u, m.max_tokens)) <= limit.budget


def _wider(limit: Limit, limit_for, frames, tokens, t: np.ndarray, u: np.ndarray) -> Limit:
    """A limit whose fit reaches past the longest utterance that fits alone, or covers `t`: first a
    quarter past where `limit`'s extrapolation puts that length, then doubling."""
    rate = float(np.median(u / t))
    reach = min(int(t.max()), max(2 * limit.model.max_frames, int(1.25 * longest_alone(limit, rate, int(t.max())))))
    while True:
        wide = limit_for(reach, int(tokens[frames <= reach].max()))
        out = t > wide.model.max_frames
        if reach >= t.max() or not _edge_fits(wide, t[out], u[out]).any():
            return wide
        reach = min(int(t.max()), 2 * reach)


def _fewest_excluded(sampler, options: StepOptions, notes: list[str], blocks, sampler_for):
    """The traces judged the longest utterance alone; the fits judge every one, as they judge batches.
    When some do not fit alone under the chosen checkpointing, every block and none are fitted too, and
    the setting that leaves the fewest out is kept (none on a tie)."""
    start = options.checkpointing
    for counts in [c for c in (blocks, (0, 0)) if c != start]:
        other = dataclasses.replace(options, checkpointing=counts)
        maybe = sampler_for(other)
        if _too_big(maybe) < _too_big(sampler) or (counts == (0, 0) and _too_big(maybe) == _too_big(sampler)):
            sampler, options = maybe, other
    if options.checkpointing != start:
        notes = [n for n in notes if not n.startswith("activation checkpointing")]
        if options.checkpointed:
            notes.append(f"activation checkpointing of every block: with it {_too_big(sampler)} utterances do not "
                         "fit even alone, fewer than with any other setting fitted")
    return sampler, options, notes


def plan_run(spec, lengths: Lengths, config: dict, budget: int, device: str = "cuda", world_size: int = 1,
             rank: int = 0, fsdp: bool = False, fit=None, log=None, explain: bool = False,
             timing: StepTiming | None = None) -> RunPlan:
    """The one planning entry of `paratune plan` and `paratune finetune`: the levers (`choose_levers`),
    then the fitted memory model and the sampler under them. `fit(options, max_frames, max_tokens)` gives
    the memory model (default: the cached fit or a new one; the trainer passes one that fits on rank 0
    and shares it). `explain`: also trace the alternatives weighed (`RunPlan.alternatives`). `timing`:
    measured step time for weighing the batch count (default: the chosen fit's calibration's, if any)."""
    if not len(lengths):
        raise PlanError("the manifest has no usable utterances: nothing to plan")
    if world_size < 1:
        raise PlanError(f"--world-size must be at least 1, got {world_size}")
    if fsdp and world_size < 2:
        raise PlanError("--fsdp shards over ranks: give --world-size 2 or more (under torchrun, --nproc-per-node)")
    dc, mc, tc = config["dataset_conf"], config["memory"], config["train_conf"]
    frames, accum = planned_frames(lengths, config), max(1, int(tc["accum_grad"]))
    hotwords = run_hotwords(spec.config, config)
    fit = fit or (lambda o, t, u: load_or_fit(spec.config, spec.vocab_size, spec.input_size, o, t, u, log=log,
                                              hotwords=hotwords)[0])
    bounds = bucket_boundaries(int(frames.max()), dc["buckets"]) if dc["buckets"] else None
    padded = np.asarray(bounds)[np.searchsorted(bounds, frames)] if bounds else frames

    def limit_for(options: StepOptions, t: int, u: int) -> Limit:
        model = with_hotwords(fit(options, t, u), hotwords)
        if fsdp:  # per rank: sharded parameters, gradients, optimizer state
            import torch

            from paratune.memory.shard import shard_model
            with torch.device("meta"):
                model = shard_model(model, spec.build(), world_size)
        return Limit(model, budget, device, mc["margin"], accumulate=accum > 1)

    def sampler_for(options: StepOptions) -> MemoryBoundedSampler:
        limit = fitted_limit(lambda t, u: limit_for(options, t, u), padded, lengths.tokens)
        return MemoryBoundedSampler(frames, lengths.tokens, limit, seed=int(tc["seed"]),
                                    buffer_size=int(dc["buffer_size"]), buckets=bounds,
                                    costliest_first=bool(dc["costliest_first"]), max_batch=dc["max_batch"],
                                    world_size=world_size, rank=rank)

    base = step_options(config, device, world_size, fsdp)
    scale = 1.0 + (mc["margin"] if mc["margin"] is not None else UNCALIBRATED_MARGIN[device])
    search = LeverSearch(spec, hotwords, scale, budget, accum > 1)
    blocks, longest = block_counts(spec), (int(padded.max()), int(lengths.tokens.max()))
    try:
        options, notes = choose_levers(search, base, config, blocks, longest, fsdp, log)
    except ValueError as e:
        raise PlanError(str(e)) from e
    sampler = sampler_for(options)
    if mc["checkpointing"] == "auto" and _too_big(sampler):
        sampler, options, notes = _fewest_excluded(sampler, options, notes, blocks, sampler_for)
    elif mc["checkpointing"] == "auto" and options.checkpointed and options.checkpointing != blocks and not fsdp:
        timing = timing or StepTiming.of_calibration(sampler.limit.model.calibration)
        if timing is not None:
            weighed_options, sampler, note = weigh_batches(timing, search, options, sampler, blocks, longest,
                                                           sampler_for, _too_big)
            if weighed_options != options:  # the fewest blocks' note no longer holds
                notes = [n for n in notes if not n.startswith("activation checkpointing of")]
            options, notes = weighed_options, [*notes, note]
    alternatives = weighed(search, options, blocks, longest) if explain else []
    limit = sampler.limit
    need_static = limit.model.static_step * limit.scale
    if need_static > budget:
        others = [LABELS[n] for n in optimizer_candidates(config, device)[1:]] if not fsdp else []
        tried = f" ({' and '.join(others)} too)" if others and options.optimizer == base.optimizer else ""
        raise PlanError(f"the budget {gib(budget)} is below the static memory of a step, {gib(need_static)} "
                        f"(parameters, gradients and optimizer state{', with the margin' if limit.scale > 1 else ''}"
                        f", {options.optimizer}{tried}): no batch can fit. Raise the budget, shard with --fsdp, "
                        "freeze modules, or use ++optim_conf.optimizer=sgd")
    return RunPlan(options, sampler, frames, accum, notes, alternatives, blocks)


@dataclass
class Plan:
    """A run plan's first epoch, for people: every rank's batches, step-major, and what cannot fit."""

    budget: int
    limit: Limit
    batches: list[np.ndarray]  # indices into lengths, one array per batch, step-major over ranks
    ranks: list[int]  # the rank of each batch
    positions: list[int]  # each batch's position in its rank's epoch
    excluded: list[dict]  # {"key", "reason"}
    lengths: Lengths
    run: RunPlan
    world_size: int = 1
    notes: list[str] = field(default_factory=list)

    @property
    def sampler(self) -> MemoryBoundedSampler:
        return self.run.sampler

    def batch_shapes(self) -> np.ndarray:
        """(B, T, U) per batch, T planned (slowest speed) and padded as the sampler pads it."""
        pad, frames = self.sampler.padded, self.run.frames
        return np.array([(len(b), pad(int(frames[b].max())), self.lengths.tokens[b].max()) if len(b) else (0, 0, 0)
                         for b in self.batches], dtype=np.int64).reshape(-1, 3)

    def predicted(self) -> np.ndarray:
        """Each batch's predicted peak, as the first micro-batch of its step or a later one."""
        shapes = self.batch_shapes()
        if not len(shapes):
            return np.zeros(0)
        later = np.array([p % self.run.accum > 0 for p in self.positions])
        m = self.limit.model
        return np.where(later, m.peaks(*shapes.T, later=True), m.peaks(*shapes.T))

    def padding_waste(self) -> float:
        """Share of the padded frames that are padding."""
        shapes = self.batch_shapes()
        padded = float((shapes[:, 0] * shapes[:, 1]).sum()) if len(shapes) else 0.0
        real = float(sum(self.run.frames[b].sum() for b in self.batches))
        return 0.0 if padded == 0 else 1 - real / padded

    def to_dict(self) -> dict:
        shapes, peaks = self.batch_shapes(), self.predicted()
        m = self.limit.model
        return {
            "budget_bytes": self.budget,
            "options": m.options,
            "levers": levers_dict(self.run.options),
            "levers_weighed": [a.to_dict() for a in self.run.alternatives],
            "calibrated": self.limit.calibrated,
            "scale": self.limit.scale,
            "static_bytes": m.static_step,
            "hotwords": m.hotwords,
            "world_size": self.world_size,
            "accum_grad": self.run.accum,
            "padding_waste": self.padding_waste(),
            "batches": [{"rank": r, "step": self.run.step_of(pos), "keys": [self.lengths.keys[i] for i in b],
                         "size": int(s[0]), "max_frames": int(s[1]), "max_tokens": int(s[2]),
                         "predicted_peak_bytes": int(round(p))}
                        for b, r, pos, s, p in zip(self.batches, self.ranks, self.positions, shapes, peaks)],
            "excluded": self.excluded,
            "notes": self.notes,
        }


def longest_alone(limit: Limit, tokens_per_frame: float, hi: int | None = None) -> int:
    """The most frames one utterance may have and still fit (with the corpus's token rate), up to `hi`
    (default: as far as the fit or its wider one reaches)."""
    m = limit.model
    lo, hi = 0, max(1, hi or max(m.max_frames, m.beyond.max_frames if m.beyond else 0))
    if limit.fits(1, hi, max(1, int(hi * tokens_per_frame))):
        return hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if limit.fits(1, mid, max(1, int(mid * tokens_per_frame))) else (lo, mid)
    return lo


def make_plan(run: RunPlan, lengths: Lengths, frame_seconds: float) -> Plan:
    """The run plan's epoch 0 as `paratune finetune` will train it, every rank's batches in step order."""
    world, limit = run.sampler.world_size, run.limit
    try:
        per_rank = [run.sampler.batches(0, r) for r in range(world)]
    except ValueError as e:
        raise PlanError(str(e)) from e
    order = [(pos, r) for pos in range(len(per_rank[0])) for r in range(world)]
    batches = [np.asarray(per_rank[r][pos], dtype=np.int64) for pos, r in order]
    alone = run.sampler.excluded(0)
    rate = float(np.median(lengths.tokens / np.maximum(lengths.frames, 1)))
    excluded = []
    if alone:
        seconds = longest_alone(limit, rate) * frame_seconds
        for i in alone:
            need = float(limit.need(1, int(run.frames[i]), int(lengths.tokens[i])))
            excluded.append({"key": lengths.keys[i], "origin": lengths.origins[i],
                             "reason": f"needs {gib(need)} alone, over the budget of {gib(limit.budget)} "
                                       f"({lengths.seconds[i]:.1f} s, {int(run.frames[i])} frames, "
                                       f"{int(lengths.tokens[i])} tokens); split it below {seconds:.1f} s "
                                       f"(paratune prepare --max-duration {math.floor(seconds)} --long-audio split) "
                                       "or drop it (--long-audio drop)"})
    return Plan(limit.budget, limit, batches, [r for _, r in order], [pos for pos, _ in order], excluded, lengths,
                run, world, list(run.notes))
