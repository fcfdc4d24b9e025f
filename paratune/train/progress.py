"""The trainer's progress on rank 0: tokens per second, and a rich bar (ETA, memory now / peak /
budget, loss) when stderr is a terminal; without one the trainer logs a line every log_interval steps."""
from __future__ import annotations

import sys
import time

from paratune.memory.plan import gib


class Progress:
    def __init__(self):
        self.start = time.time()
        self.tokens = 0
        self.bar = self.task = None
        if sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeRemainingColumn
            self.bar = Bar(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                           TextColumn("{task.fields[info]}"), console=Console(stderr=True))
            self.bar.start()

    def elapsed(self) -> float:
        return time.time() - self.start

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    def rate(self) -> float:
        return self.tokens / max(self.elapsed(), 1e-9)

    def start_epoch(self, epoch: int, n_batches: int, position: int) -> None:
        if self.bar is not None:
            self.task = self.bar.add_task(f"epoch {epoch}", total=n_batches, completed=position, info="")

    def update(self, position: int, loss: float, last, budget: int) -> None:
        if self.bar is None or self.task is None:
            return
        memory = f"{gib(last.allocated)} now / {gib(last.peak)} peak / {gib(budget)}" if last else ""
        self.bar.update(self.task, completed=position, info=f"loss {loss:.3f}  {self.rate():.0f} tok/s  memory {memory}")

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()
