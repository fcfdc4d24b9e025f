"""What counts as running out of device memory, and what the trainer does about it: one place (issue 25).

PyTorch's caching allocator raises `torch.OutOfMemoryError`. The CUDA libraries it calls report the
same cause as a plain RuntimeError: cuBLAS when a thread creates its first handle (the autograd thread,
at the first backward matmul), cuDNN (the LSTMs of BiCif and SeACo), an allocation outside the caching
allocator ("CUDA error: out of memory"), NCCL's own buffers. All of them are out of memory.

Where it happened decides what helps. In a micro-batch's forward or backward a smaller micro-batch
needs less: the trainer splits it. Inside FSDP's own all-gather or reduce-scatter (after the sync point
the ranks met at), in the gradient all-reduce or in the optimizer step (AdamW makes its state at the
first one), a smaller micro-batch needs no less, and the ranks may already be out of step: the run
stops, on every rank, with one line (`OutOfMemoryStop`), the last checkpoint intact.
"""
from __future__ import annotations

import contextlib
import os
import traceback

import torch

# the messages of out-of-memory RuntimeErrors that are not torch.OutOfMemoryError
MARKERS = ("CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED", "CUDA error: out of memory",
           "CUDA out of memory", "cudaErrorMemoryAllocation")
FSDP_INTERNALS = os.path.join("torch", "distributed", "fsdp", "")


# kept free of a GPU's budget by default: what the caching allocator never holds (cuBLAS and cuDNN
# workspaces, NCCL's buffers under torchrun) and room for fragmentation
RESERVE_BYTES, RESERVE_SHARE = 2**30, 0.05
CPU_BUDGET = 8 * 2**30


class OutOfMemoryStop(RuntimeError):
    """Out of memory where splitting the micro-batch cannot help: every rank stops."""


def is_oom(error: BaseException) -> bool:
    if isinstance(error, torch.OutOfMemoryError):
        return True
    # NCCL: "NCCL error ... unhandled cuda error ... Cuda failure 'out of memory'"
    text = str(error)
    return isinstance(error, RuntimeError) and (any(m in text for m in MARKERS)
                                                or ("NCCL" in text and "out of memory" in text))


def in_fsdp_internals(error: BaseException) -> bool:
    """Whether the error was raised inside FSDP's own code (its all-gather, reduce-scatter, resharding):
    the frames of its traceback."""
    return any(FSDP_INTERNALS in frame.filename for frame in traceback.extract_tb(error.__traceback__))


def stop(error: BaseException, where: str) -> OutOfMemoryStop:
    """The one-line error every rank stops with (`raise stop(e, ...) from e`)."""
    first = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
    return OutOfMemoryStop(f"out of memory in {where} ({first}): a smaller micro-batch needs no less here, so the "
                           "run stops; the last checkpoint is intact. Lower --budget (or free the card), then "
                           "restart with --resume")


@contextlib.contextmanager
def stops(where: str):
    """Out of memory inside this block stops the run (`stop`); any other error passes unchanged."""
    try:
        yield
    except Exception as e:
        if is_oom(e):
            raise stop(e, where) from e
        raise


def default_budget(device: torch.device, free_per_rank=None) -> tuple[int, str]:
    """The budget when --budget is not given, and why. On a GPU: what is free once this process's CUDA
    context exists (other processes and the context excluded), the least any rank saw (`free_per_rank`:
    gathers every rank's figure; ranks must plan alike), less a reserve of 1 GiB + 5 % of the card. On a
    CPU: 8 GiB of tensors."""
    from paratune.memory.plan import gib  # here: the plan imports the step, which imports this module
    if device.type != "cuda":
        return CPU_BUDGET, f"{gib(CPU_BUDGET)} of CPU tensors (the default without a GPU)"
    free, total = torch.cuda.mem_get_info(device)
    free = min(free_per_rank(free)) if free_per_rank else free
    reserve = RESERVE_BYTES + int(RESERVE_SHARE * total)
    why = (f"{gib(free)} free of the card's {gib(total)} once the CUDA context exists, less a reserve of "
           f"{gib(reserve)} (1 GiB + 5 %) for cuBLAS and cuDNN workspaces, NCCL buffers and fragmentation")
    if free - reserve <= 0:
        raise OutOfMemoryStop(f"no budget is left on {device}: {why}; free the card or give --budget")
    return free - reserve, f"{gib(free - reserve)}: {why}"

