"""`paratune doctor`: what a training log says about GPU memory, in plain words, with the fix.

Reads FunASR 1.x training logs (every per-step format it has printed, see FORMATS), FunASR 0.x epoch
summaries, DeepSpeed's `MemAllocated=` lines interleaved with them, and paratune's own memory.csv.

FunASR's four figures (GiB, though it prints "GB"): usage = memory_allocated() after the step,
peak = max_memory_allocated(), cache = memory_reserved(), cache_peak = max_memory_reserved(). FunASR
never resets the peaks, so peak and cache_peak are lifetime maxima: their rise says a larger batch
came, not that memory leaks; cache falls after the empty_cache() FunASR runs after each data slice.
So: a leak is `usage` rising step after step; fragmentation is the allocator holding (cache_peak) well
above the most any step allocated (peak); an outlier batch is a new lifetime peak far above the
earlier ones while usage stays flat.
"""
from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

GiB = 2**30
NUM = r"([0-9]+(?:\.[0-9]+)?)"

# per-step memory, newest FunASR format first (labelled since v1.0.17, unlabelled v1.0.6-v1.0.16)
LABELLED = re.compile(rf"GPU, memory: usage: {NUM} GB, peak: {NUM} GB, cache: {NUM} GB, cache_peak: {NUM} GB")
UNLABELLED = re.compile(rf"GPU, memory: {NUM} GB, {NUM} GB, {NUM} GB, {NUM} GB")
DEBUG_105 = re.compile(rf"(before|after), GPU, memory: {NUM} MB, {NUM} MB, {NUM} MB, {NUM} MB")  # v1.0.5: GiB really
EPOCH_0X = re.compile(rf"gpu_max_cached_mem_GB={NUM}")
DEEPSPEED = re.compile(rf"MemAllocated={NUM}\s*GB.*?MaxMemAllocated={NUM}\s*GB"
                       rf"(?:.*?CacheAllocated={NUM}\s*GB.*?MaxCacheAllocated={NUM}\s*GB)?")
RANK = re.compile(r"\brank[:\s]\s*(\d+)|\[rank(\d+)\]|\[Rank (\d+)\]")
TAG = re.compile(r"\] - (train|val),|^(train|val),")
STEP = re.compile(r"total step: (\d+)")
BATCH = re.compile(r"\('batch_size', (\d+)\)")
# lines understood although they carry no memory figure
PROGRESS_0X = re.compile(r"\d+epoch:train:\d+-\d+batch")
DATALOADER = re.compile(r"dataloader start from step")
STEP_LINE = re.compile(r"epoch: \d+/\d+, .*(step_in_slice|step): \d+")
HOST_KILLED = re.compile(r"DataLoader worker \(pid \d+\) is killed by signal: Killed|Killed process \d+|"
                         r"out of memory: Killed process|(?<!OutOf)MemoryError")
CUDA_OOM = re.compile(r"CUDA out of memory|OutOfMemoryError")
CAPACITY = re.compile(rf"total capacity of {NUM} GiB")

KINDS = ("leak", "fragmentation", "outlier_batch", "near_capacity", "host_memory", "healthy", "no_memory_data")

FIX = {
    "leak": ("something keeps each step's tensors alive: a loss or output kept for logging without .item() or "
             ".detach(), a list that grows, a hook. paratune: its loop keeps none; look at code you added "
             "(callbacks, hooks). FunASR: look at code added to the model or trainer; update funasr"),
    "fragmentation": ("changing batch shapes fragment the allocator's cache. paratune: ++dataset_conf.buckets=1.1 "
                      "(length buckets; PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True is its default). FunASR: "
                      "export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True, ++dataset_conf.sort_size=1024 "
                      "(sort a buffer by length), batch_type token with a smaller batch_size"),
    "outlier_batch": ("a few batches (long clips, many utterances) need far more than the rest. paratune: "
                      "`paratune plan --budget` packs every batch to the budget and no more, and `paratune prepare "
                      "--max-duration 20 --long-audio split` cuts long clips at silences. FunASR: "
                      "++dataset_conf.batch_type=token with a smaller ++dataset_conf.batch_size, "
                      "++dataset_conf.max_token_length to drop the longest clips, ++dataset_conf.sort_size=1024"),
    "near_capacity": ("the batch budget is too large for the card. paratune: --budget at 90 % of the card, "
                      "--precision bf16, checkpointing is turned on by the plan when needed. FunASR: lower "
                      "++dataset_conf.batch_size (tokens with batch_type token), ++train_conf.use_fp16=true, "
                      "++dataset_conf.max_token_length"),
    "host_memory": ("host RAM ran out (the kernel killed a loader worker), not GPU memory. paratune: fewer "
                    "++dataset_conf.num_workers; its sampler holds only lengths. FunASR: fewer "
                    "++dataset_conf.num_workers, a smaller ++dataset_conf.buffer_size/sort_size, more "
                    "++dataset_conf.data_split_num (smaller data slices in memory)"),
    "healthy": "nothing to fix.",
    "no_memory_data": ("these lines carry no memory figures. FunASR 1.0.17 and later print them on every "
                       "log_interval line (GPU, memory: usage/peak/cache/cache_peak); paratune writes memory.csv"),
}


@dataclass
class Record:
    line: int  # 1-based, in the concatenated input
    rank: int | None
    tag: str  # train, val, epoch (0.x summary), deepspeed
    step: int | None
    usage: float | None  # GiB
    peak: float | None
    cache: float | None
    cache_peak: float | None
    batch: int | None = None


@dataclass
class Parsed:
    records: list[Record] = field(default_factory=list)
    understood: int = 0  # lines with or without memory figures that the doctor recognised
    lines: int = 0
    truncated: list[str] = field(default_factory=list)
    host_killed: list[int] = field(default_factory=list)
    cuda_oom: list[int] = field(default_factory=list)
    capacity: float | None = None


def parse_funasr(text: str, parsed: Parsed | None = None, offset: int = 0) -> Parsed:
    p = parsed or Parsed()
    lines = text.splitlines()
    for i, line in enumerate(lines, start=offset + 1):
        p.lines += 1
        if not line.strip():
            continue
        rank_m = RANK.search(line)
        rank = next((int(g) for g in rank_m.groups() if g is not None), None) if rank_m else None
        tag_m = TAG.search(line)
        tag = (tag_m.group(1) or tag_m.group(2)) if tag_m else "train"  # untagged pastes are train lines
        step_m, batch_m = STEP.search(line), BATCH.search(line)
        step = int(step_m.group(1)) if step_m else None
        batch = int(batch_m.group(1)) if batch_m else None
        m = LABELLED.search(line) or UNLABELLED.search(line)
        if m:
            u, pk, c, cp = (float(x) for x in m.groups())
            p.records.append(Record(i, rank, tag, step, u, pk, c, cp, batch))
            p.understood += 1
            continue
        m = DEBUG_105.search(line)
        if m:
            u, pk, c, cp = (float(x) for x in m.groups()[1:])
            p.records.append(Record(i, rank, "train", step, u, pk, c, cp, batch))
            p.understood += 1
            continue
        m = DEEPSPEED.search(line)
        if m:
            vals = [float(x) if x is not None else None for x in m.groups()]
            p.records.append(Record(i, rank, "deepspeed", step, vals[0], vals[1], vals[2], vals[3]))
            p.understood += 1
            continue
        m = EPOCH_0X.search(line)
        if m:
            values = [float(x) for x in EPOCH_0X.findall(line)]
            p.records.append(Record(i, rank, "epoch", None, None, None, None, max(values)))
            p.understood += 1
            continue
        if HOST_KILLED.search(line):
            p.host_killed.append(i)
            p.understood += 1
        elif CUDA_OOM.search(line):
            p.cuda_oom.append(i)
            cap = CAPACITY.search(line)
            if cap:
                p.capacity = float(cap.group(1))
            p.understood += 1
        elif PROGRESS_0X.search(line) or DATALOADER.search(line):
            p.understood += 1
        elif "GPU, memory:" in line or STEP_LINE.search(line):
            # a FunASR step line cut before (or inside) its memory figures: what a paste often ends with
            p.truncated.append(f"line {i}: a FunASR step line without complete memory figures "
                               f"(cut at ...{line[-40:]!r})")
            p.understood += 1
    return p


def _finding(kind: str, evidence: str) -> dict:
    return {"kind": kind, "evidence": evidence, "fix": FIX[kind]}


def _rising(values: list[float], min_rise: float) -> tuple[bool, float]:
    """A rise of at least min_rise from the first to the last value with most steps not falling."""
    if len(values) < 4:
        return False, 0.0
    rise = values[-1] - values[0]
    not_falling = sum(b >= a - 1e-9 for a, b in zip(values, values[1:])) / (len(values) - 1)
    return rise >= min_rise and not_falling >= 0.75, rise


def diagnose_funasr(p: Parsed, gpu_memory: float | None = None) -> list[dict]:
    findings = []
    capacity = gpu_memory or p.capacity
    if p.host_killed:
        gpu = [r for r in p.records if r.cache_peak is not None]
        flat = (f"; GPU memory in the same log: cache_peak {max(r.cache_peak for r in gpu):.2f} GiB"
                if gpu else "")
        findings.append(_finding("host_memory", f"line {p.host_killed[0]}: a DataLoader worker was killed by the "
                                                f"kernel (host RAM exhausted){flat}"))
    by_rank: dict = {}
    for r in p.records:
        by_rank.setdefault(r.rank, []).append(r)
    for rank, recs in sorted(by_rank.items(), key=lambda kv: -1 if kv[0] is None else kv[0]):
        who = f"rank {rank}" if rank is not None else "the log"
        train = [r for r in recs if r.tag in ("train", "deepspeed") and r.usage is not None]
        usage = [r.usage for r in train]
        leak, rise = _rising(usage, max(0.5, 0.10 * (usage[0] if usage else 0)))
        if leak:
            findings.append(_finding("leak", f"{who}: memory allocated between steps (usage) rose {rise:.2f} GiB "
                                             f"over {len(usage)} logged steps, {usage[0]:.2f} -> {usage[-1]:.2f} GiB "
                                             f"(lines {train[0].line}-{train[-1].line})"))
        full = [r for r in recs if r.peak is not None and r.cache_peak is not None]
        if full:
            last = full[-1]
            gap = last.cache_peak - last.peak
            if gap > max(1.0, 0.15 * last.peak):
                findings.append(_finding("fragmentation", (
                    f"{who}, line {last.line}: the allocator has held up to {last.cache_peak:.2f} GiB (cache_peak) "
                    f"while no step ever allocated more than {last.peak:.2f} GiB (peak): {gap:.2f} GiB "
                    f"({100 * gap / last.peak:.0f} %) of cached blocks that the changing batch shapes could not "
                    "reuse")))
            peaks = [r.peak for r in full if r.tag != "val"]
            if len(peaks) >= 3:
                jumps = [(b - a, r) for a, b, r in zip(peaks, peaks[1:], full[1:]) if b > a]
                flat_usage = not leak
                big = [(j, r) for j, r in jumps if j > max(1.0, 0.2 * peaks[0])]
                if big and flat_usage:
                    j, r = max(big, key=lambda x: x[0])
                    where = f"step {r.step}" if r.step is not None else f"line {r.line}"
                    bs = f" (batch_size {r.batch})" if r.batch is not None else ""
                    findings.append(_finding("outlier_batch", (
                        f"{who}: the lifetime peak jumped {j:.2f} GiB at {where}{bs}, to {r.peak:.2f} GiB, while "
                        f"memory between steps stayed at {usage[-1] if usage else r.usage:.2f} GiB: a batch "
                        "larger or longer than all before it")))
        tops = [r.cache_peak for r in recs if r.cache_peak is not None]
        if capacity and tops and max(tops) > 0.9 * capacity:
            findings.append(_finding("near_capacity", f"{who}: the allocator reached {max(tops):.2f} GiB of the "
                                                      f"card's {capacity:.2f} GiB ({100 * max(tops) / capacity:.0f} %)"))
    if p.cuda_oom and not any(f["kind"] in ("near_capacity", "outlier_batch", "leak") for f in findings):
        findings.append(_finding("near_capacity", f"line {p.cuda_oom[0]}: CUDA out of memory"
                                 + (f" on a {capacity:.2f} GiB card" if capacity else "")))
    if not p.records and not findings:
        return [_finding("no_memory_data", f"{p.understood} of {p.lines} lines understood, none with a memory "
                                           "figure")]
    if not findings:
        findings.append(_finding("healthy", _healthy_evidence(p)))
    return findings


def _healthy_evidence(p: Parsed) -> str:
    parts = []
    last = {}
    for r in p.records:
        last[r.rank] = r
    for rank, r in sorted(last.items(), key=lambda kv: -1 if kv[0] is None else kv[0]):
        who = f"rank {rank}" if rank is not None else "last line"
        if r.tag == "epoch":
            parts.append(f"{who}: the epoch summary's largest reserved memory {r.cache_peak:.2f} GiB (no per-step "
                         "figures, so no trend to judge)")
            continue
        fields = [f"{name} {getattr(r, name):.2f}" for name in ("usage", "peak", "cache", "cache_peak")
                  if getattr(r, name) is not None]
        note = ""
        if r.cache is not None and r.cache_peak is not None and r.cache < 0.8 * r.cache_peak:
            note = " (cache below cache_peak: FunASR's empty_cache() after a data slice released it; normal)"
        parts.append(f"{who}, line {r.line}: " + ", ".join(fields) + " GiB" + note)
    steps = [r for r in p.records if r.tag != "epoch"]
    if any(r.peak is not None and r.cache_peak is not None for r in steps):
        parts.append("the allocator holds at most 15 % beyond the largest step's peak")
    if len(steps) >= 4:
        parts.append("memory between steps does not rise")
    elif steps:
        parts.append(f"{len(steps)} step line{'s' if len(steps) != 1 else ''}: too few to see a trend")
    return "; ".join(parts)


def diagnose_csv(path: Path, notes: list[str] | None = None) -> tuple[list[dict], int]:
    """paratune's memory.csv: its own detectors, replayed. Rows that cannot be read (a missing or
    non-finite figure) are left out, each said in `notes` with its file:line."""
    from paratune.train.monitor import MemoryMonitor, read_csv
    s = read_csv(path, notes if notes is not None else [])
    if not s:
        return [_finding("no_memory_data", f"{path}: a memory.csv header without usable rows")], 0
    monitor = MemoryMonitor.replay(s, window=min(50, max(10, len(s) // 2)))
    findings = [_finding(kind, text) for kind, text in monitor.findings.items()]
    peak = max(x.peak for x in s)
    budget = s[-1].budget
    if budget and peak > budget:
        findings.append(_finding("near_capacity", f"a step peaked at {peak / GiB:.2f} GiB, above the budget "
                                                  f"{budget / GiB:.2f} GiB"))
    if not findings:
        what = "reserved" if any(x.reserved for x in s) else "tracked"
        top = max(x.reserved for x in s) if what == "reserved" else peak
        findings.append(_finding("healthy", (
            f"{len(s)} steps: peak {peak / GiB:.2f} GiB of the {budget / GiB:.2f} GiB budget, {what} at most "
            f"{top / GiB:.2f} GiB, memory between steps {s[0].allocated / GiB:.2f} -> {s[-1].allocated / GiB:.2f} GiB")))
    return findings, len(s)


def doctor(paths: list[Path], gpu_memory: float | None = None) -> dict:
    """The report for one run's logs (several files are read as one log, in the order given)."""
    funasr, csv_findings, csv_rows, errors = Parsed(), [], 0, []
    for path in paths:
        path = Path(path)
        try:
            raw = path.read_bytes()
        except OSError as e:
            errors.append(f"{path}: {e.strerror or e}")
            continue
        text = raw.decode("utf-8", errors="replace")
        if text.startswith("step,epoch,batch,frames,tokens,predicted,peak"):
            try:
                found, rows = diagnose_csv(path, errors)
            except (ValueError, KeyError, TypeError, OverflowError, csv.Error) as e:
                errors.append(f"{path}: not a readable paratune memory.csv ({e})")
                continue
            csv_findings += found
            csv_rows += rows
        else:
            parse_funasr(text, funasr, offset=funasr.lines)
    findings = list(csv_findings)
    if funasr.lines or not (csv_rows or errors):  # FunASR lines, or nothing at all that was readable
        findings += diagnose_funasr(funasr, gpu_memory)
    if len({f["kind"] for f in findings}) > 1:
        findings = [f for f in findings if f["kind"] not in ("healthy", "no_memory_data")] or findings
    ranks = sorted({r.rank for r in funasr.records if r.rank is not None})
    return {"lines_parsed": funasr.understood + csv_rows, "ranks": ranks, "findings": findings,
            "notes": funasr.truncated + errors, "records": funasr.records}


def report_text(report: dict) -> str:
    out = [f"read {report['lines_parsed']} line(s) with figures or known events"
           + (f", ranks {', '.join(map(str, report['ranks']))}" if report["ranks"] else "")]
    for note in report["notes"]:
        out.append(f"note: {note}")
    for f in report["findings"]:
        out.append(f"{f['kind']}: {f['evidence']}")
        if f["kind"] != "healthy":
            out.append(f"  fix: {f['fix']}")
    return "\n".join(out)


def to_json(report: dict) -> str:
    return json.dumps({k: report[k] for k in ("lines_parsed", "ranks", "findings", "notes")}, ensure_ascii=False)


def write_png(report: dict, path: Path) -> bool:
    """The FunASR figures over the log's lines, one colour per figure, one marker per rank."""
    records = [r for r in report["records"] if r.tag != "epoch"]
    if not records:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from paratune.io import atomic_write

    fig, ax = plt.subplots(figsize=(9, 4), dpi=110)
    for rank in sorted({r.rank for r in records}, key=lambda x: -1 if x is None else x):
        rs = [r for r in records if r.rank == rank]
        x = [r.step if r.step is not None else r.line for r in rs]
        for name, colour in (("usage", "C0"), ("peak", "C1"), ("cache", "C2"), ("cache_peak", "C3")):
            y = [getattr(r, name) for r in rs]
            if any(v is not None for v in y):
                ax.plot(x, y, marker="o", ms=3, lw=0.8, color=colour,
                        label=f"{name}" + (f" rank {rank}" if rank is not None else ""))
    ax.set_xlabel("total step (or line)")
    ax.set_ylabel("GiB")
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("GPU memory in the log")
    fig.tight_layout()
    atomic_write(Path(path), lambda f: fig.savefig(f, format="png"))
    plt.close(fig)
    return True
