"""One epoch of `paratune finetune` at a budget of 90 % of the card, with the figures the trainer issue asks for.

    python benchmarks/gpu_epoch.py --model ../shared/data/paraformer_large --out /tmp/gpu_epoch

1. Synthetic, speech-like audio (harmonic "syllables" with pauses; 16 kHz) in `--files` clips whose
   durations follow a log-normal (median 5 s, clipped to 0.5-60 s); a manifest of `--utterances` rows
   that draw those clips, with random transcripts from the model's own characters (about 4 per second).
   The weights are random (--from-scratch): a step's memory depends on the shapes, not the values.
2. `paratune plan --calibrate` at each precision in --calibrate: the memory model against the CUDA
   allocator at the plan's costliest batch shapes (stored with the fit, so the run below uses it).
3. `paratune finetune` for one epoch; then from memory.csv, the ledger and the log: OOM splits and
   quarantined utterances, reserved memory after warm-up against during it, measured against predicted
   peaks, and throughput.

Writes OUT/summary.json, OUT/summary.md and OUT/exp/memory.png.

The memory levers (issue 16) on a small card in effect: `--budget 16GiB --precision bf16 --calibrate bf16`
trains with the levers the plan chooses (the finetune log's "plan:" line, in summary.json); the same with
`--override ++memory.checkpointing=on` checkpoints every block, the throughput reference.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]
FS = 16000


def speechlike(seconds: float, rng: np.random.Generator) -> np.ndarray:
    """Voiced syllables (random f0, a few harmonics under a formant-like envelope) between short pauses."""
    n = int(seconds * FS)
    out = np.zeros(n, dtype=np.float32)
    t0 = 0
    while t0 < n:
        syl = int(rng.uniform(0.12, 0.3) * FS)
        gap = int(rng.uniform(0.02, 0.25) * FS)
        m = min(syl, n - t0)
        t = np.arange(m) / FS
        f0 = rng.uniform(90, 260) * (1 + 0.1 * np.sin(2 * np.pi * rng.uniform(1, 4) * t))
        phase = 2 * np.pi * np.cumsum(f0) / FS
        formant = rng.uniform(400, 2500)
        wave = sum(np.sin(k * phase) * np.exp(-((k * f0 - formant) / 800) ** 2) for k in range(1, 12))
        out[t0:t0 + m] = 0.3 * np.hanning(m) * wave / 3
        t0 += syl + gap
    return out + rng.normal(0, 0.003, n).astype(np.float32)


def make_data(out: Path, model_dir: Path, n: int, files: int, n_valid: int, seed: int, median_s: float = 5.0,
              max_s: float = 60.0) -> dict:
    rng = np.random.default_rng(seed)
    wav = out / "wav"
    wav.mkdir(parents=True, exist_ok=True)
    # clip durations at the log-normal's quantiles: rows drawing clips uniformly are heavy-tailed the same way
    q = (np.arange(files) + 0.5) / files
    from statistics import NormalDist
    seconds = np.clip(np.exp(np.log(median_s) + 0.8 * np.array([NormalDist().inv_cdf(x) for x in q])), 0.5, max_s)
    paths = []
    for i, s in enumerate(seconds):
        p = wav / f"clip{i:04d}.wav"
        if not p.exists():
            sf.write(p, speechlike(float(s), rng), FS, subtype="PCM_16")
        paths.append(p)
    tokens = json.loads((model_dir / "tokens.json").read_text(encoding="utf-8"))
    chars = [t for t in tokens if len(t) == 1 and "\u4e00" <= t <= "\u9fff"]
    if not chars:  # a model without CJK characters (e.g. a small test model): its plain tokens
        chars = [t for t in tokens if not t.startswith("<") and t.strip()]
    joiner = "" if "\u4e00" <= chars[0] <= "\u9fff" else " "

    def write(path: Path, rows: int) -> float:
        total = 0.0
        with open(path, "w", encoding="utf-8") as f:
            for r in range(rows):
                i = int(rng.integers(files))
                u = max(1, int(round(seconds[i] * 4.0 * rng.uniform(0.6, 1.4))))
                text = joiner.join(rng.choice(chars, size=u))
                f.write(json.dumps({"key": f"{path.stem}{r:06d}", "source": str(paths[i]),
                                    "source_len": int(seconds[i] * 100), "target": text, "target_len": u},
                                   ensure_ascii=False) + "\n")
                total += seconds[i]
        return total

    hours = write(out / "train.jsonl", n) / 3600
    write(out / "valid.jsonl", n_valid)
    return {"utterances": n, "clips": files, "hours": round(hours, 2),
            "seconds_median": float(np.median(seconds)), "seconds_max": float(seconds.max())}


def run(cmd: list[str], log: Path, timeout: int, env: dict) -> tuple[int, float]:
    print("$ " + " ".join(cmd), flush=True)
    start = time.time()
    with open(log, "w") as f:
        try:
            # coreutils' timeout: a killed benchmark must not leave its trainer running
            proc = subprocess.Popen(["timeout", str(timeout)] + cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                    cwd=ROOT)
            for line in proc.stdout:
                sys.stdout.write(line)
                f.write(line)
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = 124
    return rc, time.time() - start


def summarise(exp: Path, log_text: str, budget: int, warmup_share: float) -> dict:
    rows = list(csv.DictReader(open(exp / "memory.csv")))
    col = {k: np.array([float(r[k]) for r in rows]) for k in ("step", "batch", "frames", "tokens", "predicted",
                                                              "peak", "allocated", "reserved", "retries")}
    n = len(rows)
    w = max(3, int(np.ceil(warmup_share * n)))
    ledger = [json.loads(line) for line in open(exp / "ledger.jsonl")]
    status = {}
    for e in ledger:
        status[e["status"]] = status.get(e["status"], 0) + 1
    err = (col["peak"] - col["predicted"]) / col["predicted"]
    reserved_warm = col["reserved"][:w].max()
    reserved_after = col["reserved"][w:].max() if n > w else reserved_warm
    return {
        "steps": n, "warmup_steps": w, "ledger": status,
        "oom_splits": log_text.count("splitting"),
        "quarantined": status.get("quarantined", 0),
        "peak_allocated_gib": round(col["peak"].max() / 2**30, 2),
        "peak_reserved_gib": round(col["reserved"].max() / 2**30, 2),
        "budget_gib": round(budget / 2**30, 2),
        "reserved_end_of_warmup_gib": round(reserved_warm / 2**30, 2),
        "reserved_after_warmup_max_gib": round(reserved_after / 2**30, 2),
        "reserved_growth_after_warmup": round(float(reserved_after / reserved_warm - 1), 4),
        "allocated_after_step_first_last_gib": [round(col["allocated"][0] / 2**30, 3),
                                                round(col["allocated"][-1] / 2**30, 3)],
        "allocator_retries": int(col["retries"].max()),
        "peak_vs_predicted_mean_abs": round(float(np.abs(err).mean()), 4),
        "peak_vs_predicted_max_over": round(float(err.max()), 4),
        "empty_cache_or_findings": [line for line in log_text.splitlines() if line.startswith("memory: ")],
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--utterances", type=int, default=20000)
    ap.add_argument("--valid", type=int, default=40)
    ap.add_argument("--files", type=int, default=160)
    ap.add_argument("--share", type=float, default=0.9, help="budget as a share of the card (default 0.9)")
    ap.add_argument("--budget", default=None, help="a fixed budget instead (e.g. on a CPU: 6GiB)")
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--calibrate", nargs="*", default=["fp32", "bf16"])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--workers", type=int, default=max(1, min(12, (os.cpu_count() or 2) - 2)))
    ap.add_argument("--timeout", type=int, default=400, help="seconds for the epoch (default 400)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--override", action="append", default=[], metavar="++KEY=VALUE",
                    help="passed to plan and finetune, e.g. ++memory.checkpointing=on (every block: the "
                         "throughput reference for the plan's chosen levers)")
    args = ap.parse_args(argv)
    import torch

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
              "device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"}
    if args.budget:
        from paratune.memory.plan import parse_bytes
        budget = parse_bytes(args.budget)
    else:
        budget = int(args.share * torch.cuda.get_device_properties(0).total_memory)
    result["budget_bytes"] = budget
    t = time.time()
    result["data"] = make_data(out, args.model, args.utterances, args.files, args.valid, args.seed)
    result["data"]["made_in_s"] = round(time.time() - t, 1)
    print(json.dumps(result), flush=True)

    result["calibration"] = {}
    for precision in args.calibrate:
        rc, secs = run([sys.executable, "-m", "paratune", "plan", "--model", str(args.model), "--data",
                        str(out / "train.jsonl"), "--budget", str(budget), "--precision", precision, "--device",
                        args.device, "--calibrate", "--png", str(out / f"plan_{precision}.png"), *args.override],
                       out / f"plan_{precision}.log", 300, env)
        text = (out / f"plan_{precision}.log").read_text()
        result["calibration"][precision] = {"rc": rc, "seconds": round(secs, 1), "lines": [
            line.strip() for line in text.splitlines() if "B=" in line or "batches" in line or "fitted" in line]}

    exp = out / "exp"
    cmd = [sys.executable, "-m", "paratune", "finetune", "--model", str(args.model), "--from-scratch",
           "--train", str(out / "train.jsonl"), "--valid", str(out / "valid.jsonl"), "--output", str(exp),
           "--budget", str(budget), "--precision", args.precision, "--device", args.device,
           "++train_conf.max_epoch=1", "++train_conf.log_interval=5", "++train_conf.save_checkpoint_interval=0",
           "++train_conf.keep_nbest_models=1", f"++dataset_conf.num_workers={args.workers}",
           "++dataset_conf.buffer_size=100000",  # paraformer-large's config.yaml says 500: too few to pack from
           *args.override]
    rc, secs = run(cmd, out / "finetune.log", args.timeout, env)
    text = (out / "finetune.log").read_text()
    result["finetune"] = {"rc": rc, "wall_s": round(secs, 1), "command": " ".join(cmd[1:]),
                          "levers": [line.strip() for line in text.splitlines() if "plan: " in line][:1]}
    if (exp / "memory.csv").exists():
        result["epoch"] = summarise(exp, text, budget, 0.1)
        result["epoch"]["audio_hours_per_hour"] = round(result["data"]["hours"] * 3600 / secs, 1)
        result["epoch"]["utterances_per_s"] = round(args.utterances / secs, 1)
    (out / "summary.json").write_text(json.dumps(result, indent=1, ensure_ascii=False))
    print(json.dumps(result, indent=1, ensure_ascii=False))
    return 0 if rc == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
