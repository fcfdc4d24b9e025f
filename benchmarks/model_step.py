"""One training step of paraformer-large: FunASR's reference against paratune, peak memory and time.

    python benchmarks/model_step.py [--batch 8] [--seconds 10] [--tokens 30] [--config PATH]
                                    [--repeats 3] [--threads N] [--variants funasr,plain,...] [--json OUT]
                                    [--plan-budget 3.5GiB [--plan-manifest PATH]]

What is measured, per row (FunASR reference, then paratune variants), each row in its own subprocess
so that no row's memory is left in another's figures:

* the same random weights (FunASR's model is built once with a fixed seed; its state_dict is loaded
  into paratune's model with strict=True) and the same inputs: `--batch` utterances of `--seconds`
  of audio as SYNTHETIC features (random normal LFR features, 100 fbank frames/s, LFR 7/6 -> 560
  dims), `--tokens` random target ids >= 3 each. `model.train()`: dropout and the glancing sampler
  on, with the config's rates.
* peak memory of one step, tracked tensor by tensor with
  `torch.distributed._tools.mem_tracker.MemTracker` (model, optimizer and inputs tracked), broken
  down by category, with the phase of the step where it sits (forward, backward, after backward:
  clipping, optimizer step). Measured on a steady-state step (optimizer state already created by
  an earlier step, as in a long run) and on the very first step.
* step time: median wall clock of `--repeats` steady-state steps, outside the tracker, with the
  process's user and sys CPU time (all threads) and minor page faults of each step, and the load
  average: user time is the computation; sys is mostly the kernel handing fresh pages to large
  allocations (glibc returns big blocks to the system); wall clock also counts time lost to other
  processes.
  `--threads N` sets torch's thread count in every row; `--repeats 0` measures memory only.
* process RSS peak during the timed steps (an extra; the tracked peak is the headline).

FunASR's step mirrors funasr/train_utils/trainer.py (1.4.16) with accum_grad 1, no AMP, one process:
forward, `loss / accum_grad`, `loss.backward()`, `loss.detach().cpu().item()`, `clip_grad_norm_(
model.parameters(), grad_clip, norm_type=2)` with `grad_clip` from the config's train_conf, a
finiteness check, `optim.step()`, `scheduler.step()`, `optim.zero_grad(set_to_none=True)`. The
optimizer is the config's (`optim: adam` -> torch.optim.Adam, lr from optim_conf; AdamW with
weight_decay 0 is the same code and the same maths) with foreach=True, which is PyTorch's default
on CUDA, where FunASR trains; on CPU PyTorch's default is the per-tensor loop (row `funasr-cpu`).

paratune's step is `paratune.train.step.train_step(model, make_optimizer(model), batch,
grad_clip=...)`, the code the trainer runs.

Variants (`--variants`, comma separated): `funasr`, `funasr-cpu`, `plain` (paratune as is),
`ckpt:E/D` (paratune with `set_checkpointing(model, encoder_blocks=E, decoder_blocks=D)`, E and D an
int or `all`: the first E encoder / D decoder blocks checkpointed). Default
`funasr,plain,ckpt:all/all,ckpt:all/0,ckpt:44/0`.

`--plan-budget B`: the plan's checkpointing against every block. The plan is made in this process as
`paratune plan --device cpu --explain --budget B` makes it (`paratune.memory.plan.plan_run`; the
config's folder as the model directory, its config.yaml with no --config or ++overrides; the fit from
$PARATUNE_CACHE or a new one) over `--plan-manifest` (default: a synthetic manifest, lengths only,
`write_synthetic_manifest(path, 200, seed=1, max_s=30.0)`). The step shape is then the plan's longest
utterance alone, the shape the plan chose its levers at: B = 1, its padded LFR frames (as seconds of
audio) and the most tokens of the manifest (`--batch`, `--seconds`, `--tokens` are ignored), and the
rows are `plain`, `ckpt:E/D` with the plan's (E, D) and `ckpt:all/all`, after any `--variants` given.
The report adds the plan's predicted step-time factors (matmul FLOPs with the checkpointed blocks'
forward recomputed over those without, `levers_weighed`) next to the measured ones: median wall clock,
median user CPU time, and forward + backward (the wall-clock split without the optimizer step and the
rest, which the FLOP count leaves out) of the chosen and of every block against plain, and chosen
against every block.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

MIB = 1024 * 1024
DEFAULT_VARIANTS = "funasr,plain,ckpt:all/all,ckpt:all/0,ckpt:44/0"
PHASES = ("forward", "loss", "backward", "after backward (clip)", "optimizer step", "after step")


def default_config() -> Path:
    shared = Path(os.environ.get("PARATUNE_SHARED_DATA", ROOT.parent / "shared" / "data"))
    return shared / "paraformer_large" / "config.yaml"


# ---- the tracker ------------------------------------------------------------------------------

def make_tracker(model):
    """A MemTracker that also records the peak of each phase of the step, with its breakdown."""
    from torch.distributed._tools.mem_tracker import _TOTAL_KEY, MemTracker

    class PhaseTracker(MemTracker):
        def __init__(self):
            super().__init__()
            self.phase_peaks: dict[str, dict] = {}
            self.fwd_done = self.bw_seen = self.opt_seen = False
            self._hook = model.register_forward_hook(self._root_done)

        def _root_done(self, *_):
            if not self._mod_tracker.is_bw:
                self.fwd_done = True

        def phase(self) -> str:
            if self._in_opt:
                self.opt_seen = True
                return "optimizer step"
            if self._mod_tracker.is_bw:
                self.bw_seen = True
                return "backward"
            if self.opt_seen:
                return "after step"
            if self.bw_seen:
                return "after backward (clip)"
            return "loss" if self.fwd_done else "forward"

        def _update_peak_stats(self, peak_state) -> None:
            super()._update_peak_stats(peak_state)
            snap = self._curr_mem_snap.get(torch.device("cpu"))
            if snap is None:
                return
            ph = self.phase()
            best = self.phase_peaks.get(ph)
            if best is None or snap[_TOTAL_KEY] > best["total"]:
                self.phase_peaks[ph] = {"total": snap[_TOTAL_KEY],
                                        "snap": {str(k.value if hasattr(k, "value") else k): v
                                                 for k, v in snap.items()}}

        def close(self):
            self._hook.remove()

        def peak(self) -> tuple[int, dict]:
            snap = self.get_tracker_snapshot("peak").get(torch.device("cpu"), {})
            return snap.get(_TOTAL_KEY, 0), {str(k.value if hasattr(k, "value") else k): v
                                             for k, v in snap.items()}

    return PhaseTracker()


def optimizer_state_bytes(optimizer) -> int:
    seen, total = set(), 0
    for state in optimizer.state.values():
        for v in state.values():
            if isinstance(v, torch.Tensor):
                st = v.untyped_storage()
                if st.data_ptr() not in seen:
                    seen.add(st.data_ptr())
                    total += st.nbytes()
    return total


def breakdown(snap: dict, opt_state: int) -> dict:
    """MiB per category; the tracker files everything allocated inside optimizer.step() as optimizer
    state, so what exceeds the persistent state there is reported as optimizer-step temporaries."""
    opt = snap.get("Optstate", 0)
    out = {
        "parameters": snap.get("Parameter", 0),
        "gradients": snap.get("Gradient", 0),
        "optimizer state": min(opt, opt_state),
        "optimizer temp": max(0, opt - opt_state),
        "activations": snap.get("Activation", 0),
        "temp": snap.get("Temp", 0),
        "other": snap.get("Other", 0) + snap.get("Buffer", 0),
        "total": snap.get("Total", sum(v for k, v in snap.items() if k != "Total")),
    }
    return {k: round(v / MIB, 1) for k, v in out.items()}


# ---- one step -----------------------------------------------------------------------------------

def funasr_step_fn(model, config, foreach):
    from funasr.optimizers import optim_classes
    from funasr.schedulers import scheduler_classes

    optim = optim_classes[config.get("optim", "adam")](model.parameters(), **config.get("optim_conf", {}),
                                                      foreach=foreach)
    scheduler = scheduler_classes[config.get("scheduler", "warmuplr")](optim, **config.get("scheduler_conf", {}))
    train_conf = config.get("train_conf", {})
    grad_clip = train_conf.get("grad_clip", 10.0)
    clip_type = train_conf.get("grad_clip_type", 2.0)
    accum_grad = train_conf.get("accum_grad", 1)
    optim.zero_grad()  # what train_epoch does before its loop

    def step(batch):
        loss, stats, weight = model(**batch)
        stats = {k: v for k, v in stats.items() if v is not None}
        loss = loss / accum_grad
        loss.backward()
        out = {"loss": loss.detach().cpu().item()}
        if "acc" in stats:
            out["acc"] = float(stats["acc"])
        if grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=grad_clip, norm_type=clip_type)
            out["grad_norm"] = float(grad_norm)
            if not torch.isfinite(grad_norm):
                optim.zero_grad()
                return out
        optim.step()
        scheduler.step()
        optim.zero_grad(set_to_none=True)
        return out

    return optim, step, grad_clip


def paratune_step_fn(model, config):
    from paratune.train.step import make_optimizer, train_step

    optimizer = make_optimizer(model)
    grad_clip = float(config.get("train_conf", {}).get("grad_clip", 5.0))

    def step(batch):
        stats = train_step(model, optimizer, batch, grad_clip=grad_clip).floats()
        return {k: stats[k] for k in ("loss", "acc", "grad_norm") if k in stats}

    return optimizer, step, grad_clip


class PhaseClock:
    """Wall-clock split of a step: forward (to the end of the model's forward), backward + clipping
    (to optimizer.step()), optimizer step, rest."""

    def __init__(self, model):
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
        self.marks = {}

        def mark(key):
            def hook(*_):  # hooks must return None (a value would replace the output / arguments)
                self.marks.setdefault(key, time.perf_counter())
            return hook

        self.handles = [model.register_forward_hook(mark("fwd")), register_optimizer_step_pre_hook(mark("opt0")),
                        register_optimizer_step_post_hook(mark("opt1"))]

    def run(self, fn, batch):
        self.marks = {}
        r0, c0 = resource.getrusage(resource.RUSAGE_SELF), os.times()
        t0 = time.perf_counter()
        out = fn(batch)
        t1 = time.perf_counter()
        r1, c1 = resource.getrusage(resource.RUSAGE_SELF), os.times()
        cpu = {"user": c1.user - c0.user, "sys": c1.system - c0.system, "minflt": r1.ru_minflt - r0.ru_minflt,
               "nivcsw": r1.ru_nivcsw - r0.ru_nivcsw}
        m = self.marks
        split = {}
        if {"fwd", "opt0", "opt1"} <= m.keys():
            split = {"forward": m["fwd"] - t0, "backward+clip": m["opt0"] - m["fwd"],
                     "optimizer": m["opt1"] - m["opt0"], "rest": t1 - m["opt1"]}
        return t1 - t0, cpu, split, out

    def close(self):
        for h in self.handles:
            h.remove()


def rss_reset() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux)
        return True
    except OSError:
        return False


def rss_status() -> dict:
    out = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(("VmHWM", "VmRSS")):
                k, v = line.split(":")
                out[k] = int(v.split()[0]) * 1024
    except OSError:
        pass
    return out


def worker(args) -> dict:
    """Run one row: build, track the first and a steady-state step, time `repeats` steps."""
    import yaml

    from tests.model.reference import funasr_paraformer

    torch.manual_seed(0)
    config = yaml.safe_load(Path(args.config).read_text(encoding="utf-8"))
    data = torch.load(args.state, weights_only=True)
    batch = data["batch"]
    vocab = data["vocab"]
    variant = args.worker
    if variant.startswith("funasr"):
        model = funasr_paraformer(config, vocab, data["input_size"])
        model.load_state_dict(data["state_dict"], strict=True)
        foreach = variant == "funasr"
        optimizer, step, grad_clip = funasr_step_fn(model, config, foreach=True if foreach else None)
        impl = type(optimizer).__name__ + (" foreach" if foreach else " (CPU default: per-tensor loop)")
    else:
        from paratune.model import build_paraformer, set_checkpointing

        model = build_paraformer(config, vocab, data["input_size"])
        model.load_state_dict(data["state_dict"], strict=True)
        if variant.startswith("ckpt:"):
            enc, dec = variant[5:].split("/")
            set_checkpointing(model, encoder_blocks=None if enc == "all" else int(enc),
                              decoder_blocks=None if dec == "all" else int(dec))
        optimizer, step, grad_clip = paratune_step_fn(model, config)
        impl = type(optimizer).__name__ + (" fused" if optimizer.defaults.get("fused") else "")
    del data
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())

    def tracked(seed):
        tracker = make_tracker(model)
        tracker.track_external(model, optimizer, *batch.values())
        torch.manual_seed(seed)
        t0 = time.perf_counter()
        with tracker:
            out = step(batch)
        seconds = time.perf_counter() - t0
        tracker.close()
        opt_state = optimizer_state_bytes(optimizer)
        total, snap = tracker.peak()
        phases = {ph: {"peak_mib": round(v["total"] / MIB, 1), "breakdown": breakdown(v["snap"], opt_state)}
                  for ph, v in sorted(tracker.phase_peaks.items(), key=lambda kv: PHASES.index(kv[0]))}
        peak_phase = max(tracker.phase_peaks.items(), key=lambda kv: kv[1]["total"])[0]
        modules = {}
        from torch.distributed._tools.mem_tracker import _ModState, _TOTAL_KEY
        for name in ("encoder", "predictor", "decoder"):
            stats = tracker.memory_tracking.get(getattr(model, name))
            if stats is None or _ModState.POST_FW not in stats.snapshots:
                continue
            pre = stats.snapshots[_ModState.PRE_FW][-1].get(torch.device("cpu"), {}).get(_TOTAL_KEY, 0)
            post = stats.snapshots[_ModState.POST_FW][-1].get(torch.device("cpu"), {}).get(_TOTAL_KEY, 0)
            modules[name] = round((post - pre) / MIB, 1)
        del tracker
        return {"peak_mib": round(total / MIB, 1), "phase": peak_phase, "breakdown": breakdown(snap, opt_state),
                "phases": phases, "forward_retained_mib": modules, "result": out,
                "seconds_under_tracker": round(seconds, 2)}

    first = tracked(seed=1)
    steady = tracked(seed=2)

    clock = PhaseClock(model)
    times, cpus, splits, usage = [], [], [], []
    rss_before = rss_status().get("VmRSS", 0)
    can_reset = rss_reset()
    load_before = os.getloadavg()[0]
    for i in range(args.repeats):
        torch.manual_seed(3 + i)
        seconds, cpu, split, _ = clock.run(step, batch)
        times.append(seconds)
        cpus.append(cpu["user"])
        usage.append(cpu)
        splits.append(split)
    clock.close()
    rss = rss_status()
    median = statistics.median(times) if times else float("nan")
    mid = splits[times.index(sorted(times)[len(times) // 2])] if times else {}
    return {
        "variant": variant, "optimizer": impl, "grad_clip": grad_clip, "parameters": n_params,
        "parameter_mib": round(param_bytes / MIB, 1),
        "steady": steady, "first": first,
        "step_s": round(median, 3), "step_times_s": [round(t, 3) for t in times],
        "step_user_s": round(statistics.median(cpus), 3) if cpus else float("nan"),
        "loadavg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "step_usage": [{k: round(v, 2) for k, v in u.items()} for u in usage],
        "step_split_s": {k: round(v, 3) for k, v in mid.items()},
        "step_splits_s": [{k: round(v, 3) for k, v in sp.items()} for sp in splits],
        "rss_before_mib": round(rss_before / MIB, 1),
        "rss_peak_mib": round(rss.get("VmHWM", 0) / MIB, 1) if can_reset else None,
        "torch_threads": torch.get_num_threads(),
    }


# ---- the plan's levers (--plan-budget) ------------------------------------------------------------

def plan_manifest(args, tmp: Path) -> Path:
    if args.plan_manifest:
        return Path(args.plan_manifest)
    from paratune.data.lengths import write_synthetic_manifest
    return write_synthetic_manifest(tmp / "plan.jsonl", 200, seed=1, max_s=30.0)


def plan_levers(args, manifest: Path) -> dict:
    """The plan's chosen checkpointing, the longest utterance it chose it at (padded as the sampler pads
    it) and its predicted step-time factors, as `paratune plan --device cpu --explain` makes them."""
    from paratune.data.lengths import read_lengths
    from paratune.memory.plan import parse_bytes, plan_run
    from paratune.modeldir import read_model_dir
    from paratune.train.config import load_config

    spec = read_model_dir(Path(args.config).parent)
    config = load_config(spec.config, None, [])
    fe = spec.frontend
    lengths, errors = read_lengths([manifest], spec.tokenizer, fe.lfr_n, fe.frame_shift, fe.frame_length)
    if errors or not len(lengths):
        sys.exit(f"{manifest}: {len(errors)} bad line(s), {len(lengths)} usable utterance(s)")
    budget = parse_bytes(args.plan_budget)
    t0 = time.perf_counter()
    run = plan_run(spec, lengths, config, budget, "cpu", explain=True,
                   log=lambda m: print(f"  plan: {m}", flush=True))
    frames = run.sampler.padded(int(run.frames.max()))
    factors = {a.options.checkpointing: a.factor for a in run.alternatives
               if a.options.optimizer == run.options.optimizer}
    enc, dec = run.options.checkpointing
    return {"budget": args.plan_budget, "budget_bytes": budget, "manifest": str(manifest),
            "utterances": len(lengths), "optimizer": run.options.optimizer, "precision": run.options.precision,
            "blocks": list(run.blocks), "checkpointing": [enc, dec], "variant": f"ckpt:{enc}/{dec}",
            "longest": {"frames": frames, "tokens": int(lengths.tokens.max()),
                        "seconds": frames * fe.lfr_n * fe.frame_shift / 1000},
            "predicted": {"chosen_vs_plain": factors[(enc, dec)], "all_vs_plain": factors[tuple(run.blocks)],
                          "chosen_vs_all": factors[(enc, dec)] / factors[tuple(run.blocks)]},
            "levers_weighed": [a.to_dict() for a in run.alternatives], "notes": list(run.notes),
            "plan_s": round(time.perf_counter() - t0, 1)}


def plan_variants(plan: dict, given: str | None) -> list[str]:
    """The rows: any `--variants` given, then plain, the plan's checkpointing and every block."""
    variants = [v.strip() for v in (given or "").split(",") if v.strip()]
    return variants + [v for v in ("plain", plan["variant"], "ckpt:all/all") if v not in variants]


def plan_measured(plan: dict, rows: list[dict]) -> dict:
    """Median seconds and factors of the plan's rows: wall clock, user CPU, and forward + backward
    (per step, the wall-clock split without the optimizer step and the rest)."""
    by = {r["variant"]: r for r in rows}
    picked = {"plain": by["plain"], "chosen": by[plan["variant"]], "all": by["ckpt:all/all"]}

    def fwd_bwd(r):
        sums = [sp["forward"] + sp["backward+clip"] for sp in r["step_splits_s"] if sp]
        return statistics.median(sums) if sums else float("nan")

    measures = {"wall": lambda r: r["step_s"], "user_cpu": lambda r: r["step_user_s"], "forward_backward": fwd_bwd}
    out = {}
    for name, f in measures.items():
        s = {k: f(r) for k, r in picked.items()}
        out[name] = {**{f"{k}_s": round(v, 3) for k, v in s.items()},
                     "chosen_vs_plain": s["chosen"] / s["plain"], "all_vs_plain": s["all"] / s["plain"],
                     "chosen_vs_all": s["chosen"] / s["all"]}
    return out


def plan_report(plan: dict) -> str:
    enc, dec = plan["checkpointing"]
    (eb, db), lg, m = plan["blocks"], plan["longest"], plan["measured"]
    lines = [
        f"plan (plan_run, device cpu, budget {plan['budget']}, {plan['utterances']} utterances of "
        f"{plan['manifest']}): {plan['precision']} {plan['optimizer']}, checkpointing {enc}/{eb} encoder and "
        f"{dec}/{db} decoder blocks; timed at its longest utterance alone: B=1, {lg['frames']} LFR frames "
        f"({lg['seconds']:g} s), {lg['tokens']} tokens.",
        "",
        "| step-time factor | predicted (matmul FLOPs) | wall clock | user CPU | forward + backward |",
        "|---|---:|---:|---:|---:|",
    ]
    names = {"chosen_vs_plain": f"chosen ({enc}/{dec}) / plain", "all_vs_plain": f"every block ({eb}/{db}) / plain",
             "chosen_vs_all": "chosen / every block"}
    for key, name in names.items():
        lines.append(f"| {name} | x{plan['predicted'][key]:.3f} | x{m['wall'][key]:.3f} | "
                     f"x{m['user_cpu'][key]:.3f} | x{m['forward_backward'][key]:.3f} |")
    lines.append("")
    lines.append("median seconds (plain / chosen / every block): " + "; ".join(
        f"{k.replace('_', ' ')} {v['plain_s']:.2f} / {v['chosen_s']:.2f} / {v['all_s']:.2f}" for k, v in m.items()))
    return "\n".join(lines)


# ---- the parent -----------------------------------------------------------------------------------

def prepare(args, path: Path) -> dict:
    """Build FunASR's model once (seed 0) and the synthetic batch; save both for the workers."""
    from tests.model.reference import funasr_paraformer

    import yaml

    config = yaml.safe_load(Path(args.config).read_text(encoding="utf-8"))
    tokens = Path(args.config).parent / "tokens.json"
    vocab = args.vocab or len(json.loads(tokens.read_text(encoding="utf-8")))
    fc = config.get("frontend_conf", {})
    n_mels, lfr_m, lfr_n = fc.get("n_mels", 80), fc.get("lfr_m", 7), fc.get("lfr_n", 6)
    fbank_frames = int(round(args.seconds * 1000 / fc.get("frame_shift", 10)))
    lfr_frames = math.ceil(fbank_frames / lfr_n)
    input_size = n_mels * lfr_m
    torch.manual_seed(0)
    model = funasr_paraformer(config, vocab, input_size)
    g = torch.Generator().manual_seed(1234)
    batch = {
        "speech": torch.randn(args.batch, lfr_frames, input_size, generator=g),
        "speech_lengths": torch.full((args.batch,), lfr_frames, dtype=torch.long),
        "text": torch.randint(3, vocab, (args.batch, args.tokens), generator=g),
        "text_lengths": torch.full((args.batch,), args.tokens, dtype=torch.long),
    }
    torch.save({"state_dict": model.state_dict(), "batch": batch, "vocab": vocab, "input_size": input_size}, path)
    return {"vocab": vocab, "input_size": input_size, "fbank_frames": fbank_frames, "lfr_frames": lfr_frames,
            "parameters": sum(p.numel() for p in model.parameters())}


def label(variant: str) -> str:
    if variant == "funasr":
        return "FunASR 1.4.16 (reference)"
    if variant == "funasr-cpu":
        return "FunASR, optimizer as PyTorch defaults on CPU"
    if variant == "plain":
        return "paratune, as is"
    if variant.startswith("ckpt:"):
        enc, dec = variant[5:].split("/")
        return f"paratune, checkpointing enc {enc} / dec {dec} blocks"
    return variant


def fmt_breakdown(b: dict) -> str:
    names = {"parameters": "P", "gradients": "G", "optimizer state": "opt", "optimizer temp": "opt-tmp",
             "activations": "act", "temp": "tmp", "other": "in"}
    return " + ".join(f"{names[k]} {b[k]:.0f}" for k in names if b.get(k, 0) >= 0.5)


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M %Z")}


def report(rows: list[dict], info: dict, args) -> str:
    ref = next((r for r in rows if r["variant"] == "funasr"), rows[0])
    vs = "x FunASR" if ref["variant"] == "funasr" else f"x {ref['variant']}"
    lines = [
        f"paraformer-large ({info['parameters'] / 1e6:.1f} M parameters, vocab {info['vocab']}), "
        f"batch {args.batch} x {args.seconds:g} s ({info['fbank_frames']} fbank -> {info['lfr_frames']} LFR "
        f"frames x {info['input_size']}), {args.tokens} tokens each; SYNTHETIC features (random normal) "
        f"and random token ids; model.train(); fp32 on CPU.",
        f"machine: {info['machine']['cpu']}, {info['machine']['cores']} cores, torch {info['machine']['torch']} "
        f"({info['machine']['threads']} threads), {info['machine']['date']}",
        "peak = MemTracker tensor-level peak of a steady-state step (optimizer state already exists); "
        "step = median wall clock of the timed steps, outside the tracker; user CPU = median user-mode CPU "
        "time of the process (all threads) in the same steps: the computation, without the kernel's page-fault "
        "work (sys) and without time lost to other processes. MiB.",
        "",
        f"| row | optimizer | peak (MiB) | {vs} | peak in | step (s) | {vs} | user CPU (s) | {vs} "
        "| first-step peak (MiB) | RSS peak (MiB) | peak breakdown (MiB) |",
        "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        s = r["steady"]
        lines.append(
            f"| {label(r['variant'])} | {r['optimizer']} | {s['peak_mib']:.0f} | "
            f"{s['peak_mib'] / ref['steady']['peak_mib']:.2f} | {s['phase']} | {r['step_s']:.2f} | "
            f"{r['step_s'] / ref['step_s']:.2f} | {r['step_user_s']:.2f} | "
            f"{r['step_user_s'] / ref['step_user_s']:.2f} | "
            f"{r['first']['peak_mib']:.0f} ({r['first']['phase']}) | "
            f"{r['rss_peak_mib'] if r['rss_peak_mib'] is not None else 'n/a'} | {fmt_breakdown(s['breakdown'])} |")
    lines.append("")
    lines.append("P parameters, G gradients, opt optimizer state, opt-tmp temporaries inside optimizer.step(), "
                 "act activations (saved for backward and forward intermediates), tmp backward temporaries "
                 "(activation gradients, recomputation under checkpointing), in inputs.")
    lines.append("")
    lines.append("Per-phase peaks of the steady-state step (MiB); forward retained = tracked memory at the end "
                 "of each top-level module's (last) forward minus at its start (MiB); wall-clock split of the "
                 "median step (s):")
    for r in rows:
        ph = ", ".join(f"{k} {v['peak_mib']:.0f}" for k, v in r["steady"]["phases"].items())
        sp = ", ".join(f"{k} {v:.2f}" for k, v in r["step_split_s"].items())
        kept = ", ".join(f"{k} {v:.0f}" for k, v in r["steady"]["forward_retained_mib"].items())
        res = ", ".join(f"{k} {v:.4g}" for k, v in r["steady"]["result"].items())
        lines.append(f"- {label(r['variant'])}: {ph}. Forward retained: {kept}. Time: {sp} "
                     f"(all steps, wall: {r['step_times_s']}, user CPU: {[u['user'] for u in r['step_usage']]}, "
                     f"sys CPU: {[u['sys'] for u in r['step_usage']]}, minor page faults: "
                     f"{[u['minflt'] for u in r['step_usage']]}; 1-min load average before/after: "
                     f"{r['loadavg_1min']}). Step results: {res}.")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--tokens", type=int, default=30)
    p.add_argument("--config", default=str(default_config()))
    p.add_argument("--vocab", type=int, default=None, help="default: entries in tokens.json beside the config")
    p.add_argument("--repeats", type=int, default=3, help="timed steps per row (0: memory only)")
    p.add_argument("--threads", type=int, default=None, help="torch threads in each row (default: torch's)")
    p.add_argument("--variants", default=None, help=f"default {DEFAULT_VARIANTS}; with --plan-budget: none "
                   "besides the plan's rows")
    p.add_argument("--plan-budget", default=None, help="time the plan's checkpointing at this budget (e.g. 3.5GiB)")
    p.add_argument("--plan-manifest", default=None, help="manifest the plan reads (default: a synthetic one)")
    p.add_argument("--json", default=None)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--state", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        result = worker(args)
        Path(args.out).write_text(json.dumps(result), encoding="utf-8")
        return

    if not Path(args.config).exists():
        sys.exit(f"config not found: {args.config} (pass --config or set PARATUNE_SHARED_DATA)")
    variants = [v.strip() for v in (args.variants or DEFAULT_VARIANTS).split(",") if v.strip()]
    plan = None
    with tempfile.TemporaryDirectory(prefix="paratune-bench-") as tmp:
        if args.plan_budget:
            print(f"planning at {args.plan_budget} (device cpu) ...", flush=True)
            plan = plan_levers(args, plan_manifest(args, Path(tmp)))
            args.batch, args.seconds, args.tokens = 1, plan["longest"]["seconds"], plan["longest"]["tokens"]
            variants = plan_variants(plan, args.variants)
        state = Path(tmp) / "state.pt"
        print("building FunASR's model and the synthetic batch ...", flush=True)
        info = prepare(args, state)
        info["machine"] = machine()
        if plan and info["lfr_frames"] != plan["longest"]["frames"]:
            sys.exit(f"the batch has {info['lfr_frames']} LFR frames, the plan's longest {plan['longest']['frames']}")
        rows = []
        for v in variants:
            out = Path(tmp) / f"row{len(rows)}.json"
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", v, "--state", str(state),
                   "--out", str(out), "--config", args.config, "--repeats", str(args.repeats)]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            print(f"running {v} ...", flush=True)
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, cwd=ROOT)
            row = json.loads(out.read_text(encoding="utf-8"))
            rows.append(row)
            s = row["steady"]
            print(f"  {label(v)}: peak {s['peak_mib']:.0f} MiB in {s['phase']} "
                  f"[{fmt_breakdown(s['breakdown'])}], first step {row['first']['peak_mib']:.0f} MiB, "
                  f"step {row['step_s']:.2f} s {row['step_times_s']}, user CPU {row['step_user_s']:.2f} s "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    text = report(rows, info, args)
    if plan:
        plan["measured"] = plan_measured(plan, rows)
        text += "\n\n" + plan_report(plan)
    print()
    print(text)
    if args.json:
        out = {"info": info, "args": vars(args), "rows": rows} | ({"plan": plan} if plan else {})
        Path(args.json).write_text(json.dumps(out, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
