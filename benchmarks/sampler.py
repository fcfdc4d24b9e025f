"""paratune's memory-bounded sampler against FunASR's token batch sampler, on the same manifest.

    python benchmarks/sampler.py [--n 100000] [--budget 40GiB]

The manifest is synthetic: n utterances with heavy-tailed durations (log-normal around 5 s, clipped to
0.5-60 s), lengths only. Both samplers' batches are scored with the same paraformer-large memory model
(fitted here on fake tensors, or taken from the cache): predicted need per batch (+10 % uncalibrated
margin), padding waste (padded input frames that are padding), batch count. FunASR's sampler is
funasr 1.4.16's `CustomDistributedBufferDynamicBatchSampler` (what `batch_type: token` with a
`sort_size` builds, with its default sort_size 1024), given the budget two ways, as a FunASR user would
tune `batch_size` (10 ms frames per batch): what the budget allows for utterances of the median length,
and the largest `batch_size` whose every batch stays within the budget (found by bisection).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
LARGE = Path(os.environ.get("PARATUNE_SHARED_DATA", ROOT.parent / "shared" / "data")) / "paraformer_large"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--budget", default="40GiB")
    args = parser.parse_args()

    from paratune.data.lengths import read_lengths, write_synthetic_manifest
    from paratune.data.sampler import MemoryBoundedSampler
    from paratune.memory.fit_cache import load_or_fit
    from paratune.memory.plan import Limit, parse_bytes
    from paratune.memory.trace import StepOptions
    from paratune.modeldir import read_model_dir

    budget = parse_bytes(args.budget)
    spec = read_model_dir(LARGE)
    tmp = Path(tempfile.mkdtemp())
    path = write_synthetic_manifest(tmp / "train.jsonl", args.n, seed=0)
    lengths, _ = read_lengths([path], spec.tokenizer, spec.frontend.lfr_n)
    source_len = np.array([json.loads(line)["source_len"] for line in path.read_text().splitlines()])
    t0 = time.perf_counter()
    model, cached = load_or_fit(spec.config, spec.vocab_size, spec.input_size, StepOptions(device="cuda"),
                                int(lengths.frames.max()), int(lengths.tokens.max()), holdout=0)
    print(f"memory model: {'cached' if cached else 'fitted'} in {time.perf_counter() - t0:.1f} s")
    limit = Limit(model, budget, "cuda")

    def score(batches):
        b = np.array([len(x) for x in batches])
        t = np.array([lengths.frames[x].max() for x in batches])
        u = np.array([lengths.tokens[x].max() for x in batches])
        need = limit.need(b, t, u)
        padded = float((b * t).sum())
        real = float(sum(lengths.frames[x].sum() for x in batches))
        covered = sum(len(x) for x in batches)
        return {"batches": len(batches), "utterances": covered, "over_budget": int((need > budget).sum()),
                "worst_need_gib": need.max() / 2**30, "mean_use": need.mean() / budget,
                "padding_waste": 1 - real / padded, "batch_size_range": (int(b.min()), int(b.max()))}

    t0 = time.perf_counter()
    sampler = MemoryBoundedSampler(lengths.frames, lengths.tokens, limit, seed=0)
    ours = sampler.batches(0)
    ours_s = time.perf_counter() - t0
    ours_score = score([np.array(x) for x in ours])

    # FunASR: batch_size in 10 ms frames, what the budget allows at the median length
    median = int(np.median(lengths.frames))
    k = 1
    while limit.fits(k + 1, median, int(np.median(lengths.tokens))):
        k += 1
    batch_size = int(k * np.median(source_len))
    from funasr.datasets.audio_datasets.samplers import CustomDistributedBufferDynamicBatchSampler

    class Index:  # the two methods FunASR's sampler reads
        def __len__(self):
            return len(source_len)

        def get_source_len(self, i):
            return int(source_len[i])

    def funasr(batch_size, **extra):
        fs = CustomDistributedBufferDynamicBatchSampler(Index(), batch_size=batch_size, batch_type="token",
                                                        sort_size=1024, **extra)
        fs.set_epoch(0)
        return [np.array(b) for b in fs if b]

    unlimited = {"max_token_length": 10**9}
    lo, hi = 1, batch_size  # the largest batch_size with no batch over the budget
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if score(funasr(mid, **unlimited))["over_budget"] == 0 else (lo, mid)
    safe = lo
    rows = []
    for label, size, extra in (
            (f"FunASR, batch_size {batch_size} (median), max_token_length 2048 (its default)", batch_size, {}),
            (f"FunASR, batch_size {batch_size} (median), max_token_length unlimited", batch_size, unlimited),
            (f"FunASR, batch_size {safe} (largest with no batch over), max_token_length unlimited", safe, unlimited)):
        t0 = time.perf_counter()
        theirs = funasr(size, **extra)
        rows.append((label, score(theirs), time.perf_counter() - t0))
    rows.insert(0, ("paratune MemoryBoundedSampler", ours_score, ours_s))

    print(f"\n{args.n} utterances, budget {args.budget}, paraformer-large fp32, uncalibrated (+10 %); "
          f"FunASR batch_size = {batch_size} (10 ms frames: {k} utterances of the median {median} LFR frames)\n")
    print("| sampler | batches | utterances covered | batch sizes | over budget | worst predicted need | "
          "mean need / budget | padding waste | time |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label, s, secs in rows:
        print(f"| {label} | {s['batches']} | {s['utterances']} | {s['batch_size_range'][0]}-{s['batch_size_range'][1]} "
              f"| {s['over_budget']} | {s['worst_need_gib']:.1f} GiB | {s['mean_use']:.3f} | "
              f"{100 * s['padding_waste']:.2f} % | {secs:.1f} s |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
