"""The run folder (issue 13): kept-model names, --resume/--overwrite, interrupts, leftovers, disk and
checkpoint failures. Tiny runs: 24 FSDD digits in 6 batches of 4, a few seconds each once the memory fit
is cached (the session's fit cache)."""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from paratune.cli import main
from paratune.train import checkpoint, run_folder
from paratune.train.finetune import Finetune
from tests.train.fsdd import prepare_fsdd

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "examples" / "fsdd" / "model"


@pytest.fixture(scope="module")
def data(shared_data, tmp_path_factory, fit_cache):
    tmp = tmp_path_factory.mktemp("run_folder")
    return {"train": prepare_fsdd(shared_data, tmp / "train", ("george",), 24, MODEL),
            "valid": prepare_fsdd(shared_data, tmp / "valid", ("lucas",), 8, MODEL), "cache": fit_cache}


def args(data, out, *extra, epochs=2, valid=True, workers=0) -> list[str]:
    return ["finetune", "--model", str(MODEL), "--from-scratch", "--train", str(data["train"]),
            *(["--valid", str(data["valid"])] if valid else []), "--output", str(out), "--budget", "1GiB", *extra,
            f"++train_conf.max_epoch={epochs}", "++dataset_conf.max_batch=4", f"++dataset_conf.num_workers={workers}"]


def finetune(data, out, *extra, **kw) -> int:
    return main(args(data, out, *extra, **kw))


def ledger(out) -> list[dict]:
    return [json.loads(x) for x in (Path(out) / "ledger.jsonl").read_text().splitlines()]


def weights(out) -> dict:
    return torch.load(Path(out) / "final" / "model.pt", weights_only=True)


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a)


@pytest.fixture
def no_loading(monkeypatch):
    """Set-up's folder checks must come before the data, the fit and the model: reaching them fails."""
    def loaded(self):
        raise AssertionError("the data was loaded before the run folder was checked")
    monkeypatch.setattr(Finetune, "_load_data", loaded)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """An uninterrupted 2-epoch run with validation."""
    out = tmp_path_factory.mktemp("reference") / "exp"
    assert finetune(data, out) == 0
    return out


def signal_at(monkeypatch, step: int, signum: int) -> None:
    """This process sends itself `signum` right after training step `step` (before its boundary)."""
    real = Finetune.train_step

    def train_step(self, group, n_batches):
        real(self, group, n_batches)
        if self.step == step:
            os.kill(os.getpid(), signum)
    monkeypatch.setattr(Finetune, "train_step", train_step)


# -- defect 2: kept-model paths from checkpoints
def test_kept_models_are_file_names_and_a_moved_folder_resumes(data, tmp_path, monkeypatch, capsys):
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    monkeypatch.chdir(first)
    assert finetune(data, Path("exp"), "++train_conf.keep_nbest_models=1", epochs=1) == 0
    state = torch.load(first / "exp" / "checkpoint.pt", weights_only=True)
    assert state["best"] == [[state["best"][0][0], "model.ep0.pt"]]  # not exp/model.ep0.pt
    shutil.copytree(first / "exp", second / "copy")
    monkeypatch.chdir(second)
    assert finetune(data, Path("copy"), "--resume", "++train_conf.keep_nbest_models=1", epochs=3) == 0
    assert (first / "exp" / "model.ep0.pt").exists()  # the original run is untouched
    assert len(list((second / "copy").glob("model.*.pt"))) == 1  # keep_nbest_models=1, in the copy
    capsys.readouterr()


def _rewrite_best(path: Path, best) -> None:
    state = torch.load(path, weights_only=True)
    state["best"] = best
    torch.save(state, path)


def test_a_crafted_checkpoint_deletes_nothing(data, tmp_path, capsys):
    out, victim = tmp_path / "exp", tmp_path / "victim.txt"
    victim.write_text("precious")
    assert finetune(data, out, "++train_conf.keep_nbest_models=1", epochs=1) == 0
    _rewrite_best(out / "checkpoint.pt", [[0.1, str(out / "model.ep0.pt")], [0.9, str(victim)]])
    capsys.readouterr()
    assert finetune(data, out, "--resume", "++train_conf.keep_nbest_models=1", epochs=2) == 2
    err = capsys.readouterr().err
    assert f"error: {out / 'checkpoint.pt'}: kept model" in err and "Traceback" not in err
    assert victim.read_text() == "precious"


def test_only_a_kept_model_the_folder_holds_by_name_is_removed(tmp_path):
    """The second line of defence behind `checkpoint.kept_name`: a name that is not a kept model's, one
    that leads out of the folder, or a link in it, is left alone with a warning."""
    out, outside = tmp_path / "exp", tmp_path / "model.ep1.pt"
    out.mkdir()
    outside.write_text("outside")
    (out / "model.ep1.pt").symlink_to(outside)
    (out / "notes.txt").write_text("mine")
    (out / "model.ep2.pt").write_text("kept")
    warnings = []
    for name in ("model.ep1.pt", "notes.txt", "../model.ep1.pt"):
        run_folder.remove_kept(out, name, warnings.append)
    assert len(warnings) == 3 and all(w.startswith("warning: not removing") for w in warnings)
    assert (out / "model.ep1.pt").is_symlink() and outside.read_text() == "outside" and (out / "notes.txt").exists()
    run_folder.remove_kept(out, "model.ep2.pt", warnings.append)
    assert not (out / "model.ep2.pt").exists() and len(warnings) == 3


def test_old_checkpoint_paths_map_to_names_in_the_folder(tmp_path):
    ckpt = tmp_path / "checkpoint.pt"
    assert checkpoint.kept_name("exp/run1/model.ep3.pt", ckpt) == "model.ep3.pt"
    assert checkpoint.kept_name("/abs/where/model.ep3.step500.pt", ckpt) == "model.ep3.step500.pt"
    for bad in ("/etc/passwd", "../x.pt", "model.ep3.pt/..", "", "model.ep3.ptx"):
        with pytest.raises(checkpoint.CheckpointError, match="checkpoint.pt"):
            checkpoint.kept_name(bad, ckpt)


# -- defect 3: --resume with nothing to resume, a fresh run into a used folder
def test_resume_with_nothing_to_resume_refuses(data, tmp_path, capsys, no_loading):
    assert finetune(data, tmp_path / "empty", "--resume") == 2
    assert "nothing to resume" in capsys.readouterr().err
    (tmp_path / "started").mkdir()
    (tmp_path / "started" / "ledger.jsonl").write_text('{"epoch": 0, "key": "a", "step": 1, "status": "trained"}\n')
    assert finetune(data, tmp_path / "started", "--resume") == 2
    assert "--overwrite" in capsys.readouterr().err


def test_a_fresh_run_refuses_a_used_folder_unless_overwrite(data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "exp"
    assert finetune(data, out, epochs=1, valid=False) == 0
    other = tmp_path / "other.pt"
    other.write_bytes(b"not ours")
    (out / "notes.txt").write_text("mine")
    real = Finetune._load_data
    monkeypatch.setattr(Finetune, "_load_data", lambda self: pytest.fail("loaded before the folder check"))
    capsys.readouterr()
    assert finetune(data, out, epochs=1, valid=False) == 2
    assert "holds a run" in capsys.readouterr().err
    monkeypatch.setattr(Finetune, "_load_data", real)
    assert finetune(data, out, "--overwrite", epochs=1, valid=False) == 0
    keys = sorted(json.loads(x)["key"] for x in data["train"].read_text().splitlines())
    assert sorted(r["key"] for r in ledger(out)) == keys  # once: the old ledger is gone
    steps = [int(line.split(",")[0]) for line in (out / "memory.csv").read_text().splitlines()[1:]]
    assert steps == sorted(set(steps))
    assert (out / "notes.txt").read_text() == "mine" and other.read_bytes() == b"not ours"
    capsys.readouterr()


# -- defect 4: resuming without --valid after a run with validation
def test_resume_without_valid_after_validation_refuses(data, tmp_path, capsys):
    out = tmp_path / "exp"
    assert finetune(data, out, epochs=1) == 0
    capsys.readouterr()
    assert finetune(data, out, "--resume", epochs=2, valid=False) == 2
    err = capsys.readouterr().err
    assert "give --valid again" in err
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 1  # nothing trained, nothing exported


# -- defects 7 and 11: interrupts, and the resume after one (default log_interval and cpu_track_every)
@pytest.mark.parametrize("signum,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["term", "int"])
def test_a_signal_saves_at_the_step_boundary_and_resume_loses_nothing(data, reference, tmp_path, capsys, monkeypatch,
                                                                      signum, code):
    out = tmp_path / "exp"
    with monkeypatch.context() as mp:
        signal_at(mp, 4, signum)
        assert finetune(data, out) == code
    err = capsys.readouterr().err
    assert "interrupted at epoch 0 step 4" in err and "--resume" in err
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert (state["epoch"], state["step"], state["sampler"]["position"]) == (0, 4, 4)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
    assert finetune(data, out, "--resume") == 0  # steps 5 and 6 untracked, step 6 logged: no IndexError
    assert ledger(out) == ledger(reference)
    assert same(weights(out), weights(reference))
    capsys.readouterr()


def test_a_second_ctrl_c_stops_at_once(data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "exp"
    real = Finetune.train_step

    def train_step(self, group, n_batches):
        real(self, group, n_batches)
        if self.step == 2:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
    monkeypatch.setattr(Finetune, "train_step", train_step)
    assert finetune(data, out, valid=False) == 130
    err = capsys.readouterr().err
    assert "stopped at once at epoch 0 step 2" in err and "Traceback" not in err
    assert not (out / "checkpoint.pt").exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.slow
def test_ctrl_c_on_the_terminal_saves_and_workers_print_no_traceback(data, tmp_path):
    """The terminal sends SIGINT to the whole process group, DataLoader workers included. The reference is
    a process of its own too (this one's threads and global state are the test suite's)."""
    out, reference = tmp_path / "exp", tmp_path / "reference"
    env = {**os.environ, "PARATUNE_CACHE": str(data["cache"])}
    assert subprocess.run([sys.executable, "-m", "paratune", *args(data, reference, workers=1)], env=env, cwd=ROOT,
                          capture_output=True).returncode == 0
    proc = subprocess.Popen([sys.executable, "-m", "paratune", *args(data, out, workers=1)], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not (
            (out / "ledger.jsonl").exists() and len((out / "ledger.jsonl").read_text().splitlines()) >= 8):
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "interrupted at epoch" in err
    assert subprocess.run([sys.executable, "-m", "paratune", *args(data, out, "--resume", workers=1)], env=env,
                          cwd=ROOT, capture_output=True).returncode == 0
    assert ledger(out) == ledger(reference)
    assert same(weights(out), weights(reference))


# -- defect 10: temp files of interrupted saves
def test_temp_files_of_interrupted_saves_are_removed_at_the_next_start(data, tmp_path, capsys, no_loading):
    out = tmp_path / "exp"
    (out / "final").mkdir(parents=True)
    ours = [out / ".checkpoint.pt.k3x_9abz.tmp", out / ".model.ep0.pt.a1b2c3d4.tmp", out / "final" / ".model.pt.zz99yy88.tmp"]
    others = [out / "notes.tmp", out / ".hidden.tmp", out / "sub" / ".checkpoint.pt.k3x_9abz.tmp"]
    for p in ours + others:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"half")
    with pytest.raises(AssertionError, match="data was loaded"):
        finetune(data, out)
    assert not any(p.exists() for p in ours) and all(p.exists() for p in others)
    capsys.readouterr()


# -- a torn ledger line
def _trained_one_epoch(data, out, capsys) -> list[str]:
    assert finetune(data, out, epochs=1, valid=False) == 0
    capsys.readouterr()
    return (out / "ledger.jsonl").read_text().splitlines()


def test_a_torn_last_ledger_line_is_dropped_with_a_warning(data, tmp_path, capsys):
    out = tmp_path / "exp"
    lines = _trained_one_epoch(data, out, capsys)
    with open(out / "ledger.jsonl", "a") as f:
        f.write('{"epoch": 1, "key": "0_geo')  # a crash in the middle of the write
    assert finetune(data, out, "--resume", epochs=2, valid=False) == 0
    err = capsys.readouterr().err
    assert "ledger.jsonl:25: dropped a torn last line" in err
    rows = ledger(out)
    assert rows[:24] == [json.loads(x) for x in lines] and len(rows) == 48


def test_a_damaged_ledger_line_in_the_middle_is_an_error(data, tmp_path, capsys, no_loading):
    out = tmp_path / "exp"
    out.mkdir()
    rows = [json.dumps({"epoch": 0, "key": f"k{i}", "step": i + 1, "status": "trained"}) for i in range(4)]
    (out / "ledger.jsonl").write_text("\n".join(rows[:2] + ["{garbage"] + rows[2:]) + "\n")
    state = {k: None for k in checkpoint.STATE_KEYS} | {"best": [], "epoch": 0, "step": 4}
    torch.save(state, out / "checkpoint.pt")
    assert finetune(data, out, "--resume", valid=False) == 2
    err = capsys.readouterr().err
    assert f"error: {out / 'ledger.jsonl'}:3: not a ledger line" in err and "Traceback" not in err


# -- defect 12: disk full, read-only folder, truncated or foreign checkpoint
def test_disk_full_while_saving_says_so_and_keeps_the_previous_checkpoint(data, tmp_path, capsys, monkeypatch):
    from paratune.io import atomic_write
    saves = []

    def save(obj, path):
        saves.append(path)
        if len(saves) == 1:
            return atomic_write(path, lambda f: torch.save(obj, f))

        def full(f):
            f.write(b"x" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
        return atomic_write(path, full)
    monkeypatch.setattr("paratune.train.checkpoint.atomic_torch_save", save)
    out = tmp_path / "exp"
    assert finetune(data, out, valid=False) == 2
    err = capsys.readouterr().err
    assert f"error: {out / 'checkpoint.pt'}: no space left on device; the previous checkpoint (step 6) is intact" in err
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 6
    assert not list(out.glob(".*.tmp"))


def test_a_read_only_folder_is_found_before_anything_is_loaded(data, tmp_path, capsys, monkeypatch, no_loading):
    out = tmp_path / "exp"
    out.mkdir()
    if os.geteuid() == 0:  # root writes through permissions: make the probe meet a read-only file system

        def read_only(*a, **k):
            raise OSError(errno.EROFS, "Read-only file system")
        monkeypatch.setattr("paratune.train.run_folder.tempfile.TemporaryFile", read_only)
    else:
        out.chmod(0o555)
    try:
        assert finetune(data, out) == 2
    finally:
        out.chmod(0o755)
    err = capsys.readouterr().err
    assert f"error: {out}: cannot write there" in err


@pytest.mark.parametrize("kind", ["truncated", "foreign", "text"])
def test_a_truncated_or_foreign_checkpoint_is_named(data, tmp_path, capsys, no_loading, kind):
    out = tmp_path / "exp"
    out.mkdir()
    path = out / "checkpoint.pt"
    torch.save({"model": {"w": torch.zeros(1000)}, "step": 3}, path)
    if kind == "truncated":
        path.write_bytes(path.read_bytes()[:1500])
    elif kind == "text":
        path.write_text("hello")
    assert finetune(data, out, "--resume") == 2
    err = capsys.readouterr().err
    assert f"error: {path}: not a " in err and "Traceback" not in err


def test_an_output_that_is_a_file_is_refused_first(data, tmp_path, capsys, no_loading):
    out = tmp_path / "exp"
    out.write_text("my notes")
    assert finetune(data, out) == 2
    assert f"error: {out}: is a file, not a folder" in capsys.readouterr().err
    assert out.read_text() == "my notes"
