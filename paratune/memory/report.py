"""A plan for people: `paratune plan`'s summary lines, its plot of the predicted need per batch, and
where the costliest batch's peak goes (`--explain`)."""
from __future__ import annotations

import math

import numpy as np

from paratune.memory.levers import describe
from paratune.memory.plan import Plan, gib


def summary(plan: Plan) -> str:
    """The plan in a few readable lines."""
    m, limit = plan.limit.model, plan.limit
    sizes = np.array([len(b) for b in plan.batches]) if plan.batches else np.zeros(1, dtype=int)
    peaks = plan.predicted() * limit.scale
    lines = [
        f"budget {gib(plan.budget)} per device; static {gib(m.static_step)} "
        f"(parameters {gib(m.resident['parameters'])}, optimizer state {gib(m.resident['optimizer_state'])}, "
        f"gradients {gib(m.resident['gradients'])})",
        f"options: precision {plan.run.options.precision}, {describe(plan.run.options, plan.run.blocks)}"
        + (f", FSDP over {m.options['fsdp_world_size']} ranks" if m.options.get("fsdp_world_size") else "")
        + (", DDP" if m.options.get("ddp") else "")
        + (f", {plan.run.accum} micro-batches per step" if plan.run.accum > 1 else ""),
        ("calibrated on " + str(m.calibration.get("device")) + f": predicted x {limit.scale:.3f}")
        if limit.calibrated else
        (f"uncalibrated: predicted tensor bytes + {100 * (limit.scale - 1):.0f} % margin for the allocator "
         "and workspaces (run `paratune plan --calibrate` on the GPU to measure it)" if limit.scale > 1
         else "tensor bytes, no margin"),
        f"{len(plan.lengths)} utterances -> {len(plan.batches)} batches"
        + (f" ({math.ceil(len(plan.batches) / plan.world_size)} per rank over {plan.world_size})"
           if plan.world_size > 1 else ""),
        f"batch size: min {sizes.min()}, median {int(np.median(sizes))}, max {sizes.max()}",
        f"predicted need: max {gib(peaks.max() if len(peaks) else 0)}, mean {gib(peaks.mean() if len(peaks) else 0)}"
        f" ({100 * (peaks.mean() if len(peaks) else 0) / plan.budget:.1f} % of the budget)",
        f"padding waste {100 * plan.padding_waste():.1f} % of padded frames",
    ]
    if m.hotwords:
        h = m.hotwords
        lines.append(f"hotwords (SeACo): each batch predicted with the most its sampling can draw, "
                     f"{'two' if h['double_rate'] > 0 else 'one'} per utterance of up to {h['max_length']} tokens "
                     "and the [sos] entry: an upper bound over the draws")
    if plan.excluded:
        lines.append(f"{len(plan.excluded)} utterances cannot fit even alone:")
        lines += [f"  {e['key']} ({e['origin']}): {e['reason']}" for e in plan.excluded[:10]]
        if len(plan.excluded) > 10:
            lines.append(f"  ... and {len(plan.excluded) - 10} more (--json lists them all)")
    lines += plan.notes
    return "\n".join(lines)


def write_png(plan: Plan, path) -> None:
    """Predicted need per batch (in plan order) against the budget."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from paratune.io import atomic_write

    peaks = plan.predicted() * plan.limit.scale / 2**30
    fig, ax = plt.subplots(figsize=(9, 4), dpi=110)
    ax.plot(np.arange(len(peaks)), peaks, lw=0.8, label="predicted need per batch")
    ax.axhline(plan.budget / 2**30, color="red", ls="--", label="budget")
    ax.axhline(plan.limit.model.static_step * plan.limit.scale / 2**30, color="gray", ls=":",
               label="static (parameters, gradients, optimizer)")
    ax.set_xlabel("batch, in training order (epoch 0" + (", step-major over ranks)" if plan.world_size > 1 else ")"))
    ax.set_ylabel("GiB")
    ax.set_ylim(0, plan.budget / 2**30 * 1.08)
    ax.set_title(f"{len(plan.batches)} batches, padding waste {100 * plan.padding_waste():.1f} %")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png"), mode="wb")
    plt.close(fig)


def explain_peak(spec, plan: Plan, out) -> None:
    """Trace the costliest batch and say where its peak goes."""
    from paratune.memory.trace import StepOptions, StepTracer

    shapes = plan.batch_shapes()
    if not len(shapes):
        return
    b, t, u = (int(x) for x in shapes[int(np.argmax(plan.predicted()))])
    opts = {k: v for k, v in plan.limit.model.options.items() if k in StepOptions.__dataclass_fields__}
    tracer = StepTracer(spec.config, spec.vocab_size, spec.input_size, StepOptions(**opts))
    # with accumulation the costliest micro-batch is a later one: every gradient is allocated by then
    traced = tracer.trace_step([(b, t, u)] * (2 if plan.run.accum > 1 else 1))
    print(f"where the peak goes, costliest batch (B={b}, T={t}, U={u}), traced: {traced.peak / 2**30:.3f} GiB"
          + (" on one device (before FSDP sharding)" if plan.limit.model.options.get("fsdp_world_size") else ""),
          file=out)
    for tag, n in sorted(traced.breakdown.items(), key=lambda kv: -kv[1]):
        if n > 0:
            print(f"  {tag:<24} {n / 2**30:8.3f} GiB  {100 * n / traced.peak:5.1f} %", file=out)
