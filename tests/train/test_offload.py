"""AdamW with its state in host memory (`HostAdamW`, `optimizer: adamw_offload`): the same update as the
device AdamW, through `prepare_model` and `train_step` as the trainer runs them (clipping, a changed learning
rate), a checkpoint either optimizer loads, and no optimizer state or update temporaries in device memory."""
from __future__ import annotations

import copy

import pytest
import torch

from paratune.memory.trace import StepOptions, StepTracer, fake_batch
from paratune.model.build import build_paraformer
from paratune.train.offload import HostAdamW
from paratune.train.step import prepare_model, train_step
from tests.model.reference import load_config, small_config

INPUT, VOCAB = 560, 100


@pytest.fixture(scope="module")
def config(large_dir):
    return small_config(load_config(large_dir))


def prepared(config: dict, optimizer: str, seed: int = 0):
    torch.manual_seed(seed)
    return prepare_model(build_paraformer(config, VOCAB, INPUT), StepOptions(optimizer=optimizer), lr=1e-3,
                         weight_decay=0.01)


def batch(i: int) -> dict:
    b = fake_batch(2, 40 + 7 * i, 4 + i, INPUT, VOCAB)
    b["speech"] = torch.randn(b["speech"].shape, generator=torch.Generator().manual_seed(i))
    b["text"] = torch.randint(1, VOCAB, b["text"].shape, generator=torch.Generator().manual_seed(100 + i))
    return b


def run(ready, steps, grad_clip=0.5) -> None:
    for i in steps:
        ready.optimizer.param_groups[0]["lr"] = 1e-3 * (i + 1)  # as the warmup schedule changes it
        torch.manual_seed(1000 + i)  # the same dropout masks in both runs
        train_step(ready.model, ready.optimizer, batch(i), grad_clip=grad_clip)


def max_difference(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


def test_same_update_as_device_adamw(config):
    device, host = prepared(config, "adamw"), prepared(config, "adamw_offload")
    assert isinstance(host.optimizer, HostAdamW)
    start = copy.deepcopy(host.model)
    run(device, range(3))
    run(host, range(3))
    assert max_difference(host.model, start) > 1e-4  # it trained
    assert max_difference(device.model, host.model) < 1e-6
    # weights written into the model between steps (a checkpoint loaded mid-run) are what the next update
    # starts from, not the host's copy of the old ones
    for ready in (device, host):
        ready.model.load_state_dict(start.state_dict())
        run(ready, [3])
    assert max_difference(device.model, host.model) < 1e-6
    # with clipping the update differs from one without: the host step uses the clipped gradients
    unclipped = prepared(config, "adamw_offload")
    run(unclipped, range(3), grad_clip=None)
    assert max_difference(unclipped.model, host.model) > 1e-5


def test_resume_and_either_optimizer_loads_the_others_checkpoint(config):
    whole = prepared(config, "adamw_offload")
    run(whole, range(2))
    model_state = copy.deepcopy(whole.model.state_dict())
    optim_state = copy.deepcopy(whole.optimizer.state_dict())
    run(whole, [2])
    for name in ("adamw_offload", "adamw"):
        # a fresh run (other weights) loading the checkpoint as the trainer does: model, then optimizer
        resumed = prepared(config, name, seed=1)
        resumed.model.load_state_dict(model_state)
        resumed.optimizer.load_state_dict(copy.deepcopy(optim_state))
        run(resumed, [2])
        assert max_difference(resumed.model, whole.model) < 1e-6, name
    # and a device AdamW's checkpoint resumes with the state in host memory
    device = prepared(config, "adamw")
    run(device, range(2))
    host = prepared(config, "adamw_offload", seed=1)
    host.model.load_state_dict(device.model.state_dict())
    host.optimizer.load_state_dict(copy.deepcopy(device.optimizer.state_dict()))  # as torch.load gives it
    run(device, [2])
    run(host, [2])
    assert max_difference(device.model, host.model) < 1e-6
    assert all(t.device.type == "cpu" for t in host.optimizer.host_tensors())


def test_a_parameter_without_a_gradient_is_not_updated():
    used, unused = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
    optimizer = HostAdamW([*used.parameters(), *unused.parameters()], lr=0.1, weight_decay=0.1)
    before = copy.deepcopy(unused.state_dict())
    used(torch.randn(4, 8)).sum().backward()
    optimizer.step()
    assert all(torch.equal(v, unused.state_dict()[k]) for k, v in before.items())
    assert len(optimizer.host.state) == 2  # the used layer's weight and bias only


def test_device_memory_holds_no_optimizer_state(config):
    """The traced step (fake tensors, as the plan traces it): the resident state is gone from the device and
    the optimizer step adds nothing there, so the step's peak falls by at least fp32 AdamW's state."""
    plain = StepTracer(config, VOCAB, INPUT, StepOptions())
    host = StepTracer(config, VOCAB, INPUT, StepOptions(optimizer="adamw_offload"))
    assert host.resident()["optimizer_state"] == 0
    assert {k: v for k, v in host.resident().items() if k != "optimizer_state"} == \
        {k: v for k, v in plain.resident().items() if k != "optimizer_state"}
    shape = (2, 60, 6)
    a, b = plain.trace(*shape), host.trace(*shape)
    assert a.peak - b.peak >= plain.resident()["optimizer_state"]
    assert not {"optimizer state", "optimizer step"} & set(b.breakdown)
    # after the backward (the clip and the update): no more than the step's gradients and parameters
    # beside the clip's few scalars
    tail = max(g + o for g, o, part in b.stages if part == 2)
    resident = host.resident()
    assert tail <= resident["parameters"] + resident["gradients"] + 64 * 1024


def test_host_copies_are_on_the_cpu_whatever_the_parameters_device():
    """No GPU in CI: meta parameters stand for device ones. The optimizer's groups hold them (schedulers and
    the loss scaler act on the device), every tensor it keeps is a CPU one, and it holds no device state."""
    with torch.device("meta"):
        layer = torch.nn.Linear(64, 32)
    optimizer = HostAdamW(layer.parameters(), lr=0.1)
    assert all(p.device.type == "meta" for g in optimizer.param_groups for p in g["params"])
    assert [t.device.type for t in optimizer.host_tensors()] == ["cpu"] * 4  # 2 weights, 2 gradient buffers
    assert [tuple(t.shape) for t in optimizer.host_tensors()[:2]] == [(32, 64), (32,)]
    assert not optimizer.state
