"""FunASR's `warmuplr` schedule: lr = base * warmup^0.5 * min(step^-0.5, step * warmup^-1.5)
(linear warmup to `base` at `warmup_steps`, then inverse square root decay)."""
from __future__ import annotations

import torch


class WarmupLR(torch.optim.lr_scheduler.LRScheduler):
    def __init__(self, optimizer: torch.optim.Optimizer, warmup_steps: int = 25000, last_epoch: int = -1):
        self.warmup_steps = max(1, int(warmup_steps))
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        step = self.last_epoch + 1
        factor = self.warmup_steps ** 0.5 * min(step ** -0.5, step * self.warmup_steps ** -1.5)
        return [base * factor for base in self.base_lrs]
