"""Measure a training step's tensor memory by running it on fake tensors.

The step is `paratune.train.step.train_step` on a model from `prepare_model`, the code the trainer runs:
with two micro-batches (so a later micro-batch of an accumulated or split step, which runs with every
gradient already allocated, is seen), the DDP gradient reduce where the options say so, clipping and
the optimizer. Under `FakeTensorMode` every
tensor has a shape, dtype and device but no storage and no arithmetic, so paraformer-large at any batch
shape costs neither memory nor compute; `PeakMemory` sees each tensor as it is created and freed. The
same tracker on real tensors gives the same figures (tests/memory checks this).

A SeACo-Paraformer's step also takes the batch's hotwords (paratune.data.hotwords): N rows of up to L
tokens, sampled from the transcripts, so N and L vary from batch to batch with the draws. The tracer
gives a batch the most the sampler can draw for its (B, U) (`hotword_shape`: N = 2B + 1 or B + 1,
L = min(hotword_max_length, U)), or the N and L it is told; the plan predicts with the most, an upper
bound over the draws. Between the fewest hotwords ([sos] alone) and the most, a SeACo medium step's peak
moves by +0.2 % at 1 utterance and +36 % at 128 short ones (BENCHMARKS.md, issue 14).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import multiprocessing
import os
import sys
from dataclasses import dataclass

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from paratune.data.hotwords import CONFIG_KEYS, HotwordSampling, hotword_sampling
from paratune.memory.tracker import DEVICE_QUERY, FIRST, TAIL, PeakMemory, storage_bytes
from paratune.model.build import build_paraformer
from paratune.train.distributed import Local
from paratune.train.step import (PRECISIONS, Micro, StepOptions, apply_checkpointing, import_bitsandbytes, prepare_model,
                                 train_step)

__all__ = ["PRECISIONS", "StepOptions", "StepTracer", "Traced", "cuda_kernels", "fake_batch", "fit_key",
           "hotword_bound", "hotword_shape"]

# 2: CUDA steps traced with the memory-efficient attention kernel; 3: and fused dropout; 4: two micro-batches
# per step (accumulation), stage parts, the DDP gradient reduce traced, gradients never resident; 5: SeACo
# steps traced with the most hotwords the sampler can draw (they ran with the [sos] entry alone), and the
# LSTMs' workspace (BiCif's and SeACo's; the fake kernel has none); 6: per-block checkpointing, 8-bit AdamW
# (bitsandbytes' CPU kernel)
TRACER_VERSION = 6

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


class RnnWorkspace(TorchDispatchMode):
    """Fake tensors stand for everything but oneDNN's LSTM workspace: PyTorch's fake kernel of
    `mkldnn_rnn_layer` returns an empty one, where the real CPU kernel allocates gates and states for every
    step and keeps them for backward (BiCif's upsampled BLSTM: 60-64 bytes per frame, utterance and unit
    and direction, +36 % of a small BiCif step). Inside a fake trace this mode gives each call a workspace
    of the real kernel's size, measured by running the kernel on real zeros: at the call's own shape when
    that is cheap, else at two short ones (8 utterances, 32 and 64 steps) and extrapolated per utterance
    and step (within a few pages of the real size). A CUDA step runs cuDNN, whose reserve space is not
    measured here: it is traced with oneDNN's figure (not checked on a GPU)."""

    CHEAP = 2e8  # flops of a call run at its own shape

    def __init__(self):
        super().__init__()
        self._sizes: dict = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is DEVICE_QUERY:  # most calls in a fake step (see PeakMemory)
            return func(*args)
        out = func(*args, **(kwargs or {}))
        # train, not packed (paratune's models run their LSTMs over padded batches)
        if func is torch.ops.aten.mkldnn_rnn_layer.default and args[-1] and not args[8] and out[3].numel() == 0:
            out = (*out[:3], torch.empty(self.size(args), dtype=out[3].dtype, device=out[3].device))
        elif func is torch.ops.aten.mkldnn_rnn_layer_backward.default and out[3] is out[4]:
            out = (*out[:4], torch.empty_like(out[4]), *out[5:])  # the real kernel's two bias gradients
        return out

    def size(self, args) -> int:
        """The real kernel's workspace bytes for a call with these (fake) arguments."""
        x, hidden = args[0], int(args[10])
        steps, batch = x.shape[0], x.shape[1]  # time-major whatever batch_first says (nn.LSTM transposes)
        flops = 8 * steps * batch * hidden * (x.shape[-1] + hidden)
        if flops <= self.CHEAP:
            return self._measure(args, int(steps), int(batch))
        a, b = self._measure(args, 32, 8), self._measure(args, 64, 8)
        per_step = (b - a) / (32 * 8)
        return max(0, int(math.ceil(batch * (a / 8 + (steps - 32) * per_step) / 4096) * 4096))

    def _measure(self, args, steps: int, batch: int) -> int:
        x = args[0]
        key = (steps, batch, x.shape[-1], x.dtype, *(tuple(a.shape) for a in args[1:5]), args[7], *args[9:])
        if key not in self._sizes:
            from torch.utils._python_dispatch import _disable_current_modes
            with _disable_current_modes():  # not no_grad: the kernel makes no workspace then
                def real(t):
                    return torch.zeros(t.shape, dtype=t.dtype)
                shape = (steps, batch, x.shape[-1])
                state = [torch.zeros(batch, *a.shape[1:], dtype=a.dtype) for a in args[5:7]]
                out = torch.ops.aten.mkldnn_rnn_layer.default(
                    torch.zeros(shape, dtype=x.dtype), *map(real, args[1:5]), *state, args[7], [], *args[9:])
                self._sizes[key] = out[3].untyped_storage().nbytes()
        return self._sizes[key]


@contextlib.contextmanager
def fake_quantization_maps(mode):
    """bitsandbytes builds its 8-bit quantization maps through Python lists, which fake tensors cannot
    give: under `mode` (a FakeTensorMode) the maps are built real, then made fake."""
    if not isinstance(mode, FakeTensorMode):
        yield
        return
    bnb = import_bitsandbytes()
    bnb_functional, Optimizer8bit = bnb.functional, bnb.optim.optimizer.Optimizer8bit
    from torch.utils._python_dispatch import _disable_current_modes

    def fill_qmap(optimizer):
        with _disable_current_modes():
            maps = {"dynamic": bnb_functional.create_dynamic_map(signed=True),
                    "udynamic": bnb_functional.create_dynamic_map(signed=False)}
        optimizer.name2qmap.update({k: mode.from_tensor(v) for k, v in maps.items()})

    original = Optimizer8bit.fill_qmap
    Optimizer8bit.fill_qmap = fill_qmap
    try:
        yield
    finally:
        Optimizer8bit.fill_qmap = original


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


def hotword_bound(config: dict, hotwords: HotwordSampling | None = None) -> HotwordSampling | None:
    """The hotword sampling a step of this model is traced with: None but for a SeacoParaformer; `hotwords`
    where given (the run's `dataset_conf`), else the config's own `dataset_conf` hotword keys over
    paratune's defaults (FunASR's: 2 to 8 tokens, 75 % of utterances, 10 % of those two)."""
    if config.get("model") != "SeacoParaformer":
        return None
    if hotwords is not None:
        return hotwords
    from paratune.train.config import DEFAULTS
    conf = {**DEFAULTS["dataset_conf"], **{k: v for k, v in (config.get("dataset_conf") or {}).items()
                                           if k in CONFIG_KEYS.values()}}
    model_conf = config.get("model_conf") or {}
    return dataclasses.replace(hotword_sampling(conf, int(model_conf.get("NO_BIAS", 8377))),
                               sos=int(model_conf.get("sos", 1)))


def hotword_shape(batch: int, tokens: int, sampling: HotwordSampling | None) -> tuple[int, int]:
    """(N, L) of the hotword tensors, the most `sample_spans` can give a batch of `batch` utterances of
    `tokens` tokens: two spans per utterance where it can draw two (more than max + min + 2 tokens), one
    where it can draw one, each up to max_length tokens, and the [sos] entry. (1, 1): the [sos] alone."""
    if sampling is None or tokens < sampling.min_length or sampling.sample_rate <= 0:
        return 1, 1
    double = sampling.double_rate > 0 and tokens > sampling.max_length + sampling.min_length + 2
    return (2 if double else 1) * batch + 1, max(1, min(sampling.max_length, tokens))


def fit_key(config: dict, vocab: int, input_size: int, options: StepOptions,
            hotwords: HotwordSampling | None = None) -> str:
    """A hash of everything a fit depends on: the model config, the step options and (SeACo) the hotword
    sampling the step is traced with."""
    bound = hotword_bound(config, hotwords)
    blob = json.dumps({"config": {k: config.get(k) for k in sorted(config) if k.endswith(("_conf", "encoder",
                                                                                          "decoder", "predictor",
                                                                                          "model"))},
                       "vocab": vocab, "input_size": input_size, "options": options.to_dict(),
                       "hotwords": None if bound is None else dataclasses.asdict(bound),
                       "torch": torch.__version__.split("+")[0], "tracer": TRACER_VERSION}, sort_keys=True,
                      default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def fake_batch(batch: int, frames: int, tokens: int, input_size: int, vocab: int,
               hotwords: HotwordSampling | None = None, words: tuple[int, int] | None = None) -> dict:
    """A batch of `batch` utterances all `frames` long with `tokens` targets: the padded shape is
    what costs memory, so every row is full length. With `hotwords` (SeACo), the hotword tensors the
    collate makes (paratune.data.hotwords.hotword_tensors): `words` = (N, L) rows and tokens, by default
    the most the sampler can give this batch (`hotword_shape`); the last row is the [sos] entry."""
    token = min(3, vocab - 1)
    out = {"speech": torch.zeros(batch, frames, input_size),
           "speech_lengths": torch.full((batch,), frames, dtype=torch.long),
           "text": torch.full((batch, tokens), token, dtype=torch.long),
           "text_lengths": torch.full((batch,), tokens, dtype=torch.long)}
    if hotwords is not None:
        n, width = words or hotword_shape(batch, tokens, hotwords)
        pad = torch.full((n, width), token, dtype=torch.long)
        pad[-1] = 0
        pad[-1, 0] = hotwords.sos
        lengths = torch.full((n,), width, dtype=torch.int32)
        lengths[-1] = 1
        out.update(hotword_pad=pad, hotword_lengths=lengths,
                   seaco_label_pad=torch.full((batch, tokens), hotwords.no_bias, dtype=torch.long))
    return out


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
    micro-batches of that shape, `trace_step(shapes)` one of any micro-batches. A SeACo model's batches
    carry the most hotwords the sampling (`hotword_bound(config, hotwords)`) can draw for their shape,
    or, where a shape is (B, T, U, N, L), N hotword rows of L tokens."""

    def __init__(self, config: dict, vocab: int, input_size: int, options: StepOptions = StepOptions(),
                 fake: bool = True, hotwords: HotwordSampling | None = None):
        self.config, self.vocab, self.input_size, self.options = config, vocab, input_size, options
        self.fake = fake
        self.hotwords = hotword_bound(config, hotwords)
        self.rnn = RnnWorkspace()  # the LSTMs' workspace as the real CPU kernel makes it
        self.mode = FakeTensorMode() if fake else contextlib.nullcontext()
        with self.mode, self._own_rng(), fake_quantization_maps(self.mode):
            ready = prepare_model(build_paraformer(config, vocab, input_size), options)
            self.model, self.optimizer, self.scaler = ready.model, ready.optimizer, ready.scaler
            # the workspace mode only where there are LSTMs: it costs every other operator a Python dispatch
            self._lstm = fake and any(isinstance(m, torch.nn.RNNBase) for m in self.model.modules())
            # one step creates the optimizer state: what a long run holds at every later step
            self._step([self.batch(1, 8, 2)])

    def checkpoint(self, counts: tuple[int, int]) -> None:
        """Trace from now on with these blocks checkpointed: the same model and optimizer state (checkpointing
        changes neither), other blocks recomputed in backward."""
        self.options = dataclasses.replace(self.options, checkpointing=counts)
        apply_checkpointing(self.model, self.options.checkpointing)

    def batch(self, batch: int, frames: int, tokens: int, *words: int) -> dict:
        """The batch a (B, T, U) or (B, T, U, N, L) step is traced with (`fake_batch`, with this model's
        hotwords)."""
        return fake_batch(batch, frames, tokens, self.input_size, self.vocab, self.hotwords, tuple(words) or None)

    def _own_rng(self):
        """Real tensors draw from the global random generator (weights, dropout): a trace leaves it as it
        was, so a run's random stream does not depend on whether its plan was cached."""
        return contextlib.nullcontext() if self.fake else torch.random.fork_rng(devices=[])

    def _step(self, batches):
        micro = [Micro(b, 1.0 / len(batches)) for b in batches]
        with (cuda_kernels() if self.options.device == "cuda" else contextlib.nullcontext(),
              self.rnn if self._lstm else contextlib.nullcontext()):
            train_step(self.model, self.optimizer, micro, grad_clip=self.options.grad_clip,
                       autocast_dtype=PRECISIONS[self.options.precision], scaler=self.scaler,
                       world_size=2 if self.options.ddp else 1, all_reduce=no_collective,
                       agreement=Local())

    def trace_step(self, shapes) -> Traced:
        """A step whose micro-batches have these (B, T, U) (or (B, T, U, N, L)) shapes, in order."""
        with self.mode:
            return self.trace_batches([self.batch(*s) for s in shapes])

    def trace_batches(self, batches) -> Traced:
        """A step of these micro-batches (dicts of the model's inputs, on this tracer's kind of tensors)."""
        with self.mode, self._own_rng():  # the random state is saved before the tracker counts anything
            tracker = PeakMemory(self.model, self.optimizer, cuda_blocks=self.options.device == "cuda")
            with tracker:
                self._step(batches)
        return Traced(tracker.peak, tracker.at_peak, tracker.stages)

    def flops(self, batch: int, frames: int, tokens: int) -> int:
        """Matrix-multiply FLOPs of a step of one (B, T, U) micro-batch, checkpointed blocks' recomputation
        included: what the plan's cost model weighs. Counted on a step of its own (the counter keeps
        tensors alive, so it is never inside a memory trace)."""
        from torch.utils.flop_counter import FlopCounterMode
        with self.mode, self._own_rng():
            batches = [self.batch(batch, frames, tokens)]
            with FlopCounterMode(display=False) as counter:
                self._step(batches)
        return int(counter.get_total_flops())

    def trace(self, batch: int, frames: int, tokens: int, *words: int) -> Traced:
        """Two micro-batches of (B, T, U) (SeACo: and N hotwords of L tokens, by default the most the
        sampler can draw): the stages of a first and of a later micro-batch."""
        return self.trace_step([(batch, frames, tokens, *words)] * 2)

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
                with multiprocessing.get_context("fork").Pool(workers, initializer=_one_thread) as pool:
                    return pool.starmap(_trace_in_worker, shapes, chunksize=1)
            finally:
                _TRACER = None
        args = (self.config, self.vocab, self.input_size, self.options, self.fake, self.hotwords)
        with multiprocessing.get_context("spawn").Pool(workers, initializer=_build_in_worker, initargs=args) as pool:
            return pool.starmap(_trace_in_worker, shapes, chunksize=1)

    def resident(self) -> dict:
        """Bytes that live across steps (parameters, buffers, optimizer state), and the full set of
        gradients (which exist only during a step)."""
        def size(t):
            st = t if isinstance(t, torch.UntypedStorage) else t.untyped_storage()
            return storage_bytes(st, self.options.device == "cuda")
        params = sum(size(p) for p in self.model.parameters())
        buffers = sum(size(b) for b in self.model.buffers())
        # by storage: 8-bit AdamW's quantization maps are one pair shared by every tensor's state
        state = sum(size(st) for st in {id(t.untyped_storage()): t.untyped_storage()
                                         for s in self.optimizer.state.values() for t in s.values()
                                         if isinstance(t, torch.Tensor)}.values())
        grads = sum(size(p) for p in self.model.parameters() if p.requires_grad)
        return {"parameters": params, "buffers": buffers, "optimizer_state": state, "gradients": grads}


_TRACER: StepTracer | None = None  # the tracer forked workers inherit


def _fork_safe() -> bool:
    """Autograd runs a thread per accelerator once a backward has run; a forked child cannot use them."""
    return not torch.cuda.is_available() and os.environ.get("PARATUNE_TRACE_SPAWN") != "1"


def _one_thread() -> None:
    """A forked worker runs real LSTM kernels (`RnnWorkspace` measures their workspace): the parent's
    OpenMP threads do not exist in the child, and a parallel region waits for them for ever. One thread
    needs none (a fake step is pure Python anyway)."""
    torch.set_num_threads(1)


def _build_in_worker(config, vocab, input_size, options, fake, hotwords) -> None:
    global _TRACER
    torch.set_num_threads(1)
    _TRACER = StepTracer(config, vocab, input_size, options, fake, hotwords)


def _trace_in_worker(batch: int, frames: int, tokens: int, *words: int) -> Traced:
    return _TRACER.trace(batch, frames, tokens, *words)
