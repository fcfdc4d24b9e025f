"""Memory, watched every step, beside the plan's prediction, with a one-line explanation when it grows.

On a GPU the figures are the caching allocator's own (`torch.cuda.memory_stats`): allocated now and at
the step's peak, reserved, inactive split blocks (freed blocks cut into pieces no request fits: the
fragmentation signature) and allocation retries (the allocator had to free its cache and try again).
On a CPU, the step's tensor bytes come from `PeakMemory` (the tracker the memory model is fitted with)
and the process's resident set size from /proc.

Detectors, each saying what it saw and what to do:
- leak: memory left allocated after the step (the baseline) rising step after step;
- fragmentation: the cache holding more than the largest recent step needed, or allocator retries;
- outlier batch: a step's peak far above what the plan predicted for its shape.
"""
from __future__ import annotations

import csv
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

FIELDS = ("step", "epoch", "batch", "frames", "tokens", "predicted", "peak", "allocated", "reserved",
          "inactive_split", "retries", "rss", "budget")


@dataclass
class Sample:
    step: int
    epoch: int
    batch: int
    frames: int
    tokens: int
    predicted: int
    peak: int
    allocated: int
    reserved: int
    inactive_split: int
    retries: int
    rss: int
    budget: int


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def read_csv(path: Path, skipped: list[str] | None = None) -> list[Sample]:
    """A memory.csv written by MemoryMonitor, as samples. A row with a missing, non-numeric or
    non-finite figure raises ValueError naming file:line, or with `skipped` is left out and said there."""
    samples = []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        for r in reader:
            try:
                values = {k: float(r[k]) for k in FIELDS}
                bad = [k for k, v in values.items() if not np.isfinite(v)]
                if bad:
                    raise ValueError(f"{', '.join(bad)} not a finite number")
            except (TypeError, ValueError) as e:  # TypeError: a short row (None)
                problem = f"{path}:{reader.line_num}: {'a missing figure' if isinstance(e, TypeError) else e}"
                if skipped is None:
                    raise ValueError(problem) from e
                skipped.append(problem + "; row skipped")
                continue
            samples.append(Sample(**{k: int(v) for k, v in values.items()}))
    return samples


def truncate_csv(path: Path, step: int) -> None:
    """A resumed run's memory.csv: the rows of steps after the checkpoint dropped (they run again), and a
    row a crash tore in half."""
    from paratune.io import atomic_write_text
    path = Path(path)
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    keep = lines[:1]
    for line in lines[1:]:
        cells = line.split(",")
        if len(cells) == len(FIELDS) and cells[0].isdigit() and int(cells[0]) <= step:
            keep.append(line)
    atomic_write_text(path, "".join(line + "\n" for line in keep))


class MemoryMonitor:
    def __init__(self, out_dir: Path | None, budget: int, device: torch.device, window: int = 50,
                 tensorboard: bool = True, log=print):
        """`out_dir=None`: no files and no allocator calls, for replaying a recorded memory.csv."""
        self.out_dir, self.budget, self.device, self.window, self.log = out_dir, budget, device, window, log
        self.samples: list[Sample] = []
        self.findings: dict[str, str] = {}
        self.live = out_dir is not None
        self._csv = self._writer = self._tb = None
        if self.live:
            self.out_dir = Path(out_dir)
            self.out_dir.mkdir(parents=True, exist_ok=True)
            path = self.out_dir / "memory.csv"
            new = not path.exists()
            self._csv = open(path, "a", newline="")
            self._writer = csv.DictWriter(self._csv, fieldnames=FIELDS)
            if new:
                self._writer.writeheader()
            if tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter
                    self._tb = SummaryWriter(str(self.out_dir / "tensorboard"))
                except ImportError:
                    pass
        self.empty_cache_calls = 0
        self._quiet_until: dict[str, int] = {}  # detector -> first step it may speak again

    @classmethod
    def replay(cls, rows: list[Sample], window: int = 50, log=lambda line: None) -> "MemoryMonitor":
        """The detectors run over recorded samples (`read_csv`; CUDA figures when they have reserved bytes)."""
        cuda = any(r.reserved for r in rows)
        monitor = cls(None, rows[0].budget if rows else 0, torch.device("cuda" if cuda else "cpu"), window, log=log)
        for r in rows:
            monitor.samples.append(r)
            monitor._detect(r)
        return monitor

    def start_step(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def end_step(self, step: int, epoch: int, shape: tuple[int, int, int], predicted: int, tracked_peak: int | None = None,
                 tracked_now: int | None = None) -> Sample:
        if self.device.type == "cuda":
            s = torch.cuda.memory_stats(self.device)
            peak, allocated = s.get("allocated_bytes.all.peak", 0), s.get("allocated_bytes.all.current", 0)
            reserved, inactive = s.get("reserved_bytes.all.current", 0), s.get("inactive_split_bytes.all.current", 0)
            retries = s.get("num_alloc_retries", 0)
        else:
            peak, allocated = tracked_peak or 0, tracked_now or 0
            reserved, inactive, retries = 0, 0, 0
        sample = Sample(step, epoch, shape[0], shape[1], shape[2], int(predicted), int(peak), int(allocated),
                        int(reserved), int(inactive), int(retries), rss_bytes(), self.budget)
        self.samples.append(sample)
        if self._writer is not None:
            self._writer.writerow(asdict(sample))
            self._csv.flush()  # readable while the run goes on (and after a kill)
        if self._tb is not None:
            for k in ("predicted", "peak", "allocated", "reserved", "rss"):
                self._tb.add_scalar(f"memory/{k}_gib", getattr(sample, k) / 2**30, step)
        self._detect(sample)
        return sample

    # -- detectors
    def _due(self, kind: str, step: int) -> bool:
        """One line per hundred steps from a per-step detector, not one per batch."""
        if step < self._quiet_until.get(kind, 0):
            return False
        self._quiet_until[kind] = step + 100
        return True

    def _say(self, kind: str, text: str) -> None:
        if self.findings.get(kind) != text:
            self.findings[kind] = text
            self.log(f"memory: {kind}: {text}")

    def _detect(self, s: Sample) -> None:
        recent = self.samples[-self.window:]
        if s.predicted and s.peak > 1.10 * s.predicted and self._due("outlier_batch", s.step):
            self._say("outlier_batch", f"step {s.step} (B={s.batch}, T={s.frames}, U={s.tokens}) peaked at "
                                       f"{s.peak / 2**30:.2f} GiB, {100 * (s.peak / s.predicted - 1):.0f} % over the "
                                       f"predicted {s.predicted / 2**30:.2f} GiB: recalibrate (paratune plan --calibrate)"
                                       " or lower the budget")
        if len(recent) >= self.window:
            base = np.array([r.allocated for r in recent], dtype=float)
            slope = np.polyfit(np.arange(len(base)), base, 1)[0]
            rise = slope * len(base)
            if rise > max(0.02 * base[0], 2**20) and (np.diff(base) >= 0).mean() > 0.8:
                self._say("leak", f"memory left allocated after each step rose {rise / 2**20:.0f} MiB over the last "
                                  f"{len(base)} steps (now {base[-1] / 2**30:.2f} GiB): something keeps tensors from "
                                  "earlier steps (a loss kept for logging without .item(), a list of outputs, a hook)")
        if self.device.type == "cuda" and len(recent) >= 10:
            # the cache keeps what the largest recent step needed; more than that is memory the allocator
            # could not reuse (blocks split for other shapes). Reserved minus allocated-after-the-step is
            # no measure: a healthy cache holds the whole step peak between steps.
            needed = max(r.peak for r in recent)
            gap = s.reserved - needed
            if ((gap > max(0.10 * needed, 2**28)) or s.retries > recent[0].retries) and \
                    self._due("fragmentation", s.step):
                self._say("fragmentation", f"the allocator holds {s.reserved / 2**30:.2f} GiB, {gap / 2**30:.2f} GiB "
                                           f"more than the largest step of the last {len(recent)} needed "
                                           f"({needed / 2**30:.2f} GiB); {s.retries} allocator retries: changing "
                                           "batch shapes fragment the cache; use --buckets 1.1 and "
                                           "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True")
                if gap > 0.2 * max(1, s.reserved) and self.live:
                    torch.cuda.empty_cache()  # only past the threshold: it costs the next steps' speed
                    self.empty_cache_calls += 1

    def close(self) -> None:
        if self._csv is not None:
            self._csv.close()
        if self._tb is not None:
            self._tb.close()
        if self.samples and self.live:
            self.plot(self.out_dir / "memory.png")

    def plot(self, path: Path) -> None:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from paratune.io import atomic_write

        steps = [s.step for s in self.samples]
        fig, ax = plt.subplots(figsize=(9, 4), dpi=110)
        ax.plot(steps, [s.predicted / 2**30 for s in self.samples], lw=0.8, label="predicted peak")
        ax.plot(steps, [s.peak / 2**30 for s in self.samples], lw=0.8, label="measured peak")
        ax.plot(steps, [s.allocated / 2**30 for s in self.samples], lw=0.8, label="allocated after step")
        if self.device.type == "cuda":
            ax.plot(steps, [s.reserved / 2**30 for s in self.samples], lw=0.8, label="reserved")
        top = max(max(s.peak, s.predicted) for s in self.samples)
        if self.budget <= 3 * top:
            ax.axhline(self.budget / 2**30, color="red", ls="--", label="budget")
            top = max(top, self.budget)
        else:  # a budget far above every step would flatten the curves: say it instead of drawing it
            ax.text(0.01, 0.97, f"budget {self.budget / 2**30:.2f} GiB (off the chart)", transform=ax.transAxes,
                    va="top", color="red", fontsize=8)
        ax.set_xlabel("step")
        ax.set_ylabel("GiB")
        ax.set_ylim(0, top / 2**30 * 1.1)
        ax.legend(loc="lower right", fontsize=8)
        ax.set_title("memory per step" + (" (tensor bytes, CPU)" if self.device.type != "cuda" else ""))
        fig.tight_layout()
        atomic_write(path, lambda f: fig.savefig(f, format="png"))
        plt.close(fig)
