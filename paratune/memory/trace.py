"""Measure a training step's tensor memory by running it on fake tensors.

The step is `paratune.train.step.train_step` on a model from `prepare_model`, the code the trainer runs:
with two micro-batches (so a later micro-batch of an accumulated or split step, which runs with every
gradient already allocated, is seen), the DDP gradient reduce where the options say so, clipping and
the optimizer. Under `FakeTensorMode` every
tensor has a shape, dtype and device but no storage and no arithmetic, so paraformer-large at any batch
shape costs neither memory nor compute; `PeakMemory` sees each tensor as it is created and freed. The
same tracker on real tensors gives the same figures (tests/memory checks this).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing
import os
import sys
from dataclasses import dataclass

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from paratune.memory.tracker import FIRST, TAIL, PeakMemory, storage_bytes
from paratune.model.build import build_paraformer
from paratune.train.distributed import Local
from paratune.train.step import PRECISIONS, Micro, StepOptions, prepare_model, train_step

__all__ = ["PRECISIONS", "StepOptions", "StepTracer", "Traced", "cuda_kernels", "fake_batch", "fit_key"]

# 2: CUDA steps traced with the memory-efficient attention kernel; 3: and fused dropout; 4: two micro-batches
# per step (accumulation), stage parts, the DDP gradient reduce traced, gradients never resident
TRACER_VERSION = 4


def _efficient_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
    """What a GPU runs for masked attention with dropout: PyTorch's memory-efficient kernel (flash
    attention takes no mask). It keeps the output and one log-sum-exp per query, never the T x T
    weights the CPU's math path materialises (and saves for backward). Shapes only: fake tensors."""
    bias = None
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:  # as sdpa converts it: a float bias of the mask's own shape
            attn_mask = torch.where(attn_mask.logical_not(), float("-inf"), 0.0).to(query.dtype)
        bias = attn_mask.to(query.dtype).expand(query.shape[0], query.shape[1], query.shape[2], key.shape[2])
    grad = query.requires_grad or key.requires_grad or value.requires_grad
    return torch.ops.aten._scaled_dot_product_efficient_attention(query, key, value, bias, grad, dropout_p,
                                                                  is_causal, scale=scale)[0]


def _fused_dropout(input, p=0.5, training=True, inplace=False):
    """What a GPU runs for dropout: one fused kernel that saves a bool mask (1 byte per element). The
    CPU multiplies by a float mask and saves that (4 bytes per element in fp32): 4.0 of paraformer-large's
    21.1 GiB of saved activations at 16 x 500 frames, the +21-24 % the CPU trace over-predicted on an H200
    (benchmarks/saved_by_op.py)."""
    if not training or p == 0.0:
        return input
    return torch.ops.aten.native_dropout(input, p, True)[0]


@contextlib.contextmanager
def cuda_kernels():
    """Trace a CUDA step on the CPU: attention and dropout through the kernels CUDA runs."""
    import torch.nn.functional as F
    originals = F.scaled_dot_product_attention, F.dropout
    F.scaled_dot_product_attention, F.dropout = _efficient_attention, _fused_dropout
    try:
        yield
    finally:
        F.scaled_dot_product_attention, F.dropout = originals


def fit_key(config: dict, vocab: int, input_size: int, options: StepOptions) -> str:
    """A hash of everything a fit depends on: the model config and the step options."""
    blob = json.dumps({"config": {k: config.get(k) for k in sorted(config) if k.endswith(("_conf", "encoder",
                                                                                          "decoder", "predictor",
                                                                                          "model"))},
                       "vocab": vocab, "input_size": input_size, "options": options.to_dict(),
                       "torch": torch.__version__.split("+")[0], "tracer": TRACER_VERSION}, sort_keys=True,
                      default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def fake_batch(batch: int, frames: int, tokens: int, input_size: int, vocab: int) -> dict:
    """A batch of `batch` utterances all `frames` long with `tokens` targets: the padded shape is
    what costs memory, so every row is full length."""
    return {"speech": torch.zeros(batch, frames, input_size),
            "speech_lengths": torch.full((batch,), frames, dtype=torch.long),
            "text": torch.full((batch, tokens), min(3, vocab - 1), dtype=torch.long),
            "text_lengths": torch.full((batch,), tokens, dtype=torch.long)}


@dataclass
class Traced:
    peak: int  # bytes
    breakdown: dict  # bytes by tag (see paratune.memory.tracker) at the peak
    stages: list  # [(gradient bytes, most other bytes at that gradient figure, part)] in step order

    def part_peak(self, parts) -> int:
        """The most bytes live in the stages of these parts (FIRST, LATER, TAIL)."""
        return max((g + a for g, a, p in self.stages if p in parts), default=0)

    @property
    def single(self) -> int:
        """The peak of a step of one micro-batch: its forward and backward, the reduce, the optimizer."""
        return self.part_peak((FIRST, TAIL))


def no_collective(tensor) -> None:
    """The gradient all-reduce as the tracer runs it: the buckets are made, nothing is sent."""


class StepTracer:
    """A model built once on fake tensors; `trace(B, T, U)` runs one steady-state step of two
    micro-batches of that shape, `trace_step(shapes)` one of any micro-batches."""

    def __init__(self, config: dict, vocab: int, input_size: int, options: StepOptions = StepOptions(),
                 fake: bool = True):
        self.config, self.vocab, self.input_size, self.options = config, vocab, input_size, options
        self.fake = fake
        self.mode = FakeTensorMode() if fake else contextlib.nullcontext()
        with self.mode:
            ready = prepare_model(build_paraformer(config, vocab, input_size), options)
            self.model, self.optimizer, self.scaler = ready.model, ready.optimizer, ready.scaler
            # one step creates the optimizer state: what a long run holds at every later step
            self._step([fake_batch(1, 8, 2, input_size, vocab)])

    def _step(self, batches):
        micro = [Micro(b, 1.0 / len(batches)) for b in batches]
        with cuda_kernels() if self.options.device == "cuda" else contextlib.nullcontext():
            train_step(self.model, self.optimizer, micro, grad_clip=self.options.grad_clip,
                       autocast_dtype=PRECISIONS[self.options.precision], scaler=self.scaler,
                       world_size=2 if self.options.ddp else 1, all_reduce=no_collective,
                       agreement=Local())

    def trace_step(self, shapes) -> Traced:
        """A step whose micro-batches have these (B, T, U) shapes, in order."""
        with self.mode:
            data = [fake_batch(b, t, u, self.input_size, self.vocab) for b, t, u in shapes]
            tracker = PeakMemory(self.model, self.optimizer, cuda_blocks=self.options.device == "cuda")
            with tracker:
                self._step(data)
        return Traced(tracker.peak, tracker.at_peak, tracker.stages)

    def trace(self, batch: int, frames: int, tokens: int) -> Traced:
        """Two micro-batches of (B, T, U): the stages of a first and of a later micro-batch."""
        return self.trace_step([(batch, frames, tokens)] * 2)

    def trace_many(self, shapes, workers: int | None = None) -> list[Traced]:
        """Trace several shapes in worker processes when there are cores to spare: a fake step is pure
        Python, so processes are the way to use more than one core.

        Forked workers inherit this tracer. Where a GPU is present, autograd has started its device
        threads by now (the warm-up step) and refuses to run in a forked child: the workers are then
        spawned and each builds its own tracer."""
        shapes = list(shapes)
        if workers is None:
            workers = int(os.environ.get("PARATUNE_TRACE_WORKERS", os.cpu_count() or 1))
        workers = min(workers, len(shapes))
        if workers <= 1 or sys.platform != "linux":  # fork is only dependable on Linux
            return [self.trace(*s) for s in shapes]
        global _TRACER
        if _fork_safe():
            _TRACER = self
            try:
                with multiprocessing.get_context("fork").Pool(workers) as pool:
                    return pool.starmap(_trace_in_worker, shapes, chunksize=1)
            finally:
                _TRACER = None
        args = (self.config, self.vocab, self.input_size, self.options, self.fake)
        with multiprocessing.get_context("spawn").Pool(workers, initializer=_build_in_worker, initargs=args) as pool:
            return pool.starmap(_trace_in_worker, shapes, chunksize=1)

    def resident(self) -> dict:
        """Bytes that live across steps (parameters, buffers, optimizer state), and the full set of
        gradients (which exist only during a step)."""
        def size(t):
            return storage_bytes(t.untyped_storage(), self.options.device == "cuda")
        params = sum(size(p) for p in self.model.parameters())
        buffers = sum(size(b) for b in self.model.buffers())
        state = sum(size(t) for s in self.optimizer.state.values() for t in s.values()
                    if isinstance(t, torch.Tensor))
        grads = sum(size(p) for p in self.model.parameters() if p.requires_grad)
        return {"parameters": params, "buffers": buffers, "optimizer_state": state, "gradients": grads}


_TRACER: StepTracer | None = None  # the tracer forked workers inherit


def _fork_safe() -> bool:
    """Autograd runs a thread per accelerator once a backward has run; a forked child cannot use them."""
    return not torch.cuda.is_available() and os.environ.get("PARATUNE_TRACE_SPAWN") != "1"


def _build_in_worker(config, vocab, input_size, options, fake) -> None:
    global _TRACER
    torch.set_num_threads(1)
    _TRACER = StepTracer(config, vocab, input_size, options, fake)


def _trace_in_worker(batch: int, frames: int, tokens: int) -> Traced:
    return _TRACER.trace(batch, frames, tokens)
