"""The levers the plan chooses for paraformer-large (fp32, random weights, utterances up to 30 s), and a
CPU run of the plan's costliest batches with them.

    python benchmarks/levers.py [--out levers.json] [--steps 3] [--utterances 200] [--case LABEL@BUDGET ...]

1. `plan_run`, the planning entry `paratune plan` and `paratune finetune` share, on a synthetic manifest
   (`write_synthetic_manifest`, durations log-normal around 5 s, clipped to 30 s) at:
   - 3.5 GiB on a GPU, uncalibrated (10 % margin): fp32 AdamW's static memory (3.28 GiB, 3.61 with the
     margin) is over the budget;
   - 3.5 GiB on the CPU (no margin), and on the CPU with the GPU's 10 % margin (`--margin 0.1`);
   - 2.25 GiB on a GPU, uncalibrated: below 8-bit AdamW's static memory with the margin (2.26 GiB), so
     the state goes to host memory (`HostAdamW`); the note gives the host update's time, timed here;
   - 40 GiB on a GPU: room for everything.
   Each row: the levers chosen, the plan's notes, batches, utterances excluded, the longest utterance's
   predicted need and step-time factor under each lever setting weighed (`--explain`'s table).
2. The CPU run: the plan at 3.5 GiB with the 10 % margin, its costliest batches (descending predicted
   peak) trained for `--steps` steps, after a short one that makes the optimizer state, by `train_step`
   on a model from `prepare_model` with the plan's levers (the trainer's code), random weights and random
   features, each step tracked by `PeakMemory` (the trainer's CPU tracker): tracked peak against the
   budget and against the plan's prediction.
The fits are cached (`$PARATUNE_CACHE`, default a folder beside --out): a second run plans in seconds.
"""
from __future__ import annotations

import argparse
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

GIB = 2**30
LARGE = Path(os.environ.get("PARATUNE_SHARED_DATA", ROOT.parent / "shared" / "data")) / "paraformer_large"
CASES = [("gpu", "3.5GiB", "cuda", None), ("cpu", "3.5GiB", "cpu", None), ("cpu, 10 % margin", "3.5GiB", "cpu", 0.1),
         ("gpu", "2.25GiB", "cuda", None), ("gpu", "40GiB", "cuda", None)]
CPU_RUN = ("cpu, 10 % margin", "3.5GiB")


def plan(spec, lengths, budget: str, device: str, margin):
    from paratune.memory.plan import make_plan, parse_bytes, plan_run
    from paratune.train.config import load_config
    config = load_config(spec.config, None, [] if margin is None else [f"++memory.margin={margin}"])
    t0 = time.perf_counter()
    run = plan_run(spec, lengths, config, parse_bytes(budget), device, log=lambda m: print("  " + m, flush=True),
                   explain=True)
    fe = spec.frontend
    return make_plan(run, lengths, fe.lfr_n * fe.frame_shift / 1000), time.perf_counter() - t0


def row(label: str, budget: str, device: str, the_plan, seconds: float) -> dict:
    d = the_plan.to_dict()
    return {"case": label, "budget": budget, "device": device, "levers": d["levers"], "notes": d["notes"],
            "batches": len(d["batches"]), "excluded": len(d["excluded"]), "weighed": d["levers_weighed"],
            "max_predicted_need_gib": max(b["predicted_peak_bytes"] for b in d["batches"]) * the_plan.limit.scale / GIB,
            "plan_seconds": round(seconds, 1)}


def cpu_run(spec, the_plan, steps: int) -> list[dict]:
    """The plan's costliest batches, trained with its levers on real CPU tensors, tracked."""
    import numpy as np

    from paratune.memory.trace import fake_batch
    from paratune.memory.tracker import PeakMemory
    from paratune.train.step import PRECISIONS, prepare_model, train_step

    torch.manual_seed(0)
    options = the_plan.run.options
    ready = prepare_model(spec.build(), options, "cpu")
    tracker = PeakMemory(ready.model, ready.optimizer)
    shapes = the_plan.batch_shapes()
    order = np.argsort(the_plan.predicted())[::-1][:steps]
    # a first step makes the optimizer state (a long run holds it at every later step): untracked
    train_step(ready.model, ready.optimizer, fake_batch(1, 8, 2, spec.input_size, spec.vocab_size), options.grad_clip,
               PRECISIONS[options.precision], ready.scaler)
    out = []
    for i in order:
        b, t, u = (int(x) for x in shapes[i])
        batch = fake_batch(b, t, u, spec.input_size, spec.vocab_size)
        batch["speech"] = torch.randn_like(batch["speech"])
        t0 = time.perf_counter()
        with tracker:
            train_step(ready.model, ready.optimizer, batch, options.grad_clip, PRECISIONS[options.precision],
                       ready.scaler)
        out.append({"batch": b, "frames": t, "tokens": u, "tracked_peak_gib": tracker.peak / GIB,
                    "predicted_gib": float(the_plan.predicted()[i]) / GIB, "budget_gib": the_plan.budget / GIB,
                    "seconds": round(time.perf_counter() - t0, 1)})
        print(f"  step B={b} T={t} U={u}: tracked {tracker.peak / GIB:.3f} GiB, predicted "
              f"{out[-1]['predicted_gib']:.3f} GiB, budget {the_plan.budget / GIB:.2f} GiB, {out[-1]['seconds']} s",
              flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("levers.json"))
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--utterances", type=int, default=200)
    p.add_argument("--case", action="append", default=None, metavar="LABEL@BUDGET",
                   help="only these cases, e.g. 'gpu@2.25GiB' (default: all; the CPU run needs its case)")
    args = p.parse_args()
    os.environ.setdefault("PARATUNE_CACHE", str(args.out.resolve().parent / "levers_cache"))
    from paratune.data.lengths import read_lengths, write_synthetic_manifest
    from paratune.modeldir import read_model_dir

    spec = read_model_dir(LARGE)
    manifest = write_synthetic_manifest(args.out.resolve().parent / "levers_manifest.jsonl", args.utterances, seed=1,
                                        max_s=30.0)
    fe = spec.frontend
    lengths, _ = read_lengths([manifest], spec.tokenizer, fe.lfr_n, fe.frame_shift, fe.frame_length)
    rows, plans = [], {}
    for label, budget, device, margin in CASES:
        if args.case and f"{label}@{budget}" not in args.case:
            continue
        print(f"{label}, {budget}:", flush=True)
        the_plan, seconds = plan(spec, lengths, budget, device, margin)
        plans[label, budget] = the_plan
        rows.append(row(label, budget, device, the_plan, seconds))
        print(f"  levers {rows[-1]['levers']}; {rows[-1]['batches']} batches, {rows[-1]['excluded']} excluded",
              flush=True)
    run = []
    if CPU_RUN in plans:
        print("CPU run, 3.5 GiB with the 10 % margin:", flush=True)
        run = cpu_run(spec, plans[CPU_RUN], args.steps)
    result = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} cores, torch {torch.__version__}", "threads": torch.get_num_threads(),
              "utterances": len(lengths), "longest_s": float(lengths.seconds.max()), "plans": rows, "cpu_run": run}
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
