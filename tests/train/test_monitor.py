"""The memory monitor's detectors on real CPU steps: a deliberate leak, a healthy loop, an outlier."""
from __future__ import annotations

import csv
from pathlib import Path

import torch

from paratune.memory.tracker import PeakMemory
from paratune.train.monitor import MemoryMonitor, read_csv
from paratune.train.step import backward_batch, make_optimizer, optimizer_step
from tests.train.test_guard import _batch, _deterministic_model


def _run(tmp_path, leak: bool, steps: int = 60):
    model = _deterministic_model()
    opt = make_optimizer(model)
    said = []
    monitor = MemoryMonitor(tmp_path, budget=2**30, device=torch.device("cpu"), window=30, tensorboard=False,
                            log=said.append)
    kept = []
    batch = {k: v for k, v in _batch(4).items() if k != "keys"}
    tracker = PeakMemory(model, opt)  # one tracker for the run, as the trainer keeps it
    for step in range(1, steps + 1):
        with tracker:
            stats = backward_batch(model, batch)
            optimizer_step(model, opt, 5.0)
            if leak:
                kept.append(stats["loss_att"] * 1.0)  # a loss kept "for logging": small, but it grows
                kept.append(torch.zeros(50_000))  # and whatever else a callback holds on to
        monitor.end_step(step, 0, (4, 60, 5), predicted=tracker.peak, tracked_peak=tracker.peak,
                         tracked_now=tracker.current)
    monitor.close()
    return said, monitor


def test_leak_is_named(tmp_path):
    said, monitor = _run(tmp_path, leak=True)
    assert "leak" in monitor.findings and any(line.startswith("memory: leak:") for line in said)
    assert "rose" in monitor.findings["leak"] and "keeps tensors" in monitor.findings["leak"]
    rows = list(csv.DictReader(open(tmp_path / "memory.csv")))
    assert len(rows) == 60 and int(rows[-1]["allocated"]) > int(rows[0]["allocated"])
    assert (tmp_path / "memory.png").read_bytes()[:4] == b"\x89PNG"


def test_healthy_loop_says_nothing(tmp_path):
    said, monitor = _run(tmp_path, leak=False)
    assert monitor.findings == {} and said == []


def test_outlier_batch(tmp_path):
    monitor = MemoryMonitor(tmp_path, budget=2**30, device=torch.device("cpu"), tensorboard=False, log=lambda m: None)
    monitor.end_step(1, 0, (8, 500, 40), predicted=100 * 2**20, tracked_peak=150 * 2**20, tracked_now=10)
    assert "outlier_batch" in monitor.findings and "B=8, T=500, U=40" in monitor.findings["outlier_batch"]
    monitor.close()


DATA = Path(__file__).parent / "data"


def test_fragmentation_is_found_in_a_recorded_h200_run():
    """Real CUDA allocator figures: random batch shapes without expandable segments fragment the cache;
    the epoch with paratune's defaults is healthy (the cache holds the largest step's peak and no more)."""
    lines = []
    fragmented = MemoryMonitor.replay(read_csv(DATA / "h200_fragmented_memory.csv"), log=lines.append)
    assert set(fragmented.findings) == {"fragmentation"}, fragmented.findings
    assert "expandable_segments:True" in fragmented.findings["fragmentation"]
    assert len(lines) <= 2  # rate-limited: one line per hundred steps
    for name in ("h200_epoch_memory.csv", "h200_epoch_memory_v3.csv"):
        healthy = MemoryMonitor.replay(read_csv(DATA / name))
        assert healthy.findings == {}, (name, healthy.findings)
