"""Where the memory model's CUDA prediction differs from a real CUDA step, tag by tag.

    python benchmarks/trace_vs_cuda.py --model DIR [--precision bf16 fp32] [--shapes 16x500x40 ...] [--json OUT]

Needs a GPU. For each precision and batch shape (B x T LFR frames x U tokens) it reports one training
step's peak four ways:
- cpu-fake: the tracer the memory model is fitted with (fake tensors on the CPU, CUDA kernels and
  block rounding), i.e. what `paratune plan` predicts before any calibration;
- cuda-fake: the same tracer with the fake tensors on the CUDA device (CUDA's autocast policy);
- cuda-tracked: the same tensor-level tracker on the real step on the GPU;
- allocator: `torch.cuda.max_memory_allocated` of that real step.
and the tracker's bytes by tag at the peak, so a difference can be pinned on activations, autocast
copies, gradients or optimizer temporaries.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import time

import torch

from paratune.memory.calibrate import cuda_peaks, real_batch, real_stepper
from paratune.memory.trace import StepOptions, StepTracer
from paratune.memory.tracker import PeakMemory
from paratune.modeldir import read_model_dir

GIB = 2 ** 30


def real_steps(spec, options: StepOptions, shapes) -> list[dict]:
    dev = torch.device("cuda")
    torch.manual_seed(0)
    model, optimizer, step = real_stepper(spec, options, dev)  # the real kernels: sdpa picks its own
    rows = []
    for b, t, u in shapes:
        batch = real_batch(spec, b, t, u, dev)
        allocated, _ = cuda_peaks(step, batch, dev)  # untracked: the allocator's own figure
        with PeakMemory(model, optimizer, cuda_blocks=True) as tracker:
            step(batch)
        torch.cuda.synchronize()
        rows.append({"allocated": allocated, "tracked": tracker.peak, "tracked_at_peak": dict(tracker.at_peak)})
        del batch
    return rows  # the model and optimizer go with this frame


def fake_steps(spec, options: StepOptions, shapes, device: str) -> list[dict]:
    ctx = torch.device(device) if device == "cuda" else contextlib.nullcontext()
    with ctx:
        tracer = StepTracer(spec.config, spec.vocab_size, spec.input_size, options)
        out = []
        for s in shapes:
            traced = tracer.trace_step([s])  # one micro-batch, as real_steps runs
            out.append({"peak": traced.peak, "at_peak": dict(traced.breakdown)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--precision", nargs="+", default=["bf16", "fp32"])
    ap.add_argument("--shapes", nargs="+", default=["16x500x40", "4x1500x120", "64x120x10"])
    ap.add_argument("--json")
    args = ap.parse_args()
    spec = read_model_dir(args.model)
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes]
    print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}; {args.model}")
    report = []
    for precision in args.precision:
        options = StepOptions(precision=precision, device="cuda")
        t0 = time.perf_counter()
        cpu = fake_steps(spec, options, shapes, "cpu")
        try:
            cuda_fake = fake_steps(spec, options, shapes, "cuda")
        except Exception as e:  # a fake kernel CUDA lacks: say so, keep the other figures
            print(f"cuda-fake tracing failed: {type(e).__name__}: {str(e)[:300]}")
            cuda_fake = [None] * len(shapes)
        real = real_steps(spec, options, shapes)
        torch.cuda.empty_cache()
        print(f"\n{precision} ({time.perf_counter() - t0:.0f} s)")
        print(f"{'shape':>12} {'cpu-fake':>9} {'cuda-fake':>9} {'tracked':>9} {'allocator':>9}  GiB   cpu-fake/allocator")
        for s, c, f, r in zip(shapes, cpu, cuda_fake, real):
            fk = f"{f['peak'] / GIB:9.2f}" if f else f"{'-':>9}"
            print(f"{'x'.join(map(str, s)):>12} {c['peak'] / GIB:9.2f} {fk} {r['tracked'] / GIB:9.2f} "
                  f"{r['allocated'] / GIB:9.2f}        {c['peak'] / r['allocated']:.3f}")
            tags = sorted(set(c["at_peak"]) | set(r["tracked_at_peak"]) | set(f["at_peak"] if f else ()))
            for tag in tags:
                a, b = c["at_peak"].get(tag, 0), r["tracked_at_peak"].get(tag, 0)
                fb = f["at_peak"].get(tag, 0) if f else 0
                if max(a, b, fb) > 0.01 * GIB:
                    print(f"{'':>12}   {tag:<22} cpu-fake {a / GIB:7.2f}  cuda-fake {fb / GIB:7.2f}  tracked {b / GIB:7.2f}")
            report.append({"precision": precision, "shape": s, "cpu_fake": c, "cuda_fake": f, "real": r})
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=1)


if __name__ == "__main__":
    main()
