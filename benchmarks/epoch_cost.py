"""The levers' throughput model against measured epochs: predicted and measured seconds of one epoch on the
CPU under the plan's checkpointing and under every block checkpointed.

    PARATUNE_CACHE=DIR python benchmarks/epoch_cost.py --data levers_manifest.jsonl [--budget 3.5GiB]

Run `paratune plan --device cpu --calibrate` with the same data, budget and $PARATUNE_CACHE first: the plan
then weighs the batch count with the calibration's timed steps (`paratune/memory/cost.py`). For each
setting (the plan's own, and `++memory.checkpointing=on`), every batch of epoch 0 is trained once, in order,
by `train_step` on a model from `prepare_model` (random weights, random features of the batch's padded
shape), after one short step that makes the optimizer state; the epoch's wall-clock seconds against the
model's prediction (batches x per step + the epoch's FLOPs x factor / rate).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

LARGE = Path(os.environ.get("PARATUNE_SHARED_DATA", ROOT.parent / "shared" / "data")) / "paraformer_large"


def planned(spec, lengths, budget: int, overrides: list[str]):
    from paratune.memory.plan import plan_run
    from paratune.train.config import load_config
    return plan_run(spec, lengths, load_config(spec.config, None, overrides), budget, "cpu")


def predicted_seconds(run, timing, spec) -> float:
    """The cost model's epoch for this plan, as `weigh_batches` computes it."""
    from paratune.memory.cost import estimate
    from paratune.memory.levers import LeverSearch
    sampler = run.sampler
    search = LeverSearch(spec, None, 1.0, sampler.limit.budget, False)
    longest = (sampler.padded(int(sampler.frames.max())), int(sampler.tokens.max()))  # as plan_run takes it
    plain = dataclasses.replace(run.options, checkpointing=(0, 0))
    frame_flops = search.flops(plain, *longest) / longest[0]
    return estimate(timing, sampler, frame_flops, search.factor(run.options, *longest)).seconds


def measured_seconds(spec, run) -> float:
    from paratune.memory.trace import fake_batch
    from paratune.train.step import PRECISIONS, prepare_model, train_step
    torch.manual_seed(0)
    options = run.options
    ready = prepare_model(spec.build(), options, "cpu")
    step = lambda b: train_step(ready.model, ready.optimizer, b, options.grad_clip,  # noqa: E731
                                PRECISIONS[options.precision], ready.scaler)
    step(fake_batch(1, 8, 2, spec.input_size, spec.vocab_size))  # the optimizer state
    sampler = run.sampler
    start = time.perf_counter()
    for b in sampler.batches(0):
        t = sampler.padded(int(sampler.frames[b].max()))
        batch = fake_batch(len(b), t, int(sampler.tokens[b].max()), spec.input_size, spec.vocab_size)
        batch["speech"] = torch.randn_like(batch["speech"])
        step(batch)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--budget", default="3.5GiB")
    p.add_argument("--out", type=Path, default=Path("epoch_cost.json"))
    args = p.parse_args()
    from paratune.data.lengths import read_lengths
    from paratune.memory.cost import StepTiming
    from paratune.memory.plan import parse_bytes
    from paratune.modeldir import read_model_dir

    spec = read_model_dir(LARGE)
    fe = spec.frontend
    lengths, _ = read_lengths([args.data], spec.tokenizer, fe.lfr_n, fe.frame_shift, fe.frame_length)
    budget = parse_bytes(args.budget)
    chosen = planned(spec, lengths, budget, [])
    timing = StepTiming.of_calibration(chosen.sampler.limit.model.calibration)
    if timing is None:
        sys.exit("no timed calibration for this plan: run `paratune plan --device cpu --calibrate` first")
    rows = []
    for label, run in (("plan", chosen), ("every block", planned(spec, lengths, budget,
                                                                 ["++memory.checkpointing=on"]))):
        pred = predicted_seconds(run, timing, spec)
        real = measured_seconds(spec, run)
        rows.append({"setting": label, "checkpointing": list(run.options.checkpointing),
                     "batches": len(run.sampler), "predicted_s": round(pred, 1), "measured_s": round(real, 1)})
        print(rows[-1], flush=True)
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
              f"torch {torch.__version__}", "threads": torch.get_num_threads(), "timing": dataclasses.asdict(timing),
              "notes": chosen.notes, "rows": rows}
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
