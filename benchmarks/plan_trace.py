"""How long a CPU plan's memory fit takes on fake tensors and on real ones (`PlanTracer`).

    OMP_NUM_THREADS=1 python benchmarks/plan_trace.py

A plan for a CPU run of a model of at most `REAL_TRACE_PARAMETERS` traces its probes on real tensors. This
fits the bundled demo model (0.85 M parameters) and the small test config, once with every probe fake
(the reference, `REAL_TRACE_PARAMETERS = 0`) and once as a plan does, each into an empty cache, and checks
that the two fits are the same. Then it times one 8 x 200-frame probe fake and real for the small and the
medium config (16 M parameters, past the bound: where real tensors stop paying). Last, for the models under
the bound (the demo, the FSDD recipe's and the small config), with and without checkpointing, each of 9
shapes is traced real and fake, and the kind `PlanTracer` picks (REAL_SECONDS, FAKE_SECONDS) is set beside
the faster one: the data those constants were fitted to.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

from memory_model import configs  # the small and medium configs, resized from paraformer-large's

import paratune
from paratune.memory import plan_tracer
from paratune.memory.fit_cache import load_or_fit
from paratune.memory.trace import StepOptions, StepTracer
from paratune.modeldir import read_model_dir


def timed_fit(config, vocab, input_size, real_bound: int):
    plan_tracer.REAL_TRACE_PARAMETERS = real_bound
    with tempfile.TemporaryDirectory() as cache:
        start = time.perf_counter()
        model, _ = load_or_fit(config, vocab, input_size, StepOptions(), 300, 60, holdout=2, cache=Path(cache))
        return time.perf_counter() - start, model


SHAPES = [(1, 64, 16), (1, 256, 32), (1, 768, 64), (1, 1536, 128), (4, 128, 32), (4, 512, 64), (16, 128, 32),
          (16, 256, 32), (64, 64, 16)]


def real_or_fake(models) -> None:
    """Each shape traced both ways, against the kind the plan's tracer picks."""
    from paratune.memory.plan_tracer import PlanTracer
    print("real or fake, by shape (seconds for a probe of two micro-batches; pick: the rule's, * where slower):")
    picked = best = 0.0
    for name, (config, vocab, size) in models.items():
        for counts in ((0, 0), (-1, -1)):
            options = StepOptions(checkpointing=counts)
            real, fake = (StepTracer(config, vocab, size, options, fake=f) for f in (False, True))
            plan = PlanTracer(config, vocab, size, options)
            real.trace(1, 64, 8), fake.trace(2, 64, 8)  # warm
            row = []
            for s in SHAPES:
                seconds = []
                for tracer in (real, fake):
                    start = time.perf_counter()
                    tracer.trace(*s)
                    seconds.append(time.perf_counter() - start)
                pick = 0 if plan._for(*s[:2]) is plan.real else 1
                picked, best = picked + seconds[pick], best + min(seconds)
                row.append(f"{s[0]}x{s[1]} {seconds[0]:.2f}/{seconds[1]:.2f} {'rf'[pick]}"
                           f"{'*' if seconds[pick] > min(seconds) else ''}")
            print(f"  {name}, checkpointing {counts}: " + ", ".join(row))
    print(f"  all shapes: {picked:.1f} s as picked, {best:.1f} s at the faster kind each")


def main() -> None:
    bound = plan_tracer.REAL_TRACE_PARAMETERS
    demo = read_model_dir(Path(paratune.__file__).parent / "assets" / "demo_model")
    (small_name, (small, small_vocab)), _ = configs().items()
    cases = {"demo model": (demo.config, demo.vocab_size, demo.input_size), small_name: (small, small_vocab, 560)}
    print("first CPU fit up to 384 frames, 64 tokens, empty cache:")
    for name, (config, vocab, size) in cases.items():
        fake_s, fake = timed_fit(config, vocab, size, 0)
        real_s, real = timed_fit(config, vocab, size, bound)
        same = fake.coef == real.coef and fake.gradients == real.gradients and fake.resident == real.resident
        print(f"  {name}: fake {fake_s:.1f} s, as planned {real_s:.1f} s (x{fake_s / real_s:.1f}); same fit: {same}")
    print("one probe of 8 x 200 frames, 40 tokens (two micro-batches):")
    for name, (config, vocab) in configs().items():
        times = []
        for fake in (True, False):
            tracer = StepTracer(config, vocab, 560, StepOptions(), fake=fake)
            tracer.trace(8, 200, 40)
            start = time.perf_counter()
            tracer.trace(8, 200, 40)
            times.append(time.perf_counter() - start)
        print(f"  {name}: fake {times[0]:.2f} s, real {times[1]:.2f} s")
    recipe = read_model_dir(Path(__file__).resolve().parents[1] / "examples" / "fsdd" / "model")
    real_or_fake({"demo model": cases["demo model"], "FSDD recipe model": (recipe.config, recipe.vocab_size,
                                                                           recipe.input_size),
                  small_name: cases[small_name]})


if __name__ == "__main__":
    main()
