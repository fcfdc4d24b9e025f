"""How well the memory model predicts, and how fast `paratune plan` is.

    python benchmarks/memory_model.py accuracy   # predicted vs real tracked peak, small and medium configs
    python benchmarks/memory_model.py plan       # paraformer-large plan over 100k utterances, first and cached

`accuracy` fits the model on fake tensors (as `paratune plan` does), then runs real training steps on CPU
tensors at 20 random (B, T, U) shapes the fit never saw, and measures each step's peak with the same
tracker. `plan` times the CLI end to end in fresh processes, with an empty cache and then with the fit cached.
Needs ../shared/data/paraformer_large (the real config).
"""
from __future__ import annotations

import argparse
import copy
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
LARGE = Path(os.environ.get("PARATUNE_SHARED_DATA", ROOT.parent / "shared" / "data")) / "paraformer_large"


def configs() -> dict:
    large = yaml.safe_load((LARGE / "config.yaml").read_text(encoding="utf-8"))
    small = copy.deepcopy(large)
    small["encoder_conf"].update(output_size=64, attention_heads=4, linear_units=96, num_blocks=3)
    small["decoder_conf"].update(attention_heads=4, linear_units=96, num_blocks=3, att_layer_num=2)
    small["predictor_conf"]["idim"] = 64
    medium = copy.deepcopy(large)
    medium["encoder_conf"].update(output_size=256, attention_heads=4, linear_units=1024, num_blocks=12)
    medium["decoder_conf"].update(attention_heads=4, linear_units=1024, num_blocks=6, att_layer_num=6)
    medium["predictor_conf"]["idim"] = 256
    return {"small (3+3 blocks, d=64, vocab 100)": (small, 100),
            "medium (12+6 blocks, d=256, vocab 2000)": (medium, 2000)}


def accuracy(n: int, seed: int) -> None:
    import torch

    from paratune.memory.estimate import fit, random_shapes
    from paratune.memory.trace import StepOptions, StepTracer

    torch.manual_seed(seed)
    print("| config | checkpointing | fit time | shapes | mean abs error | worst error | worst shape (B, T, U) |")
    print("|---|---|---|---|---|---|---|")
    details = []
    for name, (config, vocab) in configs().items():
        for ckpt in (False, True):
            options = StepOptions(checkpointing=ckpt)
            t0 = time.perf_counter()
            model = fit(StepTracer(config, vocab, 560, options), max_frames=300, max_tokens=60)
            fit_s = time.perf_counter() - t0
            real = StepTracer(config, vocab, 560, options, fake=False)
            rows = []
            for b, t, u in random_shapes(n, 16, 300, 60, seed=seed):
                measured = real.trace_step([(b, t, u)]).peak
                predicted = model.peak(b, t, u)
                rows.append((b, t, u, measured, predicted, (predicted - measured) / measured))
            errors = np.array([r[-1] for r in rows])
            worst = rows[int(np.argmax(np.abs(errors)))]
            print(f"| {name} | {'all blocks' if ckpt else 'off'} | {fit_s:.1f} s | {n} | "
                  f"{100 * np.abs(errors).mean():.2f} % | {100 * worst[-1]:+.2f} % | {worst[:3]} |", flush=True)
            details.append((name, ckpt, rows))
    print()
    for name, ckpt, rows in details:
        print(f"{name}, checkpointing {'on' if ckpt else 'off'}: (B, T, U, real MiB, predicted MiB, error)")
        print("  " + "; ".join(f"({b},{t},{u}) {m / 2**20:.1f} {p / 2**20:.1f} {100 * e:+.2f}%"
                               for b, t, u, m, p, e in rows))


def plan(n: int) -> None:
    from paratune.data.lengths import write_synthetic_manifest

    with tempfile.TemporaryDirectory() as tmp:
        manifest = write_synthetic_manifest(Path(tmp) / "train.jsonl", n, seed=0)
        env = {**os.environ, "PARATUNE_CACHE": str(Path(tmp) / "cache")}
        cmd = [sys.executable, "-m", "paratune", "plan", "--model", str(LARGE), "--data", str(manifest),
               "--budget", "40GiB", "--checkpointing", "off", "--png", str(Path(tmp) / "plan.png")]
        for label in ("first run (fit included)", "cached fit"):
            t0 = time.perf_counter()
            out = subprocess.run(cmd, env=env, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            if out.returncode not in (0, 1):
                raise SystemExit(out.stderr)
            print(f"{label}: {wall:.1f} s wall")
            print("  " + "\n  ".join((out.stderr + out.stdout).strip().splitlines()))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["accuracy", "plan"])
    parser.add_argument("-n", type=int, default=None, help="shapes (accuracy, default 20) or utterances (plan, 100000)")
    parser.add_argument("--seed", type=int, default=11)
    args = parser.parse_args()
    if args.what == "accuracy":
        accuracy(args.n or 20, args.seed)
    else:
        plan(args.n or 100_000)
