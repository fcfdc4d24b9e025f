"""The fault matrix: SIGKILL during a step, a save and validation, in one process and in 2-rank DDP, then
`--resume` until the run completes. Every utterance is trained exactly once per epoch (the ledger, and the
same ledger as an uninterrupted run), and the weights are an uninterrupted run's (CPU): the last
checkpoint's, each kept model.epN.pt and final/ (their average). Nothing of a torn save is left behind.

Each case runs `paratune finetune` (with --valid: validation and kept models are part of the state)
through tests/train/fault_driver.py, which wraps one function of the product and SIGKILLs its own process
at the function's Nth call: no hook in the product. The kill points are drawn with a seeded generator
(SEED) from the calls an uninterrupted reference run of the same command made (the driver traces them):
after the first checkpoint (before it there is nothing to resume), spread over the group's sites, distinct,
and injected in the run's order. After a kill the next process resumes from whatever checkpoint.pt the
killed one left; its N counts that process's calls from the checkpoint it resumes from. Each case prints
what it injected and found (pytest -s).

Every subprocess has a deadline; on a timeout it is killed with every process it started (torchrun puts
each worker in a session of its own): a rank blocked on a collective with a dead peer fails the test
instead of hanging it. (torchrun's agent notices the
SIGKILLed worker at once, sends SIGTERM to the other, and exits 1.)
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from tests.train.fsdd import prepare_fsdd

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "examples" / "fsdd" / "model"  # the recipe model: dropout, glancing sampler, SpecAugment on
DRIVER = Path(__file__).with_name("fault_driver.py")
SEED = 13
DEADLINE_S = 300  # per process; a healthy one takes 5-30 s on two cores
# 32 utterances in batches of at most 4: 8 steps per epoch in one process, 4 per rank in DDP; a checkpoint
# every 3 steps and at each epoch's end, so kills land between checkpoints and on both sides of an epoch end
SETTINGS = ["--budget", "1GiB", "++dataset_conf.max_batch=4", "++dataset_conf.num_workers=0",
            "++train_conf.log_interval=1000", "++train_conf.save_checkpoint_interval=3",
            "++train_conf.max_epoch=2"]
EPOCHS = 2
GROUPS = {  # the driver's sites for each part of a run
    "step": ["backward-before", "backward-after", "optimizer-before", "optimizer-after"],
    "save": ["save"],
    "validation": ["valid-forward", "valid-decode"],
}
BASE = {"backward-before": "backward", "backward-after": "backward", "optimizer-before": "optimizer",
        "optimizer-after": "optimizer", "save": "save", "valid-forward": "valid-forward",
        "valid-decode": "valid-decode"}
KILLS = {("single", "step"): 3, ("single", "save"): 3, ("single", "validation"): 2,
         ("ddp", "step"): 2, ("ddp", "save"): 2, ("ddp", "validation"): 1}

STATS = []  # one dict per case, printed at the end of each test (pytest -s shows them)


@pytest.fixture(scope="module")
def data(shared_data, tmp_path_factory, fit_cache):
    """32 FSDD recordings of two speakers (train), 8 of a third (valid), prepared by `paratune prepare`."""
    tmp = tmp_path_factory.mktemp("faults")
    return {"train": prepare_fsdd(shared_data, tmp / "train", ("george", "jackson"), 32, MODEL),
            "valid": prepare_fsdd(shared_data, tmp / "valid", ("lucas",), 8, MODEL),
            "cache": fit_cache, "tmp": tmp}


def _command(data, mode: str, out: Path) -> list[str]:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
                if mode == "ddp" else [sys.executable])
    return [*launcher, str(DRIVER), "finetune", "--model", str(MODEL), "--from-scratch", "--train",
            str(data["train"]), "--valid", str(data["valid"]), "--output", str(out), *SETTINGS]


def _descendants(pid: int) -> list[int]:
    """The processes started by pid, and by them, ... (from /proc: Linux)."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            children.setdefault(int(stat.read_text().rsplit(")", 1)[1].split()[1]), []).append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue  # ended meanwhile
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def _run(cmd: list[str], data, **env) -> tuple[int, str]:
    """(exit status, stderr) of cmd with a deadline; on a timeout every process it started is killed."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("PARATUNE_FAULT")}
    env = {**base, "PARATUNE_CACHE": str(data["cache"]), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]), **env}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, err = proc.communicate(timeout=DEADLINE_S)
    except subprocess.TimeoutExpired:  # not reaped yet: its pid and its children are still this run's
        for pid in [*_descendants(proc.pid), proc.pid]:  # torchrun starts each worker in a session of its own
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        _, err = proc.communicate(timeout=60)
        pytest.fail(f"hung: no exit within {DEADLINE_S} s: {' '.join(cmd[-12:])}\n{err[-3000:]}")
    return proc.returncode, err


class References:
    """The uninterrupted run of each mode, once per module, with the calls it made at each site (rank 0)."""

    def __init__(self, data):
        self.data, self.runs = data, {}

    def __call__(self, mode: str) -> dict:
        if mode not in self.runs:
            out = self.data["tmp"] / f"reference-{mode}"
            trace = self.data["tmp"] / f"trace-{mode}"
            code, err = _run(_command(self.data, mode, out), self.data, PARATUNE_FAULT_TRACE=str(trace))
            assert code == 0, err[-4000:]
            calls = [json.loads(x) for x in Path(f"{trace}.rank0").read_text().splitlines()]
            self.runs[mode] = {"out": out, "calls": calls}
        return self.runs[mode]


@pytest.fixture(scope="module")
def references(data):
    return References(data)


def _start(calls: list[dict], out: Path) -> int:
    """Where in the reference's calls a process resuming from out/checkpoint.pt starts: after the save of
    that checkpoint (after its step's optimizer call if the reference never saved that one)."""
    state = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    at = (state["epoch"], state["step"])
    saves = [i for i, c in enumerate(calls) if c["site"] == "save" and (c.get("epoch"), c.get("step")) == at]
    if saves:
        return saves[-1] + 1
    steps = [i for i, c in enumerate(calls) if c["site"] == "optimizer"]
    return steps[at[1] - 1] + 1 if at[1] else 0


def _ledger(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "ledger.jsonl").read_text().splitlines()]


def _tracebacks(err: str) -> int:
    """Tracebacks printed by paratune; torchrun's own report of a failed worker is not one."""
    return sum("ChildFailedError" not in part for part in err.split("Traceback (most recent call last)")[1:])


def _difference(a: dict, b: dict) -> float:
    """The largest absolute difference between two state dicts (inf if their keys differ)."""
    if set(a) != set(b):
        return float("inf")
    return max((float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].is_floating_point()),
               default=0.0)


def _kind(call: dict, site: str) -> str:
    if site != "save":
        return site
    name = call["file"]
    return "final" if name.startswith("final/") else "checkpoint" if name.endswith("/checkpoint.pt") else "kept"


def _kill_points(calls: list[dict], group: str, k: int, rng: random.Random) -> list[tuple[int, str]]:
    """k (reference call, driver site) pairs after the first checkpoint, in the run's order, distinct calls;
    spread over kinds first (each site of the group; for saves: checkpoint.pt, a kept model.epN.pt,
    final/model.pt), then the call of each kind at random."""
    first = next(i for i, c in enumerate(calls) if c["site"] == "save" and c["file"].endswith("/checkpoint.pt"))
    candidates = [(i, site) for i in range(first + 1, len(calls)) for site in GROUPS[group]
                  if calls[i]["site"] == BASE[site]]
    kinds = sorted({_kind(calls[i], site) for i, site in candidates})
    chosen = {}
    for kind in (rng.sample(kinds, k) if k <= len(kinds) else [rng.choice(kinds) for _ in range(k)]):
        free = [(i, site) for i, site in candidates if _kind(calls[i], site) == kind and i not in chosen]
        i, site = rng.choice(free)
        chosen[i] = site
    return sorted(chosen.items())


@pytest.mark.slow
@pytest.mark.parametrize("group", list(GROUPS))
@pytest.mark.parametrize("mode", ["single", "ddp"])
def test_sigkill_then_resume_trains_every_utterance_once_and_the_same_weights(data, references, tmp_path, mode,
                                                                                group):
    ref = references(mode)
    calls = ref["calls"]
    for site in GROUPS[group]:  # the driver's patch points are where the product does the work
        assert any(c["site"] == BASE[site] for c in calls), f"the reference never called the {site} site"
    rng = random.Random(f"{SEED}:{mode}:{group}")
    out, faults = tmp_path / "run", tmp_path / "faults.log"
    cmd = _command(data, mode, out)
    points = _kill_points(calls, group, KILLS[(mode, group)], rng)
    rank_offset, injected, killed_tracebacks, others = rng.randrange(2), [], 0, Counter()
    for k, (at, site) in enumerate(points):
        resume = (out / "checkpoint.pt").exists()
        start = _start(calls, out) if resume else 0
        assert start <= at, f"resumed after the next kill point (reference call {at}): {injected}"
        n = sum(c["site"] == BASE[site] for c in calls[start:at + 1])
        # only rank 0 saves and validates; either rank can die in a step
        rank = (k + rank_offset) % 2 if (mode == "ddp" and group == "step") else 0
        code, err = _run(cmd + (["--resume"] if resume else []), data, PARATUNE_FAULT=f"{site}:{n}",
                         PARATUNE_FAULT_RANK=str(rank), PARATUNE_FAULT_LOG=str(faults))
        fired = faults.read_text().splitlines() if faults.exists() else []
        assert len(fired) == k + 1 and fired[-1] == f"{site} {n} rank {rank}", \
            f"the fault {site}:{n} on rank {rank} did not fire (exit {code}):\n{err[-3000:]}"
        assert code != 0, err[-3000:]
        where = calls[at].get("file", "") + (f" (epoch {calls[at]['epoch']}, step {calls[at]['step']})"
                                             if "step" in calls[at] else "")
        injected.append(f"{site}:{n} rank {rank} from {'checkpoint' if resume else 'start'} "
                        f"[reference call {at} of {len(calls)}{' ' + where if where else ''}]")
        killed_tracebacks += _tracebacks(err)
        if mode == "ddp":  # how the other rank ended, from torchrun's report of each worker
            others.update(x.split(":", 1)[1].split("(")[0].strip() for x in err.splitlines()
                          if x.strip().startswith("exitcode") and "SIGKILL" not in x)

    code, err = _run(cmd + ["--resume"], data)  # no fault armed: the run completes
    resume_tracebacks = _tracebacks(err)
    assert code == 0, err[-4000:]

    keys = Counter(json.loads(x)["key"] for x in data["train"].read_text().splitlines())
    ledger = _ledger(out)
    lost = repeated = 0
    for epoch in range(EPOCHS):
        seen = Counter(r["key"] for r in ledger if r["epoch"] == epoch)
        lost += sum((keys - seen).values())
        repeated += sum((seen - keys).values())
    mine = torch.load(out / "checkpoint.pt", weights_only=True)
    theirs = torch.load(ref["out"] / "checkpoint.pt", weights_only=True)
    kept = sorted(p.name for p in ref["out"].glob("model.*.pt"))
    differences = {"final/model.pt": _difference(torch.load(ref["out"] / "final" / "model.pt", weights_only=True),
                                                 torch.load(out / "final" / "model.pt", weights_only=True)),
                   "checkpoint.pt": _difference(theirs["model"], mine["model"])}
    for name in kept:
        differences[name] = (_difference(torch.load(ref["out"] / name, weights_only=True),
                                         torch.load(out / name, weights_only=True))
                             if (out / name).exists() else float("inf"))
    STATS.append({"case": f"{mode}/{group}", "faults": injected, "lost": lost, "repeated": repeated,
                  "tracebacks": {"killed runs": killed_tracebacks, "resume": resume_tracebacks},
                  "the other rank exited": dict(others), "weight differences": differences})
    print(json.dumps(STATS[-1]))

    # (1) every utterance exactly once per epoch, trained; the same ledger as the uninterrupted run
    assert {r["status"] for r in ledger} == {"trained"}
    assert lost == repeated == 0, f"{lost} utterance-epochs lost, {repeated} repeated; faults: {injected}"
    assert ledger == _ledger(ref["out"])
    # (2) the weights of the uninterrupted run: exported, kept by validation, and the last checkpoint's
    # (within 1e-6, as the other resume tests; on this CPU they are bit-identical)
    assert (mine["epoch"], mine["step"]) == (theirs["epoch"], theirs["step"])
    assert sorted(p.name for p in out.glob("model.*.pt")) == kept
    assert max(differences.values()) <= 1e-6, f"weights differ from the uninterrupted run's: {differences}"
    # (3) a clean resume: no traceback, nothing left of an interrupted save (removed at the next start)
    assert "Traceback" not in err, err[-4000:]
    leftovers = sorted(str(p.relative_to(out)) for p in out.rglob("*.tmp"))
    assert not leftovers, f"temp files of interrupted saves left in the run folder: {leftovers}"


@pytest.mark.slow
def test_sigkill_before_the_first_checkpoint_then_resume_refuses_and_overwrite_starts_over(data, references,
                                                                                          tmp_path):
    """Killed before any checkpoint (in a step, then in the first checkpoint's save): `--resume` has nothing
    to resume and says so, a fresh run into the folder refuses without `--overwrite`, and `--overwrite`
    trains the run as if nothing had happened; the torn save's temp file is removed."""
    ref = references("single")
    calls = ref["calls"]
    first = next(i for i, c in enumerate(calls) if c["site"] == "save" and c["file"].endswith("/checkpoint.pt"))
    rng = random.Random(f"{SEED}:before-first-checkpoint")
    at, site = rng.choice([(i, s) for i in range(first) for s in GROUPS["step"] if calls[i]["site"] == BASE[s]])
    n = sum(c["site"] == BASE[site] for c in calls[:at + 1])
    out, faults = tmp_path / "run", tmp_path / "faults.log"
    cmd = _command(data, "single", out)
    tracebacks = 0
    for fresh, fault in ((cmd, f"{site}:{n}"), (cmd + ["--overwrite"], "save:1")):
        code, err = _run(fresh, data, PARATUNE_FAULT=fault, PARATUNE_FAULT_LOG=str(faults))
        assert code != 0 and faults.read_text().splitlines()[-1] == f"{fault.replace(':', ' ')} rank 0", err[-3000:]
        tracebacks += _tracebacks(err)
        assert not (out / "checkpoint.pt").exists()
        assert fault != "save:1" or list(out.glob(".checkpoint.pt.*.tmp"))  # the torn first save
        ledger = (out / "ledger.jsonl").read_bytes() if (out / "ledger.jsonl").exists() else None
        code, err = _run(cmd + ["--resume"], data)
        assert code != 0 and "nothing to resume" in err and "Traceback" not in err, err[-3000:]
        code, err = _run(cmd, data)
        assert code != 0 and "--overwrite" in err and "Traceback" not in err, err[-3000:]
        assert ((out / "ledger.jsonl").read_bytes() if (out / "ledger.jsonl").exists() else None) == ledger
    code, err = _run(cmd + ["--overwrite"], data)
    assert code == 0 and "Traceback" not in err, err[-4000:]
    print(json.dumps({"case": "single/before the first checkpoint", "faults": [f"{site}:{n}", "save:1"],
                      "tracebacks (killed runs)": tracebacks}))
    assert _ledger(out) == _ledger(ref["out"])
    assert _difference(torch.load(ref["out"] / "final" / "model.pt", weights_only=True),
                       torch.load(out / "final" / "model.pt", weights_only=True)) <= 1e-6
    assert not list(out.rglob("*.tmp"))
