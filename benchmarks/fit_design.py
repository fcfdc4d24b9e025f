"""How many probes a memory fit needs (`paratune.memory.estimate.probe_shapes`, `hotword_probes`).

    OMP_NUM_THREADS=1 python benchmarks/fit_design.py             # both parts (about 12 min, one thread)
    OMP_NUM_THREADS=1 python benchmarks/fit_design.py design      # the (T, U) design
    OMP_NUM_THREADS=1 python benchmarks/fit_design.py hotwords    # SeACo's hotword probes

`design`: for the small and medium configs (tests/model/reference.py) with and without checkpointing (and
8-bit AdamW with partial checkpointing), fake traces of the dense design (the 3 x 3 (T, U) grid, the
extras and the first probe: 13 probes) and of 22 shapes no probe has (12 random up to twice the probe
batch, the 10 that tests/memory/test_levers.py checks). Each is fitted twice from the same traces by
`estimate._fitted`: on all 13 probes (the reference) and on the 9 a fit traces first (`dense=False`). The
worst and the mean error at the 22 shapes, each as a step of one micro-batch and as a later one.

`hotwords`: the small SeACo config, fitted with the three (B, U) hotword probe groups a fit traces and
with the five it traced before 2026-12-08 (the reference, defined here), then real CPU steps at 11 unseen
shapes on batches with sampled hotwords (`sampled_batch`): the error at each batch's own hotword rows and
tokens, and of the bound (the most the sampler can draw).
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from tests.model.reference import load_config, medium_config, resized_config, small_config  # noqa: E402

from paratune.memory import estimate  # noqa: E402
from paratune.memory.estimate import first_probe, probe_batch, probe_shapes, random_shapes  # noqa: E402
from paratune.memory.trace import StepOptions, StepTracer, hotword_shape  # noqa: E402
from paratune.memory.tracker import LATER, TAIL  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
MAX_FRAMES, MAX_TOKENS = 200, 40


def design() -> None:
    large = load_config(SHARED / "paraformer_large")
    cases = {"small": (small_config(large), 100, (2, 1)), "medium": (medium_config(large), 2000, (6, 1))}
    print(f"fits up to {MAX_FRAMES} frames, {MAX_TOKENS} tokens; error at 22 unseen shapes, worst / mean "
          "(each as a step of one micro-batch and as a later one):")
    for name, (config, vocab, partial) in cases.items():
        for label, options in (("plain", StepOptions()), ("every block", StepOptions(checkpointing=True)),
                               ("8-bit AdamW, partial", StepOptions(optimizer="adamw8bit", checkpointing=partial))):
            start = time.perf_counter()
            tracer = StepTracer(config, vocab, 560, options)
            resident = tracer.resident()
            first = first_probe(MAX_FRAMES, MAX_TOKENS)
            one = tracer.trace(*first)
            batch = probe_batch(resident, one)
            dense = probe_shapes(MAX_FRAMES, MAX_TOKENS, batch, dense=True)
            unseen = random_shapes(12, 2 * batch, MAX_FRAMES, MAX_TOKENS, seed=5) + \
                random_shapes(10, 8, MAX_FRAMES, MAX_TOKENS, seed=21)
            shapes = [s for s in dict.fromkeys(dense + unseen) if s != first]
            traced = {first: one, **dict(zip(shapes, tracer.trace_many(shapes, workers=1)))}
            row = []
            for probes in (dense, probe_shapes(MAX_FRAMES, MAX_TOKENS, batch)):
                model = estimate._fitted(tracer, resident, probes, [traced[s] for s in probes],
                                         (batch, MAX_FRAMES, MAX_TOKENS), 0, "")
                errors = np.array([(model.peak(*s, later) - real) / real for s in unseen
                                   for later, real in ((False, traced[s].single),
                                                       (True, traced[s].part_peak((LATER, TAIL))))])
                row.append(f"{len(probes)} probes {100 * np.abs(errors).max():.2f} / {100 * np.abs(errors).mean():.2f} %")
            print(f"  {name}, {label} (probe batch {batch}): " + "; ".join(row) +
                  f"  [{time.perf_counter() - start:.0f} s]", flush=True)


def five_groups(max_frames: int, max_tokens: int, batch: int, sampling):
    """The hotword probes a fit traced before 2026-12-08: five (B, U) groups."""
    t = max(8, max_frames // 10)
    us = sorted({max(1, max_tokens // 10), max(1, max_tokens // 3), max_tokens})
    out = []
    for b, u in [(batch, us[0]), (batch, us[1]), (batch, us[2]), (max(1, batch // 2), us[1]), (4 * batch, us[2])]:
        u = min(u, t)
        n, width = hotword_shape(b, u, sampling)
        out += [(b, t, u, 1, 1), (b, t, u, n, width), (b, t, u, (n + 1) // 2, max(1, (width + 1) // 2))]
    return list(dict.fromkeys(out))


def hotwords() -> None:
    from paratune.memory.calibrate import sampled_batch
    family = yaml.safe_load((SHARED / "paraformer_family" / "seaco" / "config.yaml").read_text(encoding="utf-8"))
    config = resized_config(family, 64, 96, 3, 3, 3)
    config["model_conf"]["NO_BIAS"] = 99
    tracer, real = StepTracer(config, 100, 560), StepTracer(config, 100, 560, fake=False)
    shapes = random_shapes(12, 8, MAX_FRAMES, MAX_TOKENS, seed=14)[:8] + [(32, 30, 16), (16, 60, 20), (4, 150, 35)]
    rng = random.Random(14)
    batches = [(s, sampled_batch(*s, 560, 100, real.hotwords, rng)) for s in shapes]
    measured = [real.trace_batches([b]).peak for _, b in batches]
    print("SeACo small (3+3 blocks, d=64), real steps at 11 unseen shapes with sampled hotwords; error at the "
          "batch's own hotwords, worst / mean; of the bound, worst over / under:")
    current = estimate.hotword_probes
    for label, probes in (("five (B, U) groups (before)", five_groups), ("three (B, U) groups (now)", current)):
        estimate.hotword_probes = probes
        start = time.perf_counter()
        model = estimate.fit(tracer, MAX_FRAMES, MAX_TOKENS)
        seconds = time.perf_counter() - start
        own = np.array([(model.peak(*s, words=tuple(b["hotword_pad"].shape)) - m) / m
                        for (s, b), m in zip(batches, measured)])
        bound = np.array([(model.peak(*s) - m) / m for (s, _), m in zip(batches, measured)])
        print(f"  {label}: {len(model.probes)} probes, fit {seconds:.0f} s; own hotwords {100 * np.abs(own).max():.2f}"
              f" / {100 * np.abs(own).mean():.2f} %; bound +{100 * bound.max():.1f} % / {100 * bound.min():+.2f} %",
              flush=True)
    estimate.hotword_probes = current


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("part", nargs="?", choices=["design", "hotwords", "all"], default="all")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.part in ("design", "all"):
        design()
    if args.part in ("hotwords", "all"):
        hotwords()


if __name__ == "__main__":
    main()
