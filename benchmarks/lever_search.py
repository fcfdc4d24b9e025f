"""How long the plan's search for the fewest checkpointed blocks takes, one tracer switched between
settings (`LeverSearch.tracer`, `StepTracer.checkpoint`) against a tracer built per setting (the reference,
as before 3e7da57), each into an empty cache, on the same model and the same longest utterance.

    OMP_NUM_THREADS=1 python benchmarks/lever_search.py [--model DIR] [--frames 1500] [--tokens 150] [--device cuda]

The budget is set halfway between the utterance's need with every block and with none checkpointed, so
the binary search walks the ladder; the two searches must land on the same blocks with the same traced
needs. Default model: paraformer-large (../shared/data/paraformer_large, random weights), traced fake as
a GPU plan traces it (`--device cuda`).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from paratune.memory.levers import LeverSearch, block_counts, ladder  # noqa: E402
from paratune.memory.plan_tracer import PlanTracer  # noqa: E402
from paratune.memory.trace import StepOptions  # noqa: E402
from paratune.modeldir import read_model_dir  # noqa: E402

LARGE = Path(os.environ.get("PARATUNE_SHARED_DATA", ROOT.parent / "shared" / "data")) / "paraformer_large"


class BuiltPerSetting(LeverSearch):
    """The reference: a new tracer for every lever setting, checkpointing included."""

    def tracer(self, options: StepOptions) -> PlanTracer:
        if options not in self._tracers:
            self._tracers[options] = PlanTracer(self.spec.config, self.spec.vocab_size, self.spec.input_size,
                                                 options, self.hotwords)
        return self._tracers[options]


def search(kind, spec, base, blocks, t, u, budget):
    with tempfile.TemporaryDirectory() as cache:
        s = kind(spec, None, 1.0, budget, False, cache=Path(cache))
        start = time.perf_counter()
        counts = s.fewest(base, blocks, t, u)
        seconds = time.perf_counter() - start
        needs = {c: s.need(dataclasses.replace(base, checkpointing=c), t, u) for c in ladder(blocks)
                 if dataclasses.replace(base, checkpointing=c) in s._figures}
        return seconds, counts, needs, len(s._tracers)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(LARGE))
    ap.add_argument("--frames", type=int, default=1500)
    ap.add_argument("--tokens", type=int, default=150)
    ap.add_argument("--device", default="cuda")
    a = ap.parse_args()
    spec = read_model_dir(a.model)
    blocks, base = block_counts(spec), StepOptions(device=a.device)
    with tempfile.TemporaryDirectory() as cache:
        probe = LeverSearch(spec, None, 1.0, 0, False, cache=Path(cache))
        none = probe.need(base, a.frames, a.tokens)
        every = probe.need(dataclasses.replace(base, checkpointing=blocks), a.frames, a.tokens)
    budget = (none + every) / 2
    print(f"{Path(a.model).name}, {blocks[0]}+{blocks[1]} blocks, ({a.frames}, {a.tokens}) alone, {a.device} step: "
          f"budget {budget / 2**30:.2f} GiB (none {none / 2**30:.2f}, every block {every / 2**30:.2f})")
    ref = search(BuiltPerSetting, spec, base, blocks, a.frames, a.tokens, budget)
    new = search(LeverSearch, spec, base, blocks, a.frames, a.tokens, budget)
    for name, (seconds, counts, needs, tracers) in (("a tracer per setting", ref), ("one switched tracer", new)):
        print(f"  {name}: {seconds:.1f} s, {tracers} tracer(s), {len(needs)} settings traced, fewest {counts}")
    print(f"  x{ref[0] / new[0]:.1f}; same blocks and needs: {ref[1:3] == new[1:3]}")


if __name__ == "__main__":
    main()
