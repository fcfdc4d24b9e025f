"""Compare the memory model with real steps and keep the correction.

On a GPU the allocator's own figures are the truth: `max_memory_allocated` (tensor bytes, rounded to
the allocator's blocks) and `max_memory_reserved` (what it holds from the driver, including free
blocks). The model predicts tensor bytes, so the reserved/predicted ratio is what a budget must allow
for. On a CPU the same code measures real tensors with the tracker the model was fitted with, which
checks the fit itself (allocated = reserved there). The model's weights are random: a training step's
memory depends on the shapes, not the values (CIF is given the target lengths in training).
"""
from __future__ import annotations

import datetime
import platform

import torch

from paratune.memory.estimate import MemoryModel
from paratune.memory.trace import PRECISIONS, StepOptions, fake_batch, no_collective
from paratune.memory.tracker import PeakMemory
from paratune.modeldir import ModelSpec
from paratune.train.distributed import Local
from paratune.train.step import prepare_model, train_step


def real_batch(spec: ModelSpec, b: int, t: int, u: int, device) -> dict:
    """Random inputs of the padded shape (B, T, U) on `device`."""
    batch = fake_batch(b, t, u, spec.input_size, spec.vocab_size)
    batch["speech"] = torch.randn(b, t, spec.input_size)
    batch["text"] = torch.randint(1, spec.vocab_size, (b, u))
    return {k: v.to(device) for k, v in batch.items()}


def real_stepper(spec: ModelSpec, options: StepOptions, dev: torch.device):
    """The model on `dev` prepared for `options` (as the trainer prepares it), its optimizer and
    `step(batch)`, one training step as the trainer runs it. A first small step has created the
    optimizer state, as in a long run."""
    ready = prepare_model(spec.build(), options, dev)
    model, optimizer = ready.model, ready.optimizer

    def step(batch):
        train_step(model, optimizer, batch, grad_clip=options.grad_clip,
                   autocast_dtype=PRECISIONS[options.precision], scaler=ready.scaler,
                   world_size=2 if options.ddp else 1, all_reduce=no_collective,
                       agreement=Local())

    step(real_batch(spec, 1, 16, 2, dev))
    return model, optimizer, step


def cuda_peaks(step, batch, dev: torch.device) -> tuple[int, int]:
    """(max allocated, max reserved) bytes of one step on a GPU, from an empty cache: otherwise the cache
    still holds the previous shape's blocks and max_memory_reserved reports them."""
    torch.cuda.synchronize(dev)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(dev)
    step(batch)
    torch.cuda.synchronize(dev)
    return torch.cuda.max_memory_allocated(dev), torch.cuda.max_memory_reserved(dev)


def calibrate(spec: ModelSpec, fitted: MemoryModel, options: StepOptions, shapes, device: str = "cuda",
              seed: int = 0) -> dict:
    """Run real training steps at `shapes` [(B, T, U)] on `device`; return the measured figures and the
    ratios to the prediction, for `MemoryModel.calibration`."""
    dev = torch.device(device)
    torch.manual_seed(seed)
    model, optimizer, step = real_stepper(spec, options, dev)
    rows = []
    for b, t, u in shapes:
        batch = real_batch(spec, b, t, u, dev)
        if dev.type == "cuda":
            allocated, reserved = cuda_peaks(step, batch, dev)
        else:
            with PeakMemory(model, optimizer) as tracker:
                step(batch)
            allocated = reserved = tracker.peak
        del batch
        predicted = fitted.peak(b, t, u)
        rows.append({"batch": b, "frames": t, "tokens": u, "predicted": predicted, "allocated": allocated,
                     "reserved": reserved, "allocated_error": (predicted - allocated) / allocated})
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({platform.processor() or 'host'})"
    return {"device": name, "date": datetime.date.today().isoformat(), "torch": torch.__version__,
            "rows": rows,
            "allocated_ratio": max(r["allocated"] / r["predicted"] for r in rows),
            "reserved_ratio": max(r["reserved"] / r["predicted"] for r in rows)}
