"""Measure a training step's peak tensor memory by running it on fake tensors.

The step is `paratune.train.step.train_step`, the code the trainer runs. Under `FakeTensorMode` every
tensor has a shape, dtype and device but no storage and no arithmetic, so paraformer-large at any batch
shape costs neither memory nor compute; PyTorch's `MemTracker` sees each tensor as it is created and
freed and keeps the peak, split into parameters, gradients, optimizer state, activations and temporaries.
The same tracker on real tensors gives the same figure (tests/memory checks this).
"""
from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.mem_tracker import MemTracker

from paratune.model.paraformer import build_paraformer, set_checkpointing
from paratune.train.step import make_optimizer, train_step

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class StepOptions:
    """What changes a step's memory besides the batch shape."""

    precision: str = "fp32"  # fp32 | bf16 (autocast) | fp16 (autocast + loss scaling)
    checkpointing: bool = False  # activation checkpointing of every encoder and decoder block
    frozen: tuple[str, ...] = ()  # parameter-name prefixes not trained, e.g. ("encoder.",)
    grad_clip: float | None = 5.0

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; choose from {', '.join(PRECISIONS)}")

    def to_dict(self) -> dict:
        return asdict(self)


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
    breakdown: dict  # bytes by MemTracker category at the peak


class StepTracer:
    """A model built once on fake tensors; `peak(B, T, U)` traces one steady-state step."""

    def __init__(self, config: dict, vocab: int, input_size: int, options: StepOptions = StepOptions(),
                 fake: bool = True):
        self.vocab, self.input_size, self.options = vocab, input_size, options
        self.mode = FakeTensorMode() if fake else contextlib.nullcontext()
        with self.mode:
            self.model = build_paraformer(config, vocab, input_size).train()
            for name, p in self.model.named_parameters():
                if any(name.startswith(prefix) for prefix in options.frozen):
                    p.requires_grad_(False)
            if options.checkpointing:
                set_checkpointing(self.model, encoder_blocks=None, decoder_blocks=None)
            self.optimizer = make_optimizer(self.model)
            self.scaler = torch.amp.GradScaler("cpu") if options.precision == "fp16" else None
            # one step creates the optimizer state: what a long run holds at every later step
            self._step(fake_batch(1, 8, 2, input_size, vocab))

    def _step(self, batch):
        train_step(self.model, self.optimizer, batch, grad_clip=self.options.grad_clip,
                   autocast_dtype=PRECISIONS[self.options.precision], scaler=self.scaler, return_stats=False)

    def peak(self, batch: int, frames: int, tokens: int) -> Traced:
        with self.mode:
            data = fake_batch(batch, frames, tokens, self.input_size, self.vocab)
            tracker = MemTracker()
            tracker.track_external(self.model, self.optimizer)
            with tracker:
                self._step(data)
            snap = tracker.get_tracker_snapshot("peak")
        dev = next(iter(snap.values()))
        return Traced(int(dev["Total"]), {str(k): int(v) for k, v in dev.items() if k != "Total"})

    def resident(self) -> dict:
        """Bytes that live across steps: parameters, optimizer state (gradients are dropped)."""
        params = sum(p.numel() * p.element_size() for p in self.model.parameters())
        state = sum(t.numel() * t.element_size() for s in self.optimizer.state.values()
                    for t in s.values() if isinstance(t, torch.Tensor))
        grads = sum(p.numel() * p.element_size() for p in self.model.parameters() if p.requires_grad)
        return {"parameters": params, "optimizer_state": state, "gradients": grads}
