"""The memory levers a plan chooses: how many blocks of each stack to checkpoint, and whether AdamW
keeps its state in 8 bits or in host memory. `plan_run` asks `LeverSearch` for the fewest checkpointed
blocks that let the run's longest utterance fit, first with the configured optimizer and, only if no
checkpointing is enough (or the static memory alone is over the budget), with 8-bit AdamW, then (on a
GPU) with AdamW's state in host memory (`paratune.train.offload`). Each candidate is judged by
tracing the step it would run (`PlanTracer`), never by a formula.

The cost of a choice is its predicted step-time factor: the step's matrix-multiply FLOPs with the
checkpointed blocks' forward recomputed, over the FLOPs without checkpointing, counted on the same
traced step. 8-bit AdamW's update is elementwise (no FLOPs counted): its cost is stated in words; the
host-memory state's in bytes of host memory and of copies per step.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from paratune.io import atomic_write_text
from paratune.memory.fit_cache import cache_dir
from paratune.memory.plan_tracer import PlanTracer
from paratune.memory.trace import fit_key
from paratune.memory.tracker import FIRST, LATER, TAIL
from paratune.train.step import ALL, StepOptions, checkpoint_counts


@dataclass(frozen=True)
class Alternative:
    """One lever setting the plan weighed, as `--explain` reports it."""

    options: StepOptions
    need: float  # predicted need (bytes, margin included) of the longest utterance alone
    static: float  # predicted static need (bytes, margin included)
    factor: float  # predicted step-time factor against no checkpointing (FLOPs)
    fits: bool  # the longest utterance fits alone within the budget
    chosen: bool = False

    def to_dict(self) -> dict:
        return {**levers_dict(self.options), "predicted_need_bytes": int(round(self.need)),
                "static_bytes": int(round(self.static)), "step_time_factor": round(self.factor, 4),
                "fits": self.fits, "chosen": self.chosen}


def levers_dict(options: StepOptions) -> dict:
    """`plan --json`'s "levers": what the step runs with."""
    enc, dec = options.checkpointing
    return {"precision": options.precision, "checkpointing": {"encoder_blocks": enc, "decoder_blocks": dec},
            "optimizer": options.optimizer}


def blocks_text(options: StepOptions, blocks: tuple[int, int]) -> str:
    """'28/50 encoder and 0/17 decoder blocks'."""
    enc, dec = options.checkpointing
    return f"{enc}/{blocks[0]} encoder and {dec}/{blocks[1]} decoder blocks"


def describe(options: StepOptions, blocks: tuple[int, int]) -> str:
    ckpt = f"checkpointing {blocks_text(options, blocks)}" if options.checkpointed else "no checkpointing"
    return f"{options.optimizer}, {ckpt}"


def ladder(blocks: tuple[int, int]) -> list[tuple[int, int]]:
    """Checkpointing settings from none to all, each saving more than the one before: encoder blocks
    first (their activations grow with T and T^2, the decoder's with U and T*U), then decoder blocks."""
    enc, dec = blocks
    return [(k, 0) for k in range(enc + 1)] + [(enc, k) for k in range(1, dec + 1)]


STATE_OPTIMIZERS = {"8bit": "adamw8bit", "offload": "adamw_offload"}  # memory.optimizer_state -> optimizer
LABELS = {"adamw": "fp32 AdamW", "sgd": "SGD", "adamw8bit": "8-bit AdamW state (bitsandbytes)",
          "adamw_offload": "AdamW state in host memory"}


def optimizer_candidates(config: dict, device: str = "cuda") -> list[str]:
    """The optimizers the plan may use, in order of preference: the configured one, then (AdamW, with
    `memory.optimizer_state: auto`) its 8-bit form and, on a GPU, AdamW with its state in host memory
    (on a CPU the state is in host memory already)."""
    name, state = config["optim_conf"]["optimizer"], config["memory"]["optimizer_state"]
    if state in STATE_OPTIMIZERS:
        if name != "adamw":
            raise ValueError(f"++memory.optimizer_state={state}: only AdamW's state is handled so, not {name}'s")
        if state == "offload" and device != "cuda":
            raise ValueError("++memory.optimizer_state=offload moves AdamW's state from a GPU to host memory: "
                             "on a CPU it is in host memory already")
        return [STATE_OPTIMIZERS[state]]
    if name != "adamw" or state != "auto":
        return [name]
    return ["adamw", "adamw8bit", "adamw_offload"] if device == "cuda" else ["adamw", "adamw8bit"]


def forced_checkpointing(mode: str, blocks: tuple[int, int]) -> tuple[int, int] | None:
    """`memory.checkpointing` as counts: off, on (all) or "E/D" ("all" allowed); None for auto."""
    if mode == "auto":
        return None
    if mode in ("on", "off"):
        return blocks if mode == "on" else (0, 0)
    pair = checkpoint_counts(mode)
    return tuple(b if n == ALL else min(n, b) for n, b in zip(pair, blocks))


class LeverSearch:
    """Traces of the longest utterance under candidate lever settings. What a trace gives (static bytes,
    a shape's need without the margin, a shape's FLOPs) is kept beside the cached fits, one file per
    model config and options, so a repeated plan builds no tracer."""

    def __init__(self, spec, hotwords, scale: float, budget: int, accumulate: bool, cache: Path | None = None):
        self.spec, self.hotwords, self.scale, self.budget, self.accumulate = spec, hotwords, scale, budget, accumulate
        self.cache = cache_dir() if cache is None else Path(cache)
        self._tracers: dict[StepOptions, PlanTracer] = {}
        self._figures: dict[StepOptions, dict] = {}

    def tracer(self, options: StepOptions) -> PlanTracer:
        """One tracer per setting but the checkpointing, switched to `options`' blocks: the binary search
        over them costs a trace a step, not a model build and a warm-up step too."""
        base = dataclasses.replace(options, checkpointing=(0, 0))
        if base not in self._tracers:
            self._tracers[base] = PlanTracer(self.spec.config, self.spec.vocab_size, self.spec.input_size,
                                              base, self.hotwords)
        tracer = self._tracers[base]
        tracer.checkpoint(options.checkpointing)
        return tracer

    def _path(self, options: StepOptions) -> Path:
        key = fit_key(self.spec.config, self.spec.vocab_size, self.spec.input_size, options, self.hotwords)
        return self.cache / "traces" / f"{key}.json"  # apart from the fits, which are globbed by key

    def _figure(self, options: StepOptions, name: str, compute):
        """A traced figure of `options`, from the cache file or computed (and added to it)."""
        if options not in self._figures:
            try:
                self._figures[options] = json.loads(self._path(options).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                self._figures[options] = {}
        figures = self._figures[options]
        if not isinstance(figures.get(name), (int, float)):
            figures[name] = compute()
            try:
                self._path(options).parent.mkdir(parents=True, exist_ok=True)
                atomic_write_text(self._path(options), json.dumps(figures))
            except OSError:
                pass  # a read-only cache costs time, not the plan
        return figures[name]

    def static(self, options: StepOptions) -> float:
        def compute():
            r = self.tracer(options).resident()
            return r["parameters"] + r["buffers"] + r["optimizer_state"] + r["gradients"]
        return self._figure(options, "static", compute) * self.scale

    def gradients(self, options: StepOptions) -> int:
        """Bytes of the trained parameters' gradients (no margin)."""
        return self._figure(options, "gradients", lambda: self.tracer(options).resident()["gradients"])

    def need(self, options: StepOptions, t: int, u: int) -> float:
        """What one utterance of (T, U) needs alone, margin included (as `Limit.need`): a step of it, and
        with accumulation a later micro-batch of it."""
        parts = (FIRST, TAIL, LATER) if self.accumulate else (FIRST, TAIL)
        name = f"need:{t}:{u}:{''.join(map(str, parts))}"
        return self._figure(options, name, lambda: self.tracer(options).trace(1, t, u).part_peak(parts)) * self.scale

    def flops(self, options: StepOptions, t: int, u: int) -> int:
        return self._figure(options, f"flops:{t}:{u}", lambda: self.tracer(options).flops(1, t, u))

    def fewest(self, base: StepOptions, blocks: tuple[int, int], t: int, u: int) -> tuple[int, int] | None:
        """The fewest checkpointed blocks (along `ladder`) with which (1, T, U) fits; None if none does."""
        steps = ladder(blocks)
        at = lambda i: dataclasses.replace(base, checkpointing=steps[i])  # noqa: E731
        if self.need(at(len(steps) - 1), t, u) > self.budget:
            return None
        lo, hi = -1, len(steps) - 1  # steps[hi] fits; steps[lo] does not (or lo is before the first)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if self.need(at(mid), t, u) <= self.budget else (mid, hi)
        return steps[hi]

    def factor(self, options: StepOptions, t: int, u: int) -> float:
        """Predicted step-time factor of `options` against no checkpointing, at (1, T, U)."""
        if not options.checkpointed:
            return 1.0
        plain = dataclasses.replace(options, checkpointing=(0, 0))
        return self.flops(options, t, u) / max(1, self.flops(plain, t, u))

    def alternative(self, options: StepOptions, t: int, u: int, chosen: bool = False) -> Alternative:
        need = self.need(options, t, u)
        return Alternative(options, need, self.static(options), self.factor(options, t, u),
                           need <= self.budget and self.static(options) <= self.budget, chosen)


def block_counts(spec) -> tuple[int, int]:
    """The model's encoder blocks and its longest decoder stack (SeACo's seaco decoder counts as one)."""
    import torch
    with torch.device("meta"):
        stacks = spec.build().block_stacks()
    return len(stacks["encoder"]), max(len(v) for k, v in stacks.items() if k != "encoder")


def choose_levers(search: LeverSearch, base: StepOptions, config: dict, blocks: tuple[int, int],
                  longest: tuple[int, int], fsdp: bool, log=None) -> tuple[StepOptions, list[str]]:
    """The step options a run takes, and notes on why: for each optimizer in order of preference
    (`optimizer_candidates`) whose static memory fits, the checkpointing `memory.checkpointing` forces,
    or (auto) the fewest blocks with which the longest utterance (T, U) fits; the first optimizer with
    which it fits, else the first whose static memory fits, with every block checkpointed (auto). Under
    FSDP: the configured optimizer and no checkpointing, unless forced (`plan_run` then compares none
    and every block by their sharded fits, as before there were levers)."""
    forced = forced_checkpointing(config["memory"]["checkpointing"], blocks)
    names = optimizer_candidates(config, base.device)
    if fsdp:  # neither state lever updates sharded parameters; a trace here is of the unsharded step
        if names[0] != base.optimizer:
            state = config["memory"]["optimizer_state"]
            raise ValueError(f"++memory.optimizer_state={state} does not work with --fsdp (sharded parameters)")
        return dataclasses.replace(base, checkpointing=forced or (0, 0)), []
    t, u = longest
    first = fallback = None
    for name in names:
        options = dataclasses.replace(base, optimizer=name, checkpointing=(0, 0))
        first = first or options
        if search.static(options) > search.budget:
            continue
        if forced is not None:
            pick = dataclasses.replace(options, checkpointing=forced)
            fits = search.need(pick, t, u) <= search.budget
        else:
            counts = search.fewest(options, blocks, t, u)
            fits = counts is not None
            pick = dataclasses.replace(options, checkpointing=counts if fits else blocks)
        fallback = fallback or pick
        if log:
            log(f"{describe(pick, blocks)}: the longest utterance ({t} frames, {u} tokens) "
                f"{'fits' if fits else 'does not fit'} alone")
        if fits:
            return pick, _notes(search, pick, base, blocks, longest, config)
    chosen = fallback or dataclasses.replace(first, checkpointing=forced or (0, 0))
    return chosen, _notes(search, chosen, base, blocks, longest, config, fits=False)


def _notes(search: LeverSearch, chosen: StepOptions, base: StepOptions, blocks, longest, config: dict,
           fits: bool = True) -> list[str]:
    """Why each lever is on: what the budget needed, or that the configuration forced it."""
    from paratune.memory.plan import gib
    notes = []
    mc = config["memory"]
    if chosen.optimizer != base.optimizer and mc["optimizer_state"] != "auto":
        notes.append(f"{LABELS[chosen.optimizer]}, as memory.optimizer_state asks")
    elif chosen.optimizer != base.optimizer:
        names = optimizer_candidates(config, base.device)
        tried = [dataclasses.replace(chosen, optimizer=n) for n in names[:names.index(chosen.optimizer)]]
        why = "; ".join(f"with {LABELS[o.optimizer]} " + (
            "its static memory alone" if search.static(o) > search.budget else
            "the longest utterance, even with every block checkpointed,") + " is over the budget" for o in tried)
        plain = tried[0]
        notes.append(f"{LABELS[chosen.optimizer]}: {why}. It takes the static need (margin included) from "
                     f"{gib(search.static(plain))} to {gib(search.static(chosen))}. Its cost: "
                     f"{_cost(search, chosen)}; only weights are exported")
    if chosen.checkpointed and mc["checkpointing"] != "auto":
        notes.append(f"activation checkpointing of {blocks_text(chosen, blocks)}, as memory.checkpointing asks; "
                     f"the longest utterance {'fits' if fits else 'does not fit'} alone")
    elif chosen.checkpointed and not fits:
        notes.append(f"activation checkpointing of every block: the longest utterance ({longest[0]} frames) does "
                     "not fit alone even with it")
    elif chosen.checkpointed:
        every = dataclasses.replace(chosen, checkpointing=blocks)
        notes.append(f"activation checkpointing of {blocks_text(chosen, blocks)}: "
                     f"the fewest with which the longest utterance ({longest[0]} frames) fits; predicted step time "
                     f"x{search.factor(chosen, *longest):.3f} (every block: x{search.factor(every, *longest):.3f})")
    return notes


def _cost(search: LeverSearch, options: StepOptions) -> str:
    """What an optimizer-state lever costs, in words and bytes."""
    from paratune.memory.plan import gib
    if options.optimizer == "adamw8bit":
        return ("moments quantized blockwise (256 values per block) and an elementwise "
                "dequantize-update-requantize per tensor")
    from paratune.train.offload import host_update_seconds
    grads = search.gradients(options)
    seconds = host_update_seconds(grads // 4)  # fp32 gradients: 4 bytes per trained parameter
    return (f"{gib(4 * grads)} of host memory (an fp32 copy of the weights, their gradients and both moments), "
            f"{gib(grads)} copied each way per step (gradients to the host, weights back) and AdamW run on the CPU "
            f"(timed here: {seconds:.2f} s per step)")


def weighed(search: LeverSearch, chosen: StepOptions, blocks, longest) -> list[Alternative]:
    """The chosen setting and those beside it: no checkpointing, every block, and (if an optimizer-state
    lever was chosen) the same with the state levers before it: fp32 AdamW, and 8-bit before offloading."""
    others = [dataclasses.replace(chosen, checkpointing=c) for c in ((0, 0), blocks)]
    before = {"adamw8bit": ["adamw"], "adamw_offload": ["adamw", "adamw8bit"]}.get(chosen.optimizer, [])
    others += [dataclasses.replace(o, optimizer=n) for n in before for o in (chosen, *others)]
    seen = {chosen}
    out = [search.alternative(chosen, *longest, chosen=True)]
    for o in others:
        if o not in seen:
            seen.add(o)
            out.append(search.alternative(o, *longest))
    return out


def text(alternatives: list[Alternative], blocks: tuple[int, int], budget: int) -> list[str]:
    """`--explain`'s lines on the lever settings weighed."""
    from paratune.memory.plan import gib
    lines = [f"levers weighed at the longest utterance (budget {gib(budget)}):"]
    for a in alternatives:
        verdict = "chosen" if a.chosen else ("fits" if a.fits else "does not fit")
        lines.append(f"  {describe(a.options, blocks):<58} need {gib(a.need)}, static {gib(a.static)}, "
                     f"step time x{a.factor:.3f}  {verdict}")
    return lines


__all__ = ["Alternative", "LeverSearch", "block_counts", "blocks_text", "choose_levers", "describe",
           "forced_checkpointing", "ladder", "levers_dict", "optimizer_candidates", "text", "weighed"]
