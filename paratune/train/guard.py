"""Injected out-of-memory errors, so that the OOM recovery of `paratune.train.step.train_step` (split the
micro-batch, redo the step, quarantine one utterance that never fits) runs on a CPU and in tests.

`InjectOOM` raises a real `torch.OutOfMemoryError` at chosen steps, at odd-numbered injections in the
encoder's forward and at even-numbered ones in backward. `paratune finetune --inject-oom STEPS
--inject-oom-rank R` injects on one rank only: the others must split with it (lockstep).
"""
from __future__ import annotations

import torch


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
