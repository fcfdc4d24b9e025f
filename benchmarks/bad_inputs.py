"""Bad inputs and faults a new user can hit, each run through the `paratune` command line as a subprocess.

    python benchmarks/bad_inputs.py [--keep DIR] [-k NAME-PART]

For every case: the exit status, whether a Python traceback reached the user, whether what must hold
held (no file outside the run folder touched, the run refused or went on, every utterance trained once),
and the last line the user saw. Ends with the counts: cases, tracebacks seen, failed expectations. ("tr":
torchrun's own traceback when it is sent SIGTERM, not paratune's.)
The cases follow issue 13's list of defects (D1..D14). The bundled demo model and its clips are the data.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
MODEL = ROOT / "paratune" / "assets" / "demo_model"
DATA = ROOT / "paratune" / "assets" / "finetune"
FAST = ["++train_conf.max_epoch=1", "++dataset_conf.num_workers=0", "++dataset_conf.max_batch=4",
        "++train_conf.save_checkpoint_interval=2", "--budget", "1GiB", "--device", "cpu"]


def paratune(*args, timeout=600, wait=True):
    cmd = [sys.executable, "-m", "paratune", *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def train_manifest(tmp: Path, n: int = 12, extra=()) -> Path:
    """The first n demo training clips (absolute paths) and extra lines."""
    lines = [json.loads(x) for x in (DATA / "train.jsonl").read_text(encoding="utf-8").splitlines()[:n]]
    for row in lines:
        row["source"] = str(DATA / row["source"])
    path = tmp / f"train{len(list(tmp.glob('train*.jsonl')))}.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in [*lines, *extra]), encoding="utf-8")
    return path


def finetune(tmp: Path, out: Path, *extra, manifest=None):
    return paratune("finetune", "--model", MODEL, "--train", manifest or train_manifest(tmp), "--output", out,
                    *FAST, *extra)


def ledger_exact(out: Path, manifest: Path, epochs: int = 1) -> bool:
    keys = [json.loads(x)["key"] for x in manifest.read_text(encoding="utf-8").splitlines()]
    rows = [json.loads(x) for x in (out / "ledger.jsonl").read_text().splitlines()]
    return all(Counter(r["key"] for r in rows if r["epoch"] == e) == Counter(keys) for e in range(epochs))


def outside(tmp: Path, output: Path, before: set) -> set:
    """Files named after the evil keys that appeared anywhere under tmp's parent but inside `output`."""
    return {p for p in tmp.parent.rglob("*evil*") if not p.is_relative_to(output)} - before


# -- the cases: each returns (run, held: bool, note)

def d1_keys_as_paths(tmp):
    before = set(tmp.parent.rglob("*evil*"))
    lines = [{"key": k, "source": str(SHARED / "long_audio" / "zh_25s.wav"), "target": "今天天气很好我们去公园"}
             for k in ("../../evil_up", str(tmp.parent / "evil_abs"), "a/b/evil_sub")]
    src = tmp / "long.jsonl"
    src.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines), encoding="utf-8")
    run = paratune("prepare", src, "--model", MODEL, "--output", tmp / "prep", "--max-duration", "10",
                   "--long-audio", "split", "--align-model", MODEL)
    escaped = outside(tmp, tmp / "prep", before)
    return run, not escaped, f"{len(escaped)} files outside --output"


def d2_crafted_checkpoint(tmp):
    victim = tmp / "victim.txt"
    victim.write_text("keep me")
    out = tmp / "run"
    m = train_manifest(tmp)
    first = finetune(tmp, out, "--valid", m, manifest=m)
    if first.returncode != 0:
        return first, False, "first run failed"
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    state["best"] = [[0.0, str(victim)], [0.1, "../victim.txt"]]
    torch.save(state, out / "checkpoint.pt")
    run = finetune(tmp, out, "--valid", m, "--resume", "++train_conf.max_epoch=3", "++train_conf.keep_nbest_models=1",
                   manifest=m)
    return run, victim.exists(), "victim file " + ("kept" if victim.exists() else "DELETED")


def d3_resume_nothing(tmp):
    run = finetune(tmp, tmp / "empty", "--resume")
    return run, run.returncode == 2 and not (tmp / "empty" / "ledger.jsonl").exists(), "must refuse"


def d3_used_folder(tmp):
    m = train_manifest(tmp)
    finetune(tmp, tmp / "run", manifest=m)
    again = finetune(tmp, tmp / "run", manifest=m)
    if again.returncode != 2:
        return again, False, "a second fresh run into the folder was not refused"
    run = finetune(tmp, tmp / "run", "--overwrite", manifest=m)
    return run, run.returncode == 0 and ledger_exact(tmp / "run", m), "refused, then --overwrite: one epoch in ledger"


def d4_resume_without_valid(tmp):
    m = train_manifest(tmp)
    finetune(tmp, tmp / "run", "--valid", m, "++train_conf.max_epoch=1", manifest=m)
    run = finetune(tmp, tmp / "run", "--resume", "++train_conf.max_epoch=2", manifest=m)
    said = "valid" in run.stderr.lower()
    return run, said, "refused or warned about the missing --valid" if said else "silent"


def _bad_clip_lines(tmp):
    wave = np.random.default_rng(0).uniform(-0.3, 0.3, 16000).astype(np.float32)
    wave[10] = np.nan
    sf.write(tmp / "nan.wav", wave, 16000, subtype="FLOAT")
    return [{"key": "gone", "source": str(tmp / "missing.wav"), "source_len": 100, "target": "你好"},
            {"key": "nan", "source": str(tmp / "nan.wav"), "source_len": 100, "target": "你好"},
            {"key": "nosource", "source_len": 100, "target": "你好"}]


def d5_bad_clips_finetune(tmp):
    m = train_manifest(tmp, extra=_bad_clip_lines(tmp))
    run = finetune(tmp, tmp / "run", manifest=m)
    rows = [json.loads(x) for x in (tmp / "run" / "ledger.jsonl").read_text().splitlines()] if run.returncode == 0 else []
    trained = Counter(r["key"] for r in rows if r["status"] == "trained")
    ok = run.returncode == 0 and len(trained) == 12 and max(trained.values()) == 1
    return run, ok, f"{len(trained)} of 12 good clips trained once"


def d5_bad_clips_eval(tmp):
    m = train_manifest(tmp, extra=_bad_clip_lines(tmp))
    run = paratune("eval", "--model", MODEL, "--data", m, "--device", "cpu")
    return run, run.returncode == 1 and "utterances 12" in run.stdout, "scores the 12 good clips, exit 1"


def d6_batch_size(tmp):
    run = paratune("transcribe", "--model", MODEL, "--batch-size", "-1", DATA / "test" / "test_000.flac")
    return run, run.returncode == 2, "refused"


def d6_unknown_chars(tmp):
    m = train_manifest(tmp, extra=[{"key": "alien", "source": str(DATA / "train" / "train_000.flac"),
                                    "target": "ЖЖЖЖ"}])
    run = finetune(tmp, tmp / "run", manifest=m)
    said = f"{m}:13:" in run.stderr and "unknown" in run.stderr
    return run, said and ledger_exact(tmp / "run", train_manifest(tmp)), "file:line named, left out, the rest trained"


def config_case(override):
    def case(tmp):
        start = time.time()
        run = finetune(tmp, tmp / "run", override)
        key = override[2:].split("=")[0]
        return run, run.returncode == 2 and key in run.stderr, f"refused in {time.time() - start:.1f} s"
    case.__name__ = f"config {override}"
    return case


def d10_leftover_temp(tmp):
    m = train_manifest(tmp)
    finetune(tmp, tmp / "run", manifest=m)
    (tmp / "run" / ".checkpoint.pt.x1y2z3w4.tmp").write_bytes(b"torn")  # mkstemp's name, as a killed save leaves
    run = finetune(tmp, tmp / "run", "--resume", "++train_conf.max_epoch=2", manifest=m)
    left = list((tmp / "run").glob(".*.tmp"))
    return run, not left, f"{len(left)} temp files left"


def d11_sigterm(tmp, signum=signal.SIGTERM):
    m = train_manifest(tmp, n=40)
    out = tmp / "run"
    proc = paratune("finetune", "--model", MODEL, "--train", m, "--output", out, *FAST, "++train_conf.max_epoch=2",
                    "++train_conf.save_checkpoint_interval=1000", wait=False)
    ledger = out / "ledger.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and (not ledger.exists() or len(ledger.read_text().splitlines()) < 10):
        time.sleep(0.2)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=300)
    code = proc.returncode
    run = finetune(tmp, out, "--resume", "++train_conf.max_epoch=2", manifest=m)
    ok = code == 128 + signum and run.returncode == 0 and ledger_exact(out, m, epochs=2)
    run.stderr = err + run.stderr
    return run, ok, f"exit {code} on the signal, resumed: every clip once per epoch" if ok else f"exit {code}"


def d11_sigterm_torchrun(tmp):
    """SIGTERM to torchrun (what a scheduler sends): it passes the signal to both ranks."""
    m = train_manifest(tmp, n=40)
    out = tmp / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "paratune",
           "finetune", "--model", MODEL, "--train", m, "--output", out, *FAST, "++train_conf.max_epoch=2",
           "++train_conf.save_checkpoint_interval=1000"]
    proc = subprocess.Popen(list(map(str, cmd)), cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ledger = out / "ledger.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and (not ledger.exists() or len(ledger.read_text().splitlines()) < 10):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    saved = (out / "checkpoint.pt").exists()
    cmd[cmd.index("finetune") + 1:cmd.index("finetune") + 1] = ["--resume"]
    run = subprocess.run(list(map(str, cmd)), cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                         capture_output=True, text=True, timeout=600)
    ok = saved and run.returncode == 0 and ledger_exact(out, m, epochs=2)
    run.stderr = err + run.stderr
    return run, ok, f"torchrun exit {proc.returncode}, checkpoint {'saved' if saved else 'MISSING'}, resumed"


def d11_sigint(tmp):
    return d11_sigterm(tmp, signal.SIGINT)


def d12_output_is_a_file(tmp):
    (tmp / "afile").write_text("")
    start = time.time()
    run = finetune(tmp, tmp / "afile")
    return run, run.returncode == 2, f"refused in {time.time() - start:.1f} s"


def _resume_from(tmp, damage):
    m = train_manifest(tmp)
    finetune(tmp, tmp / "run", manifest=m)
    damage(tmp / "run")
    run = finetune(tmp, tmp / "run", "--resume", "++train_conf.max_epoch=2", manifest=m)
    return run, m


def d12_truncated_checkpoint(tmp):
    def cut(out):
        data = (out / "checkpoint.pt").read_bytes()
        (out / "checkpoint.pt").write_bytes(data[:len(data) // 2])
    run, _ = _resume_from(tmp, cut)
    return run, run.returncode == 2 and "checkpoint.pt" in run.stderr, "refused, names the file"


def d12_foreign_checkpoint(tmp):
    run, _ = _resume_from(tmp, lambda out: torch.save({"weights": torch.zeros(3)}, out / "checkpoint.pt"))
    return run, run.returncode == 2 and "checkpoint.pt" in run.stderr, "refused, names the file"


def d12_torn_ledger(tmp):
    def tear(out):
        with open(out / "ledger.jsonl", "a") as f:
            f.write('{"epoch": 0, "ke')
    run, m = _resume_from(tmp, tear)
    return run, run.returncode == 0 and ledger_exact(tmp / "run", m, epochs=2), "dropped with a warning, resumed"


def d12_doctor_inf(tmp):
    from paratune.train.monitor import FIELDS
    csv = tmp / "memory.csv"
    rows = [[1, 0, 4, 100, 10, 2e8, 1e8, 5e7, 2e8, 0, 0, 1e9, 1e10], [2, 0, 4, 100, 10, "inf", 1e8, 5e7, 2e8, 0, 0, 1e9, 1e10]]
    csv.write_text(",".join(FIELDS) + "\n" + "".join(",".join(map(str, r)) + "\n" for r in rows))
    run = paratune("doctor", csv)
    return run, f"{csv}:3" in run.stdout + run.stderr, f"exit {run.returncode}, the inf row named and skipped"


def cli_case(*args):
    def case(tmp):
        run = paratune(*[a.replace("{tmp}", str(tmp)) if isinstance(a, str) else a for a in args])
        return run, run.returncode == 2, "refused"
    case.__name__ = " ".join(str(a) for a in args if not str(a).startswith("/"))[:60]
    return case


def d12_no_am_mvn(tmp):
    model = tmp / "model"
    shutil.copytree(MODEL, model)
    (model / "am.mvn").unlink()
    run = paratune("transcribe", "--model", model, DATA / "test" / "test_000.flac")
    return run, "am.mvn" in run.stderr or "cmvn" in run.stderr.lower(), "warned"


def d13_forged_key(tmp):
    src = str(DATA / "test" / "test_000.flac")
    m = tmp / "keys.jsonl"
    m.write_text("".join(json.dumps({"key": k, "source": src}) + "\n" for k in ("ok", "a\tb", "c\nd")))
    run = paratune("transcribe", "--model", MODEL, m)
    lines = run.stdout.splitlines()
    return run, len(lines) == 1 and lines[0].count("\t") == 1, f"{len(lines)} output lines"


def d14_long_transcribe(tmp):
    start = time.time()
    run = paratune("transcribe", "--model", MODEL, "--max-duration", "20", SHARED / "long_audio" / "zh_70s.wav")
    return run, run.returncode == 0 and len(run.stdout.splitlines()) == 1, f"{time.time() - start:.0f} s"


CASES = [d1_keys_as_paths, d2_crafted_checkpoint, d3_resume_nothing, d3_used_folder, d4_resume_without_valid,
         d5_bad_clips_finetune, d5_bad_clips_eval, d6_batch_size, d6_unknown_chars,
         config_case("++dataset_conf.speed_perturb=[0.0]"), config_case("++train_conf.max_epoch=0"),
         config_case("++train_conf.log_interval=0"), config_case("++memory.cpu_track_every=0"),
         config_case("++dataset_conf.noise_snr_db=5"), config_case("++train_conf=5"), config_case("++freeze=5"),
         config_case("++train_conf.max_epoch=abc"), d10_leftover_temp, d11_sigterm, d11_sigint, d11_sigterm_torchrun,
         d12_output_is_a_file, d12_truncated_checkpoint, d12_foreign_checkpoint, d12_torn_ledger, d12_doctor_inf,
         cli_case("transcribe", "--model", MODEL, "--batch-size", "0", DATA / "test" / "test_000.flac"),
         cli_case("transcribe", "--model", MODEL, "--threads", "-1", DATA / "test" / "test_000.flac"),
         cli_case("transcribe", "--model", MODEL, "--device", "cuda", DATA / "test" / "test_000.flac"),
         cli_case("prepare", DATA / "train.jsonl", "--model", MODEL, "--output", "{tmp}/p", "--workers", "0"),
         cli_case("prepare", DATA / "train.jsonl", "--model", MODEL, "--output", "{tmp}/p", "--max-duration", "-5"),
         d12_no_am_mvn, d13_forged_key, d14_long_transcribe]


def main() -> int:
    keep = Path(sys.argv[sys.argv.index("--keep") + 1]) if "--keep" in sys.argv else None
    base = Path(tempfile.mkdtemp())
    tracebacks = failed = 0
    print(f"{'case':<48} {'exit':>4}  {'held':<5} {'tb':<3} note / last line")
    only = sys.argv[sys.argv.index("-k") + 1] if "-k" in sys.argv else ""
    cases = [c for c in CASES if only in c.__name__]
    for case in cases:
        tmp = base / case.__name__.replace(" ", "_").replace("/", "_")
        tmp.mkdir(parents=True)
        try:
            run, held, note = case(tmp)
        except Exception as e:  # the script's own failure (a timeout): counted as not held
            print(f"{case.__name__:<48} {'-':>4}  {'no':<5} {'-':<3} {type(e).__name__}: {e}")
            failed += 1
            continue
        # a traceback through paratune's code; torchrun prints its own when it is sent SIGTERM
        tb = bool(re.search(r'File "[^"]*/paratune/', run.stderr)) or (
            "Traceback" in run.stderr and "SignalException" not in run.stderr)
        tracebacks += tb
        failed += not held
        last = (run.stderr.strip().splitlines() or [""])[-1][:90]
        mark = "TB" if tb else ("tr" if "Traceback" in run.stderr else "-")
        print(f"{case.__name__:<48} {run.returncode:>4}  {'yes' if held else 'NO':<5} {mark:<3} "
              f"{note} | {last}", flush=True)
    print(f"\n{len(cases)} cases; tracebacks seen: {tracebacks}; expectations not held: {failed}")
    if keep:
        shutil.copytree(base, keep, dirs_exist_ok=True)
    shutil.rmtree(base, ignore_errors=True)
    return 1 if tracebacks or failed else 0


if __name__ == "__main__":
    sys.exit(main())
