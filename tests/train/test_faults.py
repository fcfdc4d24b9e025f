"""The fault matrix: SIGKILL during a step, a save and validation, in one process and in 2-rank DDP, then
`--resume` until the run completes. Every utterance is trained exactly once per epoch, and the weights are
those of an uninterrupted run (CPU).

Each case runs `paratune finetune` through tests/train/fault_driver.py, which wraps one function of the
product and SIGKILLs its own process at the function's Nth call (no hook in the product). The kill points
are drawn, with a seeded generator (SEED), from the calls an uninterrupted reference run of the same
command made (the driver traces them): only points after the first checkpoint (before it there is nothing
to resume), distinct, and injected in the run's order (each kill later than the one before). After a kill the next
process resumes from whatever checkpoint.pt the killed one left; the kill's N counts that process's calls
from the checkpoint it resumes from.

Every subprocess has a deadline and runs in its own session, killed whole on a timeout: a rank blocked on
a collective with a dead peer fails the test instead of hanging it. (torchrun's agent notices the
SIGKILLed worker within a second and sends SIGTERM to the others, then exits 1.)
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
def data(shared_data, tmp_path_factory):
    """32 FSDD recordings of two speakers (train), 8 of a third (valid), prepared by `paratune prepare`."""
    tmp = tmp_path_factory.mktemp("faults")
    return {"train": prepare_fsdd(shared_data, tmp / "train", ("george", "jackson"), 32, MODEL),
            "valid": prepare_fsdd(shared_data, tmp / "valid", ("lucas",), 8, MODEL),
            "cache": tmp / "cache", "tmp": tmp}


def _command(data, mode: str, out: Path) -> list[str]:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
                if mode == "ddp" else [sys.executable])
    return [*launcher, str(DRIVER), "finetune", "--model", str(MODEL), "--from-scratch", "--train",
            str(data["train"]), "--valid", str(data["valid"]), "--output", str(out), *SETTINGS]


def _run(cmd: list[str], data, **env) -> tuple[int, str]:
    """(exit status, stderr) of cmd with a deadline; on a timeout every process it started is killed."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("PARATUNE_FAULT")}
    env = {**base, "PARATUNE_CACHE": str(data["cache"]), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]), **env}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, err = proc.communicate(timeout=DEADLINE_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        pytest.fail(f"hung: no exit within {DEADLINE_S} s: {' '.join(cmd[-12:])}\n{err[-3000:]}")
    finally:
        try:  # a worker torchrun left behind would hold the next run's files
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
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
    return err.count("Traceback (most recent call last)") - err.count("ChildFailedError")


def _weights_equal(a: dict, b: dict, what: str) -> float:
    assert set(a) == set(b), what
    worst = max((float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].is_floating_point()),
                default=0.0)
    assert all(torch.allclose(a[k].double(), b[k].double(), rtol=0, atol=1e-6) for k in a), \
        f"{what}: differs from the uninterrupted run by up to {worst:g}"
    return worst


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
    first = next(i for i, c in enumerate(calls) if c["site"] == "save" and c["file"].endswith("/checkpoint.pt"))
    # the kill points: distinct calls of the group's sites after the first checkpoint, in the run's order
    points = sorted(rng.sample([i for i in range(first + 1, len(calls))
                                if calls[i]["site"] in {BASE[s] for s in GROUPS[group]}], KILLS[(mode, group)]))
    rank_offset, injected, killed_tracebacks, survivors = rng.randrange(2), [], 0, Counter()
    for k, at in enumerate(points):
        resume = (out / "checkpoint.pt").exists()
        start = _start(calls, out) if resume else 0
        assert start <= at, f"resumed after the next kill point: {injected}"
        site = rng.choice([s for s in GROUPS[group] if BASE[s] == calls[at]["site"]])
        n = sum(c["site"] == BASE[site] for c in calls[start:at + 1])
        # only rank 0 saves and validates; either rank can die in a step
        rank = (k + rank_offset) % 2 if (mode == "ddp" and group == "step") else 0
        code, err = _run(cmd + (["--resume"] if resume else []), data, PARATUNE_FAULT=f"{site}:{n}",
                         PARATUNE_FAULT_RANK=str(rank), PARATUNE_FAULT_LOG=str(faults))
        fired = faults.read_text().splitlines() if faults.exists() else []
        assert len(fired) == k + 1 and fired[-1] == f"{site} {n} rank {rank}", \
            f"the fault {site}:{n} on rank {rank} did not fire (exit {code}):\n{err[-3000:]}"
        assert code != 0, err[-3000:]
        point = calls[at].get("file", "") + (f" (epoch {calls[at]['epoch']}, step {calls[at]['step']})"
                                             if "step" in calls[at] else "")
        injected.append(f"{site}:{n} rank {rank} from {'checkpoint' if resume else 'start'} "
                        f"[reference call {at} of {len(calls)}{' ' + point if point else ''}]")
        killed_tracebacks += _tracebacks(err)
        if mode == "ddp":  # how the other rank ended: torchrun's report of each worker
            survivors.update(x.split("(")[0].strip() for x in err.splitlines() if x.strip().startswith("exitcode"))
    assert len(injected) == KILLS[(mode, group)], injected

    code, err = _run(cmd + ["--resume"], data)  # no fault armed: the run completes
    resume_tracebacks = _tracebacks(err)
    assert code == 0, err[-4000:]
    assert "Traceback" not in err, err[-4000:]

    # (1) every utterance exactly once per epoch, trained; the same ledger as the uninterrupted run
    keys = Counter(json.loads(x)["key"] for x in data["train"].read_text().splitlines())
    ledger = _ledger(out)
    lost = repeated = 0
    for epoch in range(EPOCHS):
        seen = Counter(r["key"] for r in ledger if r["epoch"] == epoch)
        lost += sum((keys - seen).values())
        repeated += sum((seen - keys).values())
    assert {r["status"] for r in ledger} == {"trained"}
    assert lost == repeated == 0, f"{lost} utterance-epochs lost, {repeated} repeated; faults: {injected}"
    assert ledger == _ledger(ref["out"])
    # (2) the weights of the uninterrupted run: exported, kept by validation, and the last checkpoint's
    worst = _weights_equal(torch.load(ref["out"] / "final" / "model.pt", weights_only=True),
                           torch.load(out / "final" / "model.pt", weights_only=True), "final/model.pt")
    mine = torch.load(out / "checkpoint.pt", weights_only=True)
    theirs = torch.load(ref["out"] / "checkpoint.pt", weights_only=True)
    _weights_equal(theirs["model"], mine["model"], "checkpoint.pt")
    assert (mine["epoch"], mine["step"]) == (theirs["epoch"], theirs["step"])
    kept = sorted(p.name for p in ref["out"].glob("model.*.pt"))
    assert sorted(p.name for p in out.glob("model.*.pt")) == kept
    for name in kept:
        _weights_equal(torch.load(ref["out"] / name, weights_only=True), torch.load(out / name, weights_only=True),
                       name)
    STATS.append({"case": f"{mode}/{group}", "faults": injected, "lost": lost, "repeated": repeated, "tracebacks (killed runs)": killed_tracebacks,
                  "tracebacks (resumes)": resume_tracebacks, "other rank's end": dict(survivors),
                  "max weight difference": worst})
    print(json.dumps(STATS[-1]))
    # (3) nothing left of an interrupted save: temp files are removed at the next start
    leftovers = sorted(str(p.relative_to(out)) for p in out.rglob("*.tmp"))
    assert not leftovers, f"temp files of interrupted saves left in the run folder: {leftovers}"
