"""Live tensor bytes of one training step, and what they were at the peak.

A `TorchDispatchMode` sees every tensor an operator creates, on real or fake tensors; a weak
reference to each new storage tells when it is freed. That is what PyTorch's `MemTracker` does too
(tests/memory checks the two agree byte for byte, but for tensors made before the step: a view of one
allocates nothing, which `MemTracker` counts as new), but `MemTracker` revisits every module's
statistics after every operator, which makes a paraformer-large step cost seconds of Python; this
keeps one running total and one dict of bytes by tag.

Tags say where the bytes came from: parameters, gradients, optimizer state (what lives across steps),
activations by the top-level module that made them (encoder, predictor, decoder), backward (which
includes what checkpointed blocks recompute), the optimizer step's temporaries, and other. Tensors an
optimizer keeps in host memory (its `host_tensors()`, paratune.train.offload) are not device memory and
are not counted.
"""
from __future__ import annotations

import math
import weakref
from collections import defaultdict

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

# The CUDA caching allocator hands out multiples of 512 bytes; tensors elsewhere cost their size.
CUDA_BLOCK = 512
DEVICE_QUERY = torch.ops.prim.device.default  # asked of fake tensors through the mode stack; allocates nothing
FIRST, LATER, TAIL = 0, 1, 2  # parts of a step (PeakMemory.stages)


def storage_bytes(st: torch.UntypedStorage, cuda: bool) -> int:
    n = st.nbytes()
    return math.ceil(n / CUDA_BLOCK) * CUDA_BLOCK if cuda else n


class Adam8bitCpu(TorchDispatchMode):
    """bitsandbytes' 8-bit AdamW update on a CPU is PyTorch code that dequantizes both moments of a tensor
    to fp32, updates and requantizes them: temporaries several times the tensor's fp32 size, made inside
    one custom operator where no dispatch mode above it sees them. Entered above a `PeakMemory`, this
    runs that code op by op, so the tracker counts them (on fake tensors too, whose kernel of the
    operator allocates nothing, as CUDA's fused one does)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.bitsandbytes.optimizer_update_8bit_blockwise.default:
            from bitsandbytes.backends.cpu.ops import _optimizer_update_8bit_blockwise_cpu
            return _optimizer_update_8bit_blockwise_cpu(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


class PeakMemory(TorchDispatchMode):
    """Use as a context around one step: `with PeakMemory(model, optimizer) as m: step()`, then
    `m.peak` (bytes) and `m.at_peak` (bytes by tag when the peak was reached). The same object can
    be entered again for a later step. `cuda_blocks` counts
    every tensor as the CUDA allocator would (default: when the tensor is on a CUDA device), so a
    step traced on fake CPU tensors can stand for one on a GPU."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                 cuda_blocks: bool | None = None):
        super().__init__()
        self.model, self.optimizer = model, optimizer
        self.cuda_blocks = cuda_blocks
        self.current = 0
        self.peak = 0
        self.at_peak: dict[str, int] = {}
        self.by_tag: dict[str, int] = defaultdict(int)
        self._live: dict[int, list] = {}  # id(storage) -> [bytes, tag, weakref]
        self._tag = "other"
        # (gradient bytes, most other bytes seen while gradients stood at that figure, part), in step
        # order; part: FIRST (the first micro-batch's forward and backward), LATER (a later one's), TAIL
        # (after a backward: the gradient reduce, the optimizer step)
        self.stages: list[tuple[int, int, int]] = []
        self._micro = -1
        self._part = TAIL
        self._grads = 0
        self._stage_max = 0
        self._handles = []
        self._orig_resize = None
        # a CPU step's 8-bit AdamW: its update's temporaries (CUDA's kernel has none)
        cpu_8bit = type(optimizer).__module__.startswith("bitsandbytes") and not cuda_blocks
        self._kernels = Adam8bitCpu() if cpu_8bit else None
        self._host: set[int] = set()  # storages an offloading optimizer keeps in host memory: not counted
        self._aliases: dict = {}  # operator -> whether its schema lets an output alias an input

    # -- bookkeeping
    def _track(self, t: torch.Tensor, tag: str, retag: bool = False) -> None:
        st = t.untyped_storage()
        key = id(st)
        if key in self._host:
            return
        entry = self._live.get(key)
        if entry is not None:
            if retag and entry[1] != tag:
                self.by_tag[entry[1]] -= entry[0]
                self.by_tag[tag] += entry[0]
                entry[1] = tag
                self._grads_changed()
            return
        n = storage_bytes(st, t.device.type == "cuda" if self.cuda_blocks is None else self.cuda_blocks)
        self._live[key] = [n, tag, weakref.ref(st, lambda _, k=key: self._free(k))]
        self._grow(tag, n)

    def _grow(self, tag: str, n: int) -> None:
        self.current += n
        self.by_tag[tag] += n
        if tag == "gradients":
            self._grads_changed()
        elif self.current - self._grads > self._stage_max:
            self._stage_max = self.current - self._grads
        if self.current > self.peak:
            self.peak = self.current
            self.at_peak = {k: v for k, v in self.by_tag.items() if v}

    def _free(self, key: int) -> None:
        entry = self._live.pop(key, None)
        if entry is not None:
            self.current -= entry[0]
            self.by_tag[entry[1]] -= entry[0]
            if entry[1] == "gradients":
                self._grads_changed()

    def _close_stage(self) -> None:
        self.stages.append((self._grads, self._stage_max, self._part))
        self._grads = self.by_tag["gradients"]
        self._stage_max = self.current - self._grads

    _grads_changed = _close_stage

    def finish(self) -> None:
        """Close the last stage (called on exit)."""
        self._close_stage()

    # -- what exists before the step
    def _track_resident(self) -> None:
        for p in self.model.parameters():
            self._track(p, "parameters")
            if p.grad is not None:
                self._track(p.grad, "gradients")
        for b in self.model.buffers():
            self._track(b, "buffers")
        if self.optimizer is not None:
            for state in self.optimizer.state.values():
                for v in state.values():
                    if isinstance(v, torch.Tensor):
                        self._track(v, "optimizer state")

    def _set_tag(self, tag: str):
        def hook(*_):
            if tag != self._tag:
                self._tag = tag
                self._close_stage()  # each module's part of the forward is a stage of its own
        return hook

    def _forward_starts(self, *_):
        self._close_stage()
        self._micro += 1
        self._part = FIRST if self._micro == 0 else LATER
        self._tag = "forward: other"

    def _forward_ends(self, module, args, out):
        loss = out[0] if isinstance(out, tuple) else out
        if isinstance(loss, torch.Tensor) and loss.requires_grad:
            # the engine runs queued callbacks once the whole backward is done
            loss.register_hook(lambda g: torch.autograd.Variable._execution_engine.queue_callback(
                self._backward_ends) and None)

    def _backward_ends(self) -> None:
        self._close_stage()
        self._part = TAIL

    def _install_hooks(self) -> None:
        add = self._handles.append
        add(self.model.register_forward_pre_hook(self._forward_starts))
        add(self.model.register_forward_hook(self._forward_ends))
        add(self.model.register_forward_pre_hook(self._set_tag("forward: other")))
        add(self.model.register_forward_hook(self._set_tag("other")))
        for name, child in self.model.named_children():
            add(child.register_forward_pre_hook(self._set_tag(f"forward: {name}")))
            add(child.register_forward_hook(self._set_tag("forward: other")))
        for p in self.model.parameters():
            if p.requires_grad:
                add(p.register_post_accumulate_grad_hook(lambda q: self._track(q.grad, "gradients", retag=True)))
        if self.optimizer is not None:
            add(self.optimizer.register_step_pre_hook(self._set_tag("optimizer step")))
            add(self.optimizer.register_step_post_hook(self._set_tag("other")))

    def _patch_resize(self) -> None:
        # FSDP2 frees and re-materialises unsharded parameters with `resize_`, which no dispatch mode sees
        self._orig_resize = orig = torch.UntypedStorage.resize_
        tracker = self

        def resize_(st, size):
            orig(st, size)
            entry = tracker._live.get(id(st))
            if entry is not None and entry[0] != st.nbytes():
                tracker.by_tag[entry[1]] -= entry[0]
                tracker.current -= entry[0]
                entry[0] = storage_bytes(st, st.device.type == "cuda" if tracker.cuda_blocks is None
                                         else tracker.cuda_blocks)
                tracker._grow(entry[1], entry[0])

        torch.UntypedStorage.resize_ = resize_

    def __enter__(self):
        # re-entrant: tensors tracked in an earlier `with` and still alive stay counted (a leak shows
        # as `current` rising from one tracked step to the next); the peak starts afresh
        host = getattr(self.optimizer, "host_tensors", None)
        self._host = {id(t.untyped_storage()) for t in host()} if host else set()
        self._track_resident()
        self.peak = self.current
        self.at_peak = {k: v for k, v in self.by_tag.items() if v}
        self.stages.clear()
        self._micro, self._part = -1, TAIL
        self._grads = self.by_tag["gradients"]
        self._stage_max = self.current - self._grads
        self._install_hooks()
        self._patch_resize()
        out = super().__enter__()
        if self._kernels is not None:
            self._kernels.__enter__()
        return out

    def __exit__(self, *exc):
        if self._kernels is not None:
            self._kernels.__exit__(*exc)
        self.finish()
        for h in self._handles:
            h.remove()
        self._handles.clear()
        torch.UntypedStorage.resize_ = self._orig_resize
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is DEVICE_QUERY:  # fake tensors ask for their device through the mode stack: most calls, no bytes
            return func(*args)
        out = func(*args, **(kwargs or {}))
        tag = "backward" if torch._C._current_autograd_node() is not None else self._tag
        # a view of an input (or an in-place op on one) allocates nothing, even when the input was made
        # before the step (a split batch's halves are views of the batch); the schema says which ops alias
        inputs, aliases = (), self._aliases.get(func)
        if aliases is None:
            schema = getattr(func, "_schema", None)
            aliases = self._aliases[func] = schema is None or any(r.alias_info is not None for r in schema.returns)
        if aliases:
            inputs = {id(t.untyped_storage()) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in (out,) if isinstance(out, torch.Tensor) else tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and (id(t.untyped_storage()) not in inputs
                                                or id(t.untyped_storage()) in self._live):
                self._track(t, tag)
        return out
