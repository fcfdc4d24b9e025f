"""The memory model against real training steps: gradient accumulation, a step split by an OOM, DDP.

    python benchmarks/step_memory.py                      # small and medium configs, 10 shapes each
    python benchmarks/step_memory.py --configs small --shapes 5
    python benchmarks/step_memory.py --trainer            # paratune finetune's own memory.csv, accum_grad 1, 2, 4

For each config (small and medium, from benchmarks/memory_model.py) the model is fitted on fake tensors
(as `paratune plan` does, up to 300 frames and 60 tokens), once for a plain step and once for a DDP step.
Then real training steps (`paratune.train.step.train_step` on CPU tensors) run at random (B, T, U) shapes
the fit never saw, B up to 8, their peak measured by `PeakMemory`, and compared with
`MemoryModel.step_peak` of the step's micro-batch shapes:

- accum_grad 1, 2 and 4: the shape, then other random shapes as the later micro-batches;
- a step split once: its only micro-batch runs out of memory in the encoder's forward (`InjectOOM`) and
  `train_step` redoes it as two halves (B//2 and B - B//2 rows, views of the batch); predicted: the
  step of the halves;
- DDP: two processes in a real gloo group, each running the step with its gradient all-reduce
  (`dist.all_reduce`) on its own data, each rank's peak against the DDP fit.
Needs ../shared/data/paraformer_large (the real config).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
INPUT = 560
MAX_FRAMES, MAX_TOKENS = 300, 60


def configs() -> dict:
    """{short name: (long name, config, vocab)} from benchmarks/memory_model.py."""
    spec = importlib.util.spec_from_file_location("memory_model", ROOT / "benchmarks" / "memory_model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return {name.split()[0]: (name, config, vocab) for name, (config, vocab) in mod.configs().items()}


def run_ranks(config: dict, vocab: int, shapes, world: int = 2, timeout_s: float = 1800.0) -> list[dict]:
    from paratune.memory.calibrate import ddp_rank_peaks, spawn_ranks
    with tempfile.TemporaryDirectory() as tmp:
        spawn_ranks(ddp_rank_peaks, (world, config, vocab, INPUT, shapes, tmp), world, timeout_s)
        return [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(world)]


def measure(config: dict, vocab: int, n: int, seed: int, max_batch: int) -> tuple[dict, dict]:
    """{scenario: [(micro-batch shapes, real peak, predicted peak)]}, {what: seconds}."""
    from paratune.memory.estimate import fit, random_shapes
    from paratune.memory.trace import StepOptions, StepTracer
    from paratune.train.guard import InjectOOM

    times, rows = {}, {}
    t0 = time.perf_counter()
    model = fit(StepTracer(config, vocab, INPUT, StepOptions()), max_frames=MAX_FRAMES, max_tokens=MAX_TOKENS)
    times["fit"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    ddp_model = fit(StepTracer(config, vocab, INPUT, StepOptions(ddp=True)), max_frames=MAX_FRAMES,
                    max_tokens=MAX_TOKENS)
    times["fit (DDP)"] = time.perf_counter() - t0
    probes = {(p["batch"], p["frames"], p["tokens"]) for m in (model, ddp_model) for p in m.probes}

    def shapes_from(k: int, s: int, min_batch: int = 1):
        out = [x for x in random_shapes(10 * k, max_batch, MAX_FRAMES, MAX_TOKENS, s) if x[0] >= min_batch][:k]
        assert len(out) == k and not probes & set(out)  # unseen by the fit
        return out

    real = StepTracer(config, vocab, INPUT, StepOptions(), fake=False)
    base = shapes_from(n, seed)
    for accum in (1, 2, 4):
        t0 = time.perf_counter()
        others = iter(random_shapes(n * (accum - 1), max_batch, MAX_FRAMES, MAX_TOKENS, seed + 10 + accum))
        steps = [[s] + [next(others) for _ in range(accum - 1)] for s in base]
        rows[f"accum_grad {accum}"] = [(st, real.trace_step(st).peak, model.step_peak(st)) for st in steps]
        times[f"accum_grad {accum}"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    inject = InjectOOM(real.model, [])
    tracked = []
    for b, t, u in shapes_from(n, seed + 1, min_batch=2):
        inject.steps.add(1)
        inject.count = 0  # odd: the injection is in the encoder's forward
        inject.arm(1)
        peak = real.trace_step([(b, t, u)]).peak
        assert not inject.armed, "the injected OOM did not fire"
        halves = [(b // 2, t, u), (b - b // 2, t, u)]
        pred = model.step_peak(halves)
        tracked.append((halves, peak, pred))
    rows["split once by an OOM"] = tracked
    times["split"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    ranks = run_ranks(config, vocab, base)
    if ranks[0]["checksum"] != ranks[1]["checksum"]:
        raise SystemExit("the DDP ranks' weights differ after the steps: the gradient all-reduce did not run")
    for r, got in enumerate(ranks):
        rows[f"DDP, 2 ranks (gloo): rank {r}"] = [([s], p, ddp_model.step_peak([s]))
                                                  for s, p in zip(base, got["peaks"])]
    times["DDP"] = time.perf_counter() - t0
    return rows, times


def fmt_step(shapes) -> str:
    return " + ".join(f"({b}, {t}, {u})" for b, t, u in shapes)


def trainer(accums=(1, 2, 4)) -> None:
    """`paratune finetune` on the bundled demo model and set, every step tracked: the tracked peak
    against the prediction the trainer logged (memory.csv), per accum_grad."""
    import csv
    import os
    import subprocess
    import sys
    root = Path(__file__).resolve().parents[1]
    print("| accum_grad | steps | first step | later steps: worst over | later steps: worst under |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for a in accums:
            out = Path(tmp) / f"accum{a}"
            subprocess.run([sys.executable, "-m", "paratune", "finetune", "--model", "paratune/assets/demo_model",
                            "--train", "paratune/assets/finetune/train.jsonl", "--output", str(out), "--budget", "2GiB",
                            "--device", "cpu", "--config", "paratune/assets/finetune/finetune.yaml",
                            "++memory.cpu_track_every=1", f"++train_conf.accum_grad={a}"], cwd=root, check=True,
                           capture_output=True, env={**os.environ, "PARATUNE_CACHE": str(Path(tmp) / "cache")})
            rows = list(csv.DictReader(open(out / "memory.csv")))
            err = [int(r["peak"]) / int(r["predicted"]) - 1 for r in rows]
            print(f"| {a} | {len(rows)} | {100 * err[0]:+.2f} % | {100 * max(err[1:]):+.2f} % | "
                  f"{100 * min(err[1:]):+.2f} % |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trainer", action="store_true", help="the trainer's tracked peaks against its log instead")
    parser.add_argument("--configs", nargs="+", choices=["small", "medium"], default=["small", "medium"])
    parser.add_argument("--shapes", type=int, default=10, help="unseen shapes per scenario (default 10)")
    parser.add_argument("--seed", type=int, default=21)
    parser.add_argument("--max-batch", type=int, default=8)
    args = parser.parse_args()
    if args.trainer:
        return trainer()

    torch.manual_seed(args.seed)
    available = configs()
    start = time.perf_counter()
    details = []
    for short in args.configs:
        name, config, vocab = available[short]
        t0 = time.perf_counter()
        rows, times = measure(config, vocab, args.shapes, args.seed, args.max_batch)
        print(f"\n{name}: fits up to {MAX_FRAMES} frames, {MAX_TOKENS} tokens; {args.shapes} unseen shapes, "
              f"B up to {args.max_batch}; {time.perf_counter() - t0:.0f} s "
              f"({', '.join(f'{k} {v:.0f} s' for k, v in times.items())})\n")
        print("| scenario | steps | mean abs error | worst error | worst step (B, T, U per micro-batch) |")
        print("|---|---|---|---|---|")
        for scenario, rs in rows.items():
            errors = np.array([(p - r) / r for _, r, p in rs])
            worst = int(np.argmax(np.abs(errors)))
            print(f"| {scenario} | {len(rs)} | {100 * np.abs(errors).mean():.2f} % | {100 * errors[worst]:+.2f} % | "
                  f"{fmt_step(rs[worst][0])} |", flush=True)
            details.append((name, scenario, rs))
    print(f"\ntotal: {time.perf_counter() - start:.0f} s\n")
    for name, scenario, rs in details:
        print(f"{name}, {scenario}: (micro-batches) real MiB, predicted MiB, error")
        print("  " + "; ".join(f"{fmt_step(s)} {r / 2**20:.2f} {p / 2**20:.2f} {100 * (p - r) / r:+.2f}%"
                               for s, r, p in rs))


if __name__ == "__main__":
    main()
