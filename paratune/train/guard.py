"""Out-of-memory recovery: a step whose batch does not fit is redone as smaller micro-batches.

A step is a list of micro-batches, each with its share of the step's loss. When forward or backward
of one runs out of memory, the gradients may already hold part of its backward, so all of the step's
gradients are dropped, the failing micro-batch is replaced by its two halves (each scaled by its share
of the loss weight, so the sum is the same gradient), and the step is run again from its start. A
single utterance that still does not fit is quarantined: reported, left out of this step, never lost
silently. Under DDP the ranks agree after every micro-batch (an all-reduced flag) and split together.

`InjectOOM` raises a real `torch.OutOfMemoryError` at chosen steps, half of them in forward and half in
backward, so all of this runs on a CPU.
"""
from __future__ import annotations

import gc
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from paratune.train.step import backward_batch


@dataclass
class Micro:
    batch: dict  # tensors + "keys"
    scale: float


def take(batch: dict, rows: slice) -> dict:
    """Rows of a padded batch, trimmed to their own longest utterance and target."""
    out = {"keys": batch["keys"][rows]}
    n_frames = int(batch["speech_lengths"][rows].max())
    n_tokens = int(batch["text_lengths"][rows].max())
    out["speech"] = batch["speech"][rows, :n_frames]
    out["speech_lengths"] = batch["speech_lengths"][rows]
    out["text"] = batch["text"][rows, :n_tokens]
    out["text_lengths"] = batch["text_lengths"][rows]
    return out


def loss_weight(batch: dict, predictor_bias: int, length_normalized: bool) -> float:
    """The weight the model's loss is normalised by: target tokens (with the end token) or utterances."""
    if length_normalized:
        return float((batch["text_lengths"] + predictor_bias).sum())
    return float(len(batch["keys"]))


class InjectOOM:
    """Raise `torch.OutOfMemoryError` once at each listed step: at odd-numbered injections in the
    encoder's forward, at even-numbered ones in backward (a hook on the encoder's output)."""

    def __init__(self, model: torch.nn.Module, steps):
        self.steps = set(int(s) for s in steps)
        self.armed = False
        self.count = 0
        self.step = 0
        encoder = model.encoder
        encoder.register_forward_pre_hook(self._forward)
        encoder.register_forward_hook(self._attach_backward)

    def arm(self, step: int) -> None:
        self.step = step
        self.armed = step in self.steps
        if self.armed:
            self.steps.discard(step)
            self.count += 1

    def _raise(self, where):
        self.armed = False
        raise torch.OutOfMemoryError(f"injected out of memory at step {self.step} in {where} (--inject-oom)")

    def _forward(self, module, args):
        if self.armed and self.count % 2 == 1:
            self._raise("forward")

    def _attach_backward(self, module, args, out):
        if self.armed and self.count % 2 == 0 and torch.is_grad_enabled():
            hidden = out[0] if isinstance(out, tuple) else out

            def hook(grad):
                if self.armed:
                    self._raise("backward")
                return grad
            if hidden.requires_grad:
                hidden.register_hook(hook)


@dataclass
class StepResult:
    trained: list[str] = field(default_factory=list)
    quarantined: list[str] = field(default_factory=list)
    splits: int = 0
    stats: list[dict] = field(default_factory=list)


def _any_rank(flag: bool) -> bool:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = torch.tensor([1.0 if flag else 0.0])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())
    return flag


def run_step(model, optimizer, micro: list[Micro], weight_of, autocast_dtype=None, scaler=None,
             on_oom=None) -> StepResult:
    """Forward and backward of every micro-batch, with gradients accumulated; on OOM, split and redo.
    `weight_of(batch)` gives a batch's loss weight (see `loss_weight`)."""
    result = StepResult()
    plan = list(micro)
    while True:
        failed = None
        stats = []
        for i, m in enumerate(plan):
            oom = False
            try:
                if m.batch is not None:  # None: a placeholder that keeps DDP ranks' plans the same length
                    stats.append(backward_batch(model, m.batch, m.scale, autocast_dtype, scaler))
            except torch.OutOfMemoryError as e:
                oom = True
                if on_oom:
                    on_oom(e, len(m.batch["keys"]))
            if _any_rank(oom):
                failed = i
                break
        if failed is None:
            result.stats = stats
            result.trained = [k for m in plan if m.batch is not None for k in m.batch["keys"]]
            return result
        # drop everything the failed attempt holds, and the step's partial gradients
        stats = None
        optimizer.zero_grad(set_to_none=True)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        m = plan.pop(failed)
        n = 0 if m.batch is None else len(m.batch["keys"])
        if n <= 1:
            # one utterance that does not fit: quarantined; two placeholders keep the plan as long as
            # those of ranks that split instead
            result.quarantined += m.batch["keys"] if m.batch is not None else []
            plan[failed:failed] = [Micro(None, 0.0), Micro(None, 0.0)]
            continue
        result.splits += 1
        halves = [take(m.batch, slice(0, n // 2)), take(m.batch, slice(n // 2, n))]
        total = weight_of(m.batch)
        plan[failed:failed] = [Micro(h, m.scale * weight_of(h) / total) for h in halves]
