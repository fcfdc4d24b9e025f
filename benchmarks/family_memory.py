"""The memory model on the Paraformer family: BiCifParaformer and SeacoParaformer (issue 14).

    python benchmarks/family_memory.py                      # both parts, medium configs, 10 shapes
    python benchmarks/family_memory.py sensitivity          # SeACo: the peak with the fewest and the most hotwords
    python benchmarks/family_memory.py accuracy -n 10 --models seaco

`sensitivity` traces SeACo steps (fake tensors) at a few (B, T, U) twice: with the fewest hotwords a
batch can have (N = 1: the [sos] entry alone) and with the most the sampler can draw for it (N = 2B + 1
when U > 12, else B + 1; L = min(8, U)), and prints how far the peak moves.

`accuracy` fits the memory model as `paratune plan` does (fake tensors, up to 300 frames and 60 tokens),
then runs real training steps (`train_step` on CPU tensors, measured by `PeakMemory`) at 10 random
(B, T, U) the fit never saw, B up to 16, on batches as the loader makes them: random speech and
transcripts of random lengths up to (T, U) (`paratune.memory.calibrate.sampled_batch`), and for SeACo the
hotwords `paratune.data.hotwords` samples from those transcripts. "predicted" is what the plan uses: for
SeACo with the most hotwords the sampler could have drawn (an upper bound); SeACo's rows also give the
prediction at the batch's own hotword rows and tokens (N, L), the fit's own accuracy. Then the same for
a few batches of many short utterances, where the hotwords weigh most.

Medium configs: the family's config.yaml (../shared/data/paraformer_family) resized as
tests/model/reference.py's medium_config: d = 256, 12 + 6 blocks, FFN 1024, vocabulary 2000; SeACo's
inner_dim 256, its seaco decoder's FFN 1024 (6 attention blocks, FunASR's default), NO_BIAS 1999.
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from tests.model.reference import resized_config  # noqa: E402

FAMILY = Path(os.environ.get("PARATUNE_SHARED_DATA", ROOT.parent / "shared" / "data")) / "paraformer_family"
INPUT, VOCAB = 560, 2000
MAX_FRAMES, MAX_TOKENS, MAX_BATCH = 300, 60, 16
SHORT = [(48, 80, 30), (96, 50, 20), (160, 30, 14)]  # many short utterances: B x N is largest here


def family_config(name: str, d: int = 256, units: int = 1024, enc_blocks: int = 12, dec_blocks: int = 6,
                  vocab: int = VOCAB) -> dict:
    """The family's config.yaml at other sizes (medium by default), NO_BIAS the last token."""
    c = resized_config(yaml.safe_load((FAMILY / name / "config.yaml").read_text(encoding="utf-8")), d, units,
                       enc_blocks, dec_blocks, dec_blocks)
    if "seaco_decoder_conf" in c:
        c["model_conf"]["NO_BIAS"] = vocab - 1
    return c


def sensitivity() -> None:
    from paratune.memory.trace import StepOptions, StepTracer, hotword_shape

    tracer = StepTracer(family_config("seaco"), VOCAB, INPUT, StepOptions())
    print("SeACo medium, fp32: the step's peak with the [sos] entry alone (N = 1) and with the most hotwords "
          "the sampler can draw (fake tensors)\n")
    print("| B, T, U | most hotwords N x L | peak, N = 1 | peak, most | moves |")
    print("|---|---|---|---|---|")
    for b, t, u in [(1, 200, 30), (4, 100, 10), (8, 200, 12), (8, 200, 30), (16, 300, 60), (32, 150, 40),
                    (64, 60, 20), (128, 40, 16)]:
        n, width = hotword_shape(b, u, tracer.hotwords)
        few, most = tracer.trace(b, t, u, 1, 1).single, tracer.trace(b, t, u, n, width).single
        print(f"| {b}, {t}, {u} | {n} x {width} | {few / 2**20:.1f} MiB | {most / 2**20:.1f} MiB | "
              f"{100 * (most - few) / few:+.2f} % |", flush=True)
    print()


def accuracy(models: list[str], n: int, seed: int) -> None:
    import numpy as np
    import torch

    from paratune.memory.calibrate import sampled_batch
    from paratune.memory.estimate import fit, random_shapes
    from paratune.memory.trace import StepOptions, StepTracer

    summary = []
    for name in models:
        config = family_config(name)
        torch.manual_seed(seed)
        t0 = time.perf_counter()
        model = fit(StepTracer(config, VOCAB, INPUT, StepOptions()), MAX_FRAMES, MAX_TOKENS)
        fit_s = time.perf_counter() - t0
        real = StepTracer(config, VOCAB, INPUT, StepOptions(), fake=False)
        probes = {(p["batch"], p["frames"], p["tokens"]) for p in model.probes}
        shapes = [s for s in random_shapes(3 * n, MAX_BATCH, MAX_FRAMES, MAX_TOKENS, seed) if s not in probes][:n]
        seaco = model.hotwords is not None
        label = {"bicif": "BiCifParaformer", "seaco": "SeacoParaformer"}[name]
        print(f"{label} medium (12+6 blocks, d=256, vocab {VOCAB}), fp32, checkpointing off: fitted in {fit_s:.0f} s "
              f"({len(model.probes)} probes); real CPU steps, PeakMemory\n")
        head = "| B, T, U | predicted | measured | error |"
        if seaco:
            head += " hotwords drawn N x L | predicted at the drawn N, L | error |"
        print(head)
        print("|" + "---|" * (head.count("|") - 1))
        rng = random.Random(seed)
        errors, own = [], []
        for group, group_shapes in (("unseen", shapes), ("short", SHORT if seaco else [])):
            if group == "short" and group_shapes:
                print(f"| *many short utterances* | | | |{' | | |' if seaco else ''}")
            for b, t, u in group_shapes:
                batch = sampled_batch(b, t, u, INPUT, VOCAB, real.hotwords, rng)
                measured = real.trace_batches([batch]).peak
                predicted = model.peak(b, t, u)
                err = (predicted - measured) / measured
                row = (f"| {b}, {t}, {u} | {predicted / 2**20:.1f} MiB | {measured / 2**20:.1f} MiB | "
                       f"{100 * err:+.2f} % |")
                if seaco:
                    words = tuple(batch["hotword_pad"].shape)
                    at = model.peak(b, t, u, words=words)
                    e2 = (at - measured) / measured
                    row += f" {words[0]} x {words[1]} | {at / 2**20:.1f} MiB | {100 * e2:+.2f} % |"
                    own.append((group, e2))
                errors.append((group, err))
                print(row, flush=True)
                del batch
        unseen = np.array([e for g, e in errors if g == "unseen"])
        line = (f"{label}: {len(unseen)} unseen shapes, worst {100 * unseen[np.argmax(np.abs(unseen))]:+.2f} %, "
                f"mean abs {100 * np.abs(unseen).mean():.2f} %")
        if seaco:
            mine = np.array([e for g, e in own])
            line += (f"; at the drawn hotwords, all {len(mine)} batches: worst "
                     f"{100 * mine[np.argmax(np.abs(mine))]:+.2f} %; the bound over the draws on the short "
                     f"batches: {', '.join(f'{100 * e:+.1f} %' for g, e in errors if g == 'short')}")
        summary.append(line)
        print()
    print("\n".join(summary))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", nargs="?", choices=["all", "sensitivity", "accuracy"], default="all")
    parser.add_argument("-n", type=int, default=10, help="unseen shapes per model (accuracy)")
    parser.add_argument("--models", nargs="+", choices=["bicif", "seaco"], default=["bicif", "seaco"])
    parser.add_argument("--seed", type=int, default=14)
    args = parser.parse_args()
    if args.what in ("all", "sensitivity"):
        sensitivity()
    if args.what in ("all", "accuracy"):
        accuracy(args.models, args.n, args.seed)
