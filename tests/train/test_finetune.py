"""`paratune finetune` end to end on real digits: injected OOMs, the ledger, resume, FunASR export."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from paratune.cli import main
from paratune.train.config import ConfigError, load_config
from tests.train.fsdd import prepare_fsdd

ROOT = Path(__file__).resolve().parents[2]
RECIPE_MODEL = ROOT / "examples" / "fsdd" / "model"


@pytest.fixture(scope="module")
def digits(shared_data, tmp_path_factory):
    """200 FSDD recordings prepared by `paratune prepare` (train) and 40 of another speaker (valid)."""
    tmp = tmp_path_factory.mktemp("fsdd")
    return {split: prepare_fsdd(shared_data, tmp / split, speakers, n, RECIPE_MODEL)
            for split, speakers, n in (("train", ("george", "jackson"), 100), ("valid", ("lucas",), 40))}


def _ledger(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.mark.slow
def test_100_injected_ooms_lose_no_sample(digits, tmp_path, capsys, monkeypatch):
    exp = tmp_path / "exp"
    keys = [json.loads(x)["key"] for x in digits["train"].read_text().splitlines()]
    code = main(["finetune", "--model", str(RECIPE_MODEL), "--from-scratch", "--train", str(digits["train"]),
                 "--valid", str(digits["valid"]), "--output", str(exp), "--budget", "1GiB",
                 "--inject-oom", ",".join(str(s) for s in range(1, 101)),
                 "++train_conf.max_epoch=4", "++dataset_conf.max_batch=4", "++dataset_conf.num_workers=0",
                 "++train_conf.log_interval=1000"])
    err = capsys.readouterr().err
    assert code == 0, err[-3000:]
    assert err.count("injected out of memory") == 100
    ledger = _ledger(exp / "ledger.jsonl")
    for epoch in range(4):
        rows = [r for r in ledger if r["epoch"] == epoch]
        assert sorted(r["key"] for r in rows) == sorted(keys)  # every utterance exactly once per epoch
        assert {r["status"] for r in rows} == {"trained"}
    assert max(r["step"] for r in ledger) == 100  # 25 batches of 4 per epoch: every step had an OOM
    assert err.count("in forward (--inject-oom)") == err.count("in backward (--inject-oom)") == 50
    csv_rows = (exp / "memory.csv").read_text().splitlines()
    assert csv_rows[0].startswith("step,epoch,batch,frames,tokens,predicted,peak")
    assert (exp / "memory.png").exists() and (exp / "final" / "model.pt").exists()


@pytest.mark.slow
@pytest.mark.parametrize("levers", [[], ["--optimizer-state", "8bit", "--checkpointing", "2/1"]],
                         ids=["plain", "8bit-partial-checkpointing"])
def test_resume_continues_where_the_checkpoint_was(digits, tmp_path, capsys, monkeypatch, levers):
    common = ["--model", str(RECIPE_MODEL), "--from-scratch", "--train", str(digits["train"]), "--budget", "1GiB",
              *levers]
    settings = ["++dataset_conf.max_batch=8", "++dataset_conf.num_workers=0", "++train_conf.log_interval=1000",
                "++train_conf.save_checkpoint_interval=10"]
    full = tmp_path / "full"
    assert main(["finetune", *common, "--output", str(full), *settings, "++train_conf.max_epoch=2"]) == 0
    part = tmp_path / "part"
    # the same run stopped after its first epoch (as a crash would leave it), then resumed for the second
    assert main(["finetune", *common, "--output", str(part), *settings, "++train_conf.max_epoch=1"]) == 0
    assert main(["finetune", *common, "--output", str(part), "--resume", *settings, "++train_conf.max_epoch=2"]) == 0
    import torch
    a = torch.load(full / "final" / "model.pt", weights_only=True)
    b = torch.load(part / "final" / "model.pt", weights_only=True)
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a)
    assert _ledger(full / "ledger.jsonl") == _ledger(part / "ledger.jsonl")
    if levers:  # the levers forced are the levers trained with
        assert "checkpointing 2/1 blocks, optimizer adamw8bit" in capsys.readouterr().err
    capsys.readouterr()


def test_out_of_memory_where_a_split_cannot_help_stops_with_one_line(digits, tmp_path, capsys, monkeypatch):
    """Issue 25, defect 4: out of memory in the optimizer step (AdamW's state, clipping) ends the run with
    one line, exit status 2 and the last checkpoint intact, not a traceback."""
    import torch

    from paratune.train import finetune as finetune_module
    real = finetune_module.prepare_model

    def prepare_model(*args, **kwargs):  # the trainer's optimizer fails at its third step
        ready, steps = real(*args, **kwargs), []

        def no_room(*_):
            steps.append(True)
            if len(steps) == 3:
                raise RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`")
        ready.optimizer.register_step_pre_hook(no_room)
        return ready
    monkeypatch.setattr(finetune_module, "prepare_model", prepare_model)
    exp = tmp_path / "exp"
    code = main(["finetune", "--model", str(RECIPE_MODEL), "--from-scratch", "--train", str(digits["train"]),
                 "--output", str(exp), "--budget", "1GiB", "++dataset_conf.max_batch=8",
                 "++dataset_conf.num_workers=0", "++train_conf.save_checkpoint_interval=1"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: out of memory in the optimizer step") and "CUBLAS_STATUS_ALLOC_FAILED" in last
    assert torch.load(exp / "checkpoint.pt", weights_only=True)["step"] == 2


@pytest.mark.reference
@pytest.mark.slow
def test_final_directory_loads_in_funasr(digits, tmp_path, capsys, monkeypatch, funasr):
    exp = tmp_path / "exp"
    assert main(["finetune", "--model", str(RECIPE_MODEL), "--from-scratch", "--train", str(digits["train"]),
                 "--output", str(exp), "--budget", "1GiB", "++train_conf.max_epoch=2", "++dataset_conf.max_batch=8",
                 "++dataset_conf.num_workers=0"]) == 0
    from funasr import AutoModel

    from paratune.modeldir import load_model
    rows = [json.loads(x) for x in digits["valid"].read_text().splitlines()][:8]
    ours = load_model(exp / "final").transcribe_files([r["source"] for r in rows])
    capsys.readouterr()
    ref = AutoModel(model=str(exp / "final"), disable_update=True, device="cpu")
    theirs = [ref.generate(input=r["source"])[0]["text"] for r in rows]
    capsys.readouterr()
    assert [t.replace(" ", "") for t in theirs] == [o.replace(" ", "") for o in ours]


def test_overrides_follow_funasr(tmp_path):
    config = load_config({"train_conf": {"max_epoch": 50}}, None, ["++train_conf.max_epoch=1",
                                                                    "++optim_conf.lr=0.001"])
    assert config["train_conf"]["max_epoch"] == 1 and config["optim_conf"]["lr"] == 0.001
    with pytest.raises(ConfigError, match="unknown key 'max_epochs'"):
        load_config({}, None, ["++train_conf.max_epochs=1"])
    with pytest.raises(ConfigError, match="expected \\+\\+section.key=value"):
        load_config({}, None, ["train_conf.max_epoch=1"])
    bad = tmp_path / "c.yaml"
    bad.write_text("trian_conf: {max_epoch: 1}\n")
    with pytest.raises(ConfigError, match="unknown section"):
        load_config({}, bad, [])


@pytest.mark.slow
def test_resume_after_sigkill_mid_epoch(digits, tmp_path, monkeypatch):
    import os
    import signal
    import subprocess
    import sys
    import time

    import torch
    args = ["--model", str(RECIPE_MODEL), "--from-scratch", "--train", str(digits["train"]), "--budget", "1GiB",
            "++dataset_conf.max_batch=8", "++dataset_conf.num_workers=1", "++train_conf.log_interval=1000",
            "++train_conf.save_checkpoint_interval=5", "++train_conf.max_epoch=3"]
    env = dict(os.environ)
    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run([sys.executable, "-m", "paratune", "finetune", "--output", str(full), *args], env=env, check=True,
                   cwd=ROOT, capture_output=True)
    proc = subprocess.Popen([sys.executable, "-m", "paratune", "finetune", "--output", str(killed), *args], env=env,
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "checkpoint.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    state = torch.load(killed / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 0 and 0 < state["sampler"]["position"] < 13  # killed in the middle of epoch 0
    subprocess.run([sys.executable, "-m", "paratune", "finetune", "--output", str(killed), "--resume", *args],
                   env=env, check=True, cwd=ROOT, capture_output=True)
    a = torch.load(full / "final" / "model.pt", weights_only=True)
    b = torch.load(killed / "final" / "model.pt", weights_only=True)
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a)
    assert _ledger(full / "ledger.jsonl") == _ledger(killed / "ledger.jsonl")


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_torchrun_two_ranks_split_the_epoch_and_ooms_in_lockstep(digits, tmp_path, fsdp):
    import os
    import subprocess
    import sys
    exp = tmp_path / "exp"
    env = dict(os.environ)
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "paratune",
                          "finetune", "--model", str(RECIPE_MODEL), "--from-scratch", "--train", str(digits["train"]),
                          "--output", str(exp), "--budget", "1GiB", "--inject-oom", "2,3,9",
                          *(["--fsdp", "--valid", str(digits["valid"])] if fsdp else []),
                          "++dataset_conf.max_batch=8", "++dataset_conf.num_workers=0", "++train_conf.max_epoch=2"],
                         env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    keys = sorted(json.loads(x)["key"] for x in digits["train"].read_text().splitlines())
    ledger = _ledger(exp / "ledger.jsonl")
    for epoch in range(2):
        assert sorted(r["key"] for r in ledger if r["epoch"] == epoch) == keys
    for rank in (0, 1):  # both ranks split at each injected step
        assert out.stderr.count(f"[rank {rank}] step 2: injected out of memory") == 1
        assert out.stderr.count(f"[rank {rank}] step 9: injected out of memory") == 1
    assert (exp / "final" / "model.pt").exists() and (exp / "rank1" / "memory.csv").exists()


@pytest.mark.slow
def test_lora_trains_adapters_and_exports_a_plain_model(digits, tmp_path, capsys, monkeypatch):
    import torch

    from paratune.modeldir import load_model
    base = tmp_path / "base"
    assert main(["finetune", "--model", str(RECIPE_MODEL), "--from-scratch", "--train", str(digits["train"]),
                 "--output", str(base), "--budget", "1GiB", "++train_conf.max_epoch=1", "++dataset_conf.max_batch=8",
                 "++dataset_conf.num_workers=0"]) == 0
    exp = tmp_path / "lora"
    assert main(["finetune", "--model", str(base / "final"), "--train", str(digits["train"]), "--output", str(exp),
                 "--budget", "1GiB", "++train_conf.max_epoch=1", "++dataset_conf.max_batch=8",
                 "++dataset_conf.num_workers=0", "++lora.r=4"]) == 0
    err = capsys.readouterr().err
    assert "LoRA rank 4" in err
    before = torch.load(base / "final" / "model.pt", weights_only=True)
    after = torch.load(exp / "final" / "model.pt", weights_only=True)
    assert set(before) == set(after)  # the adapters are merged: the same keys as the base model
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith(("linear_q_k_v.weight", "linear_q.weight", "linear_k_v.weight",
                                       "linear_out.weight", "w_1.weight", "w_2.weight")) for k in changed)
    load_model(exp / "final")  # loads as a plain Paraformer directory


@pytest.mark.slow
def test_speed_perturbation_is_planned_for(digits, tmp_path, capsys, monkeypatch):
    """Speed 0.8 makes an utterance 25 % longer after planning: the sampler must plan the longer version,
    so no step's real shape is predicted over the budget."""
    exp = tmp_path / "exp"
    code = main(["finetune", "--model", str(RECIPE_MODEL), "--from-scratch", "--train", str(digits["train"]),
                 "--output", str(exp), "--budget", "30MiB", "++train_conf.max_epoch=1",
                 "++dataset_conf.speed_perturb=[0.8]", "++dataset_conf.max_batch=null",
                 "++dataset_conf.num_workers=0", "++memory.cpu_track_every=1"])
    assert code == 0, capsys.readouterr().err[-3000:]
    rows = (exp / "memory.csv").read_text().splitlines()[1:]
    predicted = [int(r.split(",")[5]) for r in rows]
    measured = [int(r.split(",")[6]) for r in rows]
    budget = 30 * 2**20
    assert max(predicted) <= budget and max(measured) <= 1.02 * budget
    assert len(rows) >= 2
    assert max(predicted) > 0.6 * budget  # the batches were packed up to the budget, not far below it
