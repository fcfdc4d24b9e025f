"""A clip that cannot be read, or gives non-finite audio, costs that clip, never the run: it is left out of
its batch at load time, logged with its manifest file:line, and in the ledger as `excluded` with the
reason; the rest of the batch trains, and a batch with nothing readable still runs as a placeholder (every
rank stays in step)."""
from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from paratune.train.finetune import Finetune, FinetuneOptions
from tests.train.fsdd import prepare_fsdd

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "examples" / "fsdd" / "model"
COMMON = ["++train_conf.max_epoch=2", "++dataset_conf.max_batch=2", "++dataset_conf.num_workers=1",
          "++train_conf.log_interval=1"]


@pytest.fixture(scope="module")
def manifest(shared_data, tmp_path_factory):
    """20 good FSDD clips and four bad ones, all with `source_len` (so nothing opens them before training):
    a missing file, a float WAV with NaN samples, one with an infinite sample, a file that is not audio.
    They claim the shortest length, so the sampler packs them together: some batch has only bad clips."""
    tmp = tmp_path_factory.mktemp("bad_clips")
    good = prepare_fsdd(shared_data, tmp / "fsdd", ("george",), 20, MODEL)
    wave = np.random.default_rng(0).uniform(-0.3, 0.3, 8000).astype(np.float32)
    nan, inf = wave.copy(), wave.copy()
    nan[100:200] = np.nan
    inf[4000] = np.inf
    sf.write(tmp / "nan.wav", nan, 8000, subtype="FLOAT")
    sf.write(tmp / "inf.wav", inf, 8000, subtype="FLOAT")
    (tmp / "text.wav").write_text("this is not a RIFF file\n" * 20)
    bad = {"gone": str(tmp / "missing.wav"), "nan": str(tmp / "nan.wav"), "inf": str(tmp / "inf.wav"),
           "notaudio": str(tmp / "text.wav")}
    lines = good.read_text().splitlines()
    for key, source in bad.items():
        lines.append(json.dumps({"key": key, "source": source, "source_len": 20, "target": "1"}))
    path = tmp / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    keys = [json.loads(x)["key"] for x in lines]
    return {"path": path, "keys": keys, "bad": {k: keys.index(k) + 1 for k in bad}}


def _check_ledger(exp: Path, manifest: dict, epochs: int) -> list[dict]:
    rows = [json.loads(x) for x in (exp / "ledger.jsonl").read_text().splitlines()]
    for epoch in range(epochs):
        mine = [r for r in rows if r["epoch"] == epoch]
        assert Counter(r["key"] for r in mine) == Counter(manifest["keys"])  # each exactly once
        for r in mine:
            assert r["status"] == ("excluded" if r["key"] in manifest["bad"] else "trained"), r
    reasons = {r["key"]: r["reason"] for r in rows if r["status"] == "excluded"}
    assert "file not found" in reasons["gone"]
    assert "NaN" in reasons["nan"] and "NaN" in reasons["inf"]
    assert "unreadable" in reasons["notaudio"]
    return rows


@pytest.fixture(scope="module")
def trained(manifest, tmp_path_factory):
    """Two epochs from scratch on the manifest with bad clips: the run folder and its log."""
    tmp = tmp_path_factory.mktemp("bad_clips_run")
    log = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stderr(log):
        code = Finetune(FinetuneOptions(model=MODEL, train=[manifest["path"]], output=tmp / "exp", budget=2**30,
                                        device="cpu", from_scratch=True, overrides=list(COMMON))).run()
    return {"code": code, "exp": tmp / "exp", "log": log.getvalue()}


def test_bad_clips_are_excluded_and_the_rest_trains(manifest, trained):
    assert trained["code"] == 0
    rows = _check_ledger(trained["exp"], manifest, epochs=2)
    # a step whose batch had nothing readable ran as a placeholder and trained nobody
    steps = Counter((r["epoch"], r["step"]) for r in rows if r["status"] == "trained")
    assert any((r["epoch"], r["step"]) not in steps for r in rows if r["status"] == "excluded")
    for key, line in manifest["bad"].items():
        assert f"excluded {key!r} ({manifest['path']}:{line})" in trained["log"]
    assert "Traceback" not in trained["log"]
    state = torch.load(trained["exp"] / "final" / "model.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())  # no NaN got in


def test_eval_counts_bad_clips_out_and_scores_the_rest(manifest, trained, capfd):
    from paratune.cli import main
    code = main(["eval", "--model", str(trained["exp"] / "final"), "--data", str(manifest["path"]),
                 "--device", "cpu"])
    out, err = capfd.readouterr()
    assert code == 1  # partial: some clips could not be scored
    assert "utterances 20" in out
    for line in manifest["bad"].values():
        assert f"{manifest['path']}:{line}:" in err
    assert "Traceback" not in err


@pytest.mark.slow
def test_two_ranks_stay_in_step_around_bad_clips(manifest, tmp_path):
    exp = tmp_path / "exp"
    env = dict(os.environ)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "paratune", "finetune", "--model", str(MODEL), "--from-scratch", "--train",
                          str(manifest["path"]), "--output", str(exp), "--budget", "1GiB", "--device", "cpu",
                          *COMMON], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    rows = _check_ledger(exp, manifest, epochs=2)
    assert {r["rank"] for r in rows} == {0, 1}
    assert "Traceback" not in run.stderr
