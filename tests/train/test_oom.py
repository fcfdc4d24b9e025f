"""Out of memory in one place (`paratune.train.oom`, issue 25 defect 4): the RuntimeErrors of CUDA's
libraries count as out of memory and split the micro-batch like `torch.OutOfMemoryError`; where a split
cannot help (the gradient all-reduce, the optimizer step) the step stops with one error; other errors
pass unchanged."""
from __future__ import annotations

import pytest
import torch

from paratune.train.oom import OutOfMemoryStop, default_budget, in_fsdp_internals, is_oom
from paratune.train.step import Micro, make_optimizer, train_step
from tests.train.test_guard import _assert_same_grads, _batch, _deterministic_model, _grads, _reference_grads

GiB = 2**30
CUBLAS = "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"
OUT_OF_MEMORY = [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    RuntimeError(CUBLAS),
    RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"),
    RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported"),
    RuntimeError("NCCL error in: ProcessGroupNCCL.cpp:1970, unhandled cuda error (run with NCCL_DEBUG=INFO for "
                 "details), NCCL version 2.21.5\nLast error:\nCuda failure 'out of memory'"),
]
OTHER = [
    RuntimeError("CUDA error: device-side assert triggered"),
    RuntimeError("NCCL error: remote process exited or there was a network error"),
    ValueError("out of memory"),  # not an error a CUDA library raises
    MemoryError(),  # the host's memory: no split of a device batch frees it
]


@pytest.mark.parametrize("error", OUT_OF_MEMORY + OTHER, ids=lambda e: f"{type(e).__name__}:{str(e)[:30]}")
def test_out_of_memory_is_recognised_whatever_raises_it(error):
    assert is_oom(error) == any(error is e for e in OUT_OF_MEMORY)


def _raise_in_backward_once(model, error: Exception) -> None:
    """`error` from the encoder's backward, the first time it runs."""
    fired = []

    def attach(module, args, out):
        hidden = out[0] if isinstance(out, tuple) else out

        def hook(grad):
            if not fired:
                fired.append(True)
                raise error
            return grad
        if hidden.requires_grad:
            hidden.register_hook(hook)
    model.encoder.register_forward_hook(attach)


def test_a_cublas_allocation_failure_in_backward_splits_the_micro_batch():
    """The autograd thread creates its cuBLAS handle at the first backward matmul: out of memory there is a
    RuntimeError. The micro-batch is split, and the step's gradient is the unsplit one."""
    model = _deterministic_model()
    batch = _batch(4)
    expected = _reference_grads(model, batch)
    optimizer = make_optimizer(model, lr=0.0)
    got = _grads(model, optimizer)
    _raise_in_backward_once(model, RuntimeError(CUBLAS))
    result = train_step(model, optimizer, [Micro(batch, 1.0)])
    assert result.splits == 1 and sorted(result.trained) == ["u0", "u1", "u2", "u3"] and not result.quarantined
    _assert_same_grads(got, expected)


def test_another_error_in_backward_is_not_taken_for_out_of_memory():
    model = _deterministic_model()
    _raise_in_backward_once(model, RuntimeError("CUDA error: device-side assert triggered"))
    with pytest.raises(RuntimeError, match="device-side assert"):
        train_step(model, make_optimizer(model, lr=0.0), [Micro(_batch(4), 1.0)])


def test_out_of_memory_in_the_optimizer_step_stops_the_run():
    """AdamW makes its state at the first step: no smaller micro-batch makes it fit."""
    model = _deterministic_model()
    optimizer = make_optimizer(model, lr=1e-3)

    def no_room(*_):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 880.00 MiB")
    optimizer.register_step_pre_hook(no_room)
    with pytest.raises(OutOfMemoryStop, match=r"^out of memory in the optimizer step .*Tried to allocate 880\.00 MiB"
                                              r".*--budget.*--resume") as caught:
        train_step(model, optimizer, [Micro(_batch(4), 1.0)])
    assert "\n" not in str(caught.value)


def test_out_of_memory_in_the_gradient_all_reduce_stops_the_run():
    model = _deterministic_model()

    def all_reduce(bucket):
        raise RuntimeError("CUDA error: out of memory")
    with pytest.raises(OutOfMemoryStop, match="^out of memory in the gradient all-reduce"):
        train_step(model, make_optimizer(model, lr=0.0), [Micro(_batch(4), 1.0)], world_size=2, all_reduce=all_reduce)


def test_out_of_memory_inside_fsdp_is_told_by_the_traceback():
    """FSDP's own buffers: the error passed through torch/distributed/fsdp (test_distributed raises one in
    FSDP's all-gather on a real 2-rank group); a block's own forward did not."""
    namespace = {}
    exec(compile("def all_gather():\n    raise torch.OutOfMemoryError('all-gather output')\n",
                 "/venv/lib/python3.11/site-packages/torch/distributed/fsdp/_fully_shard/_fsdp_collectives.py",
                 "exec"), {"torch": torch}, namespace)
    try:
        namespace["all_gather"]()
    except torch.OutOfMemoryError as e:
        inside = e
    try:
        torch.nn.Linear(2, 2)(torch.zeros(1, 3))
    except RuntimeError as e:
        outside = e
    assert in_fsdp_internals(inside) and not in_fsdp_internals(outside)


def test_the_default_budget_is_what_is_free_less_a_reserve(monkeypatch):
    """Issue 25, defect 5: not the card's whole memory, which leaves nothing for the CUDA context, cuBLAS and
    cuDNN workspaces, NCCL buffers or another process; every rank plans with the least any rank has free."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (70 * GiB, 80 * GiB))
    budget, why = default_budget(torch.device("cuda:0"))
    assert budget == 70 * GiB - (GiB + 4 * GiB)  # the reserve: 1 GiB + 5 % of 80 GiB
    assert why.startswith("65.00 GiB: 70.00 GiB free of the card's 80.00 GiB") and "5.00 GiB" in why
    assert default_budget(torch.device("cuda:0"), lambda free: [free, 60 * GiB])[0] == 55 * GiB
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (4 * GiB, 80 * GiB))
    with pytest.raises(OutOfMemoryStop, match="no budget is left on cuda:0: 4.00 GiB free.*--budget"):
        default_budget(torch.device("cuda:0"))
    assert default_budget(torch.device("cpu"))[0] == 8 * GiB
