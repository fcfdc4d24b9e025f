"""`paratune plan --json` lists exactly the batches `paratune finetune` trains in epoch 0, in order, per
rank: the same planning entry (paratune.memory.plan.plan_run), configuration and seed on both sides."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from paratune.cli import main
from paratune.train.finetune import Finetune, FinetuneOptions
from tests.train.fsdd import prepare_fsdd

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "examples" / "fsdd" / "model"
BUDGET = "30MiB"  # small enough that batches are packed by memory, several per epoch


@pytest.fixture(scope="module")
def train(shared_data, tmp_path_factory):
    """80 FSDD recordings of two speakers, prepared by `paratune prepare`."""
    return prepare_fsdd(shared_data, tmp_path_factory.mktemp("plan_is_trained"), ("george", "lucas"), 80, MODEL)


def planned(capsys, train, overrides, world=1, fsdp=False) -> dict:
    code = main(["plan", "--model", str(MODEL), "--data", str(train), "--budget", BUDGET, "--device", "cpu",
                 "--json", "--png", "", "--world-size", str(world), *(["--fsdp"] if fsdp else []), *overrides])
    out = capsys.readouterr().out
    assert code == 0, out
    steps = defaultdict(list)
    for b in json.loads(out)["batches"]:
        steps[(b["rank"], b["step"])] += b["keys"]
    return dict(steps)


def trained(exp: Path) -> dict:
    steps = defaultdict(list)
    for line in (exp / "ledger.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["epoch"] == 0 and row["status"] == "trained":
            steps[(row.get("rank", 0), row["step"])].append(row["key"])
    return dict(steps)


COMMON = ["++train_conf.max_epoch=1", "++dataset_conf.max_batch=null", "++dataset_conf.num_workers=0"]


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [[], ["++dataset_conf.speed_perturb=[0.9,1.0,1.1]"], ["++train_conf.accum_grad=2"]],
                         ids=["plain", "speed-perturb", "accum-2"])
def test_the_plan_is_what_one_process_trains(capsys, train, tmp_path, monkeypatch, overrides):
    plan = planned(capsys, train, COMMON + overrides)
    exp = tmp_path / "exp"
    # the recipe called directly, as `paratune demo` calls it
    code = Finetune(FinetuneOptions(model=MODEL, train=[train], output=exp, budget=30 * 2**20, device="cpu",
                                    from_scratch=True, overrides=COMMON + overrides)).run()
    assert code == 0
    assert trained(exp) == plan
    assert len(plan) >= 2  # several steps: the comparison says something


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_the_plan_is_what_each_rank_trains(capsys, train, tmp_path, fsdp):
    env = dict(os.environ)
    plan = planned(capsys, train, COMMON, world=2, fsdp=fsdp)
    exp = tmp_path / "exp"
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "paratune",
                          "finetune", "--model", str(MODEL), "--from-scratch", "--train", str(train), "--output",
                          str(exp), "--budget", BUDGET, "--device", "cpu", *(["--fsdp"] if fsdp else []), *COMMON],
                         env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert trained(exp) == plan
    assert {rank for rank, _ in plan} == {0, 1}
