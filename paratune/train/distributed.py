"""Process-group set-up and every collective the trainer calls.

On GPUs the group is made with the backend string `cpu:gloo,cuda:nccl`: one group that serves CPU
tensors through gloo and CUDA tensors through NCCL. Small agreements (the OOM flag, the fit, the
ledger's keys) are CPU tensors or pickled objects and go through gloo; the gradient all-reduce is on
the training device and goes through NCCL. A group made with plain "nccl" has no CPU backend, and the
first CPU collective fails ("No backend type associated with device type cpu"), so no collective
here ever depends on which device the training runs on except `all_reduce_gradients`.

Without torchrun (WORLD_SIZE unset or 1) every function is a local no-op, so the trainer, the tracer
and the tests call the same code on one process.

An OOM on one rank must make every rank drop that micro-batch together (`Local`, `Ranks`, `OOMSync`,
made by `agreement()` and `shard()`). Under DDP no
collective runs inside forward or backward, so a flag all-reduced after each micro-batch is enough.
Under FSDP every block all-gathers in forward and reduce-scatters in backward: a rank that leaves
its forward early would leave the others waiting in the next block's collective. There a sync point
(a flag all-reduce on its own gloo group) stands before every FSDP collective (`OOMSync`); the rank
that ran out of memory sends 1 from its except handler, which meets the others at their next sync
point, and they unwind too. An OOM inside FSDP's own all-gather or reduce-scatter buffers, after the
sync point, stops the run instead (`paratune.train.oom`): the peers are already in that collective.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import pickle
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.autograd import Variable
from torch.utils._pytree import tree_flatten, tree_unflatten

# The gradient all-reduce works in flat buckets of at most this many bytes: no second copy of the gradients.
BUCKET = 25 * 2**20
ALLOC_CONF = "expandable_segments:True"  # fewer fragmented blocks when batch shapes vary


class DistributedError(RuntimeError):
    """A rank could not go on because another rank failed or did not answer in time."""


@dataclass(frozen=True)
class World:
    size: int = 1
    rank: int = 0
    device: torch.device = torch.device("cpu")
    timeout_s: float = 1800.0  # of every collective

    @property
    def lead(self) -> bool:
        return self.rank == 0


def backend_for(device: torch.device) -> str:
    """One group for CPU and CUDA tensors on GPUs; gloo alone on CPUs."""
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"


def set_alloc_conf() -> None:
    """Expandable segments for the CUDA caching allocator, unless the user chose: it reads the variable
    once, when CUDA starts, so this must come before anything touches CUDA."""
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", ALLOC_CONF)


def setup(device_arg: str | None = None, timeout_s: float = 1800.0) -> World:
    """The world torchrun describes (WORLD_SIZE, RANK, LOCAL_RANK), its group joined, the device chosen.
    Every collective of the group gives up after `timeout_s` (and of the groups made later, which are
    given `World.timeout_s`: torch gives a new group its own 30-minute default), so that a dead or stuck
    peer ends the run instead of holding it.

    PYTORCH_CUDA_ALLOC_CONF is set before anything touches CUDA (set_device initialises it), on every
    path: one process or many, torchrun or not; a value the user set is kept."""
    set_alloc_conf()
    size = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available() and (device_arg or "cuda").startswith("cuda")
    if size < 2:
        device = torch.device(device_arg) if device_arg else torch.device("cuda" if cuda else "cpu")
        if device.type == "cuda" and cuda:  # the current device: what pinned memory and synchronize use
            device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
            torch.cuda.set_device(device)
        return World(1, 0, device)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group(backend_for(device), timeout=datetime.timedelta(seconds=timeout_s))
    return World(dist.get_world_size(), dist.get_rank(), device, timeout_s)


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def teardown() -> None:
    if active():
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if active():
        dist.barrier()


def any_rank(flag: bool, group=None) -> bool:
    """True on every rank if it is true on any (a CPU tensor: gloo serves it on every device)."""
    if not active():
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return bool(t.item())


def gather_objects(obj) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    if not active():
        return [obj]
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, obj)
    return parts


def broadcast_model(model: torch.nn.Module) -> None:
    """Every rank starts from rank 0's weights and buffers."""
    if active():
        for t in model.state_dict().values():
            dist.broadcast(t, 0)


def all_reduce_gradients(model: torch.nn.Module, world_size: int, bucket_bytes: int = BUCKET,
                         all_reduce=None) -> None:
    """The mean of the ranks' gradients, after all of a step's micro-batches (none of which talked to
    the other ranks, so an OOM on one rank cannot leave the others waiting inside a backward). Flat
    buckets of at most `bucket_bytes`: the step needs no second copy of the gradients. The memory
    model traces this same function with a no-op `all_reduce` (the bucket is what costs memory)."""
    all_reduce = all_reduce or dist.all_reduce
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    i = 0
    while i < len(grads):
        j, size = i, 0
        while j < len(grads) and (j == i or size + grads[j].numel() * grads[j].element_size() <= bucket_bytes):
            size += grads[j].numel() * grads[j].element_size()
            j += 1
        group = grads[i:j]
        flat = torch.cat([g.reshape(-1) for g in group])
        all_reduce(flat)
        flat /= world_size
        offset = 0
        for g in group:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
        i = j


def lead_first(fn, timeout_s: float = 1800.0):
    """Run `fn()` on rank 0 and give its result to every rank (pickled, over a gloo group with its own
    timeout). If rank 0 raises, every other rank raises a DistributedError with rank 0's message; if
    rank 0 does not answer within `timeout_s` (it died, or is stuck), they raise one that says so,
    instead of waiting for ever."""
    if not active():
        return fn()
    group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
    payload = [None]
    if dist.get_rank() == 0:
        try:
            payload = [("ok", fn())]
        except Exception as e:  # noqa: BLE001 - passed to the other ranks, then raised here too
            dist.broadcast_object_list([("error", f"{type(e).__name__}: {e}")], src=0, group=group)
            raise
    try:
        dist.broadcast_object_list(payload, src=0, group=group)
    except (RuntimeError, pickle.UnpicklingError) as e:
        raise DistributedError(f"rank {dist.get_rank()}: rank 0 did not finish the memory fit within "
                               f"{timeout_s:.0f} s ({e}); see rank 0's log") from e
    status, value = payload[0]
    if status == "error":
        raise DistributedError(f"rank {dist.get_rank()}: rank 0 failed while fitting the memory model: {value}")
    return value


class PeerOutOfMemory(RuntimeError):
    """Another rank ran out of memory in this micro-batch: this rank drops it too."""


class Local:
    """One process: an OOM is this process's alone."""

    peer_error: tuple = ()  # exception types that mean "another rank failed"

    def failed(self, oom: bool) -> bool:
        return oom

    def signal(self) -> None:
        """Called by the rank that ran out of memory, from its except handler."""

    def reset(self, model) -> None:
        """Called on every rank after a dropped micro-batch."""

    def micro_batch(self):
        """The span of one micro-batch's forward and backward in a training step."""
        return contextlib.nullcontext()


class Ranks(Local):
    """DDP: the OOM flag all-reduced after every micro-batch."""

    def failed(self, oom: bool) -> bool:
        return any_rank(oom)


def agreement() -> Local:
    return Ranks() if active() else Local()


class OOMSync(Ranks):
    """FSDP: sync points before every FSDP collective in forward and backward (`install`), and FSDP's
    state reset after a dropped micro-batch."""

    peer_error = (PeerOutOfMemory,)

    def __init__(self, timeout_s: float = 1800.0):
        # a CPU flag, never interleaved with NCCL work
        self.group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
        self.handles, self.callback_queued = [], False
        self.stepping = False

    @contextlib.contextmanager
    def micro_batch(self):
        """Sync points run while a training step's micro-batch does, whatever the grad mode: the glancing
        pass all-gathers every decoder block under no_grad. Validation and decoding run none."""
        self.stepping = True
        try:
            yield
        finally:
            self.stepping = False

    def _sync(self, flag: bool) -> bool:
        return any_rank(flag, self.group)

    def check(self, where: str) -> None:
        """A sync point on a rank that is doing fine: unwind if another rank failed."""
        if self._sync(False):
            raise PeerOutOfMemory(f"another rank ran out of memory ({where}); dropping this micro-batch with it")

    def signal(self) -> None:
        self._sync(True)

    def _final(self) -> None:  # before FSDP's root callback, which reduce-scatters what is left
        self.callback_queued = False
        self.check("before FSDP's final reduce-scatters")

    def _pre_backward(self, name: str):
        def hook(grad):
            if not self.callback_queued:  # engine callbacks run in order: this one before FSDP's
                self.callback_queued = True
                Variable._execution_engine.queue_callback(self._final)
            self.check(f"backward of {name}")
            return grad
        return hook

    def install(self, units) -> None:
        """Hooks on every fully_shard'ed module [(name, module)], registered after fully_shard: before
        its forward all-gather (a pre-hook prepended ahead of FSDP's), before its backward all-gather (a
        tensor hook on its outputs, added before FSDP's), before its reduce-scatter (an identity function
        over its inputs, applied after FSDP's, so its backward runs first)."""
        for name, m in units:
            def pre_forward(module, args, kwargs, name=name):
                if self.stepping:
                    self.check(f"forward of {name}")

            def wrap_inputs(module, args, kwargs, name=name):
                if not torch.is_grad_enabled():
                    return None
                leaves, spec = tree_flatten((args, kwargs))
                idx = [i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor) and x.requires_grad]
                if not idx:
                    return None
                out = _SyncInBackward.apply(self, name, *[leaves[i] for i in idx])
                for i, t in zip(idx, out if isinstance(out, tuple) else (out,)):
                    leaves[i] = t
                return tree_unflatten(leaves, spec)

            def hook_outputs(module, args, output, name=name):
                if torch.is_grad_enabled():
                    for t in tree_flatten(output)[0]:
                        if isinstance(t, torch.Tensor) and t.requires_grad:
                            t.register_hook(self._pre_backward(name))

            self.handles += [m.register_forward_pre_hook(pre_forward, prepend=True, with_kwargs=True),
                             m.register_forward_pre_hook(wrap_inputs, prepend=False, with_kwargs=True),
                             m.register_forward_hook(hook_outputs, prepend=True)]

    def reset(self, root) -> None:
        """FSDP2's own recovery (reshard, clear the iteration state), and the unsharded parameters'
        partial gradients of blocks whose reduce-scatter never ran: left, they would be added to the
        next backward's."""
        root.reset_iter_state()
        for state in root._get_fsdp_state()._state_ctx.all_states:
            for group in state._fsdp_param_groups:
                for p in group.fsdp_params:
                    if getattr(p, "_unsharded_param", None) is not None:
                        p._unsharded_param.grad = None
                    p.unsharded_accumulated_grad = None
        self.callback_queued = False


class _SyncInBackward(torch.autograd.Function):
    """The identity in forward; in backward, a sync point before FSDP reduce-scatters the block."""

    @staticmethod
    def forward(ctx, sync, name, *tensors):
        ctx.sync, ctx.name = sync, name
        return tensors if len(tensors) > 1 else tensors[0]

    @staticmethod
    def backward(ctx, *grads):
        ctx.sync.check(f"gradients of {ctx.name}")
        return (None, None, *grads)


def shard(model: torch.nn.Module, timeout_s: float = 1800.0) -> tuple[torch.nn.Module, OOMSync]:
    """FSDP2 over the ranks: every block (encoder, decoder, SeACo's seaco decoder), then the model; with its
    OOM sync points (on a group whose collectives give up after `timeout_s`)."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
    blocks = [(f"{stack.replace('_', ' ')} block {i}", b) for stack, layers in model.block_stacks().items()
              for i, b in enumerate(layers)]
    for _, layer in blocks:
        fully_shard(layer)
    fully_shard(model)
    register_fsdp_forward_method(model, "decode")  # validation decodes: gather the root's weights too
    sync = OOMSync(timeout_s)
    sync.install(blocks + [("the model", model)])
    return model, sync
