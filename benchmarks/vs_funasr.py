"""FunASR's own trainer and `paratune finetune` on the same manifest, model and epochs (CPU).

    python benchmarks/vs_funasr.py --out /tmp/vs [--utterances 400] [--batch-size 4000] [--share 0.6]

1. A manifest of `--utterances` synthetic speech-like clips (benchmarks/gpu_epoch.py's generator:
   log-normal durations, median 2.5 s here, clipped to 0.5-20 s) with transcripts from the bundled demo
   model's characters, and 20 more for validation.
2. FunASR 1.4.16: `funasr.bin.train_ds.main`, the code `train_ds.py` runs, with its `BatchSampler`
   (`batch_type: token`, `--batch-size` frames per batch, `sort_size` 1024) from the bundled demo model
   (`paratune/assets/demo_model`, loaded from its model.pt). One change: train_ds sets the trainer's
   device to the GPU index (`trainer.device = LOCAL_RANK`) whatever `device` says, so here the trainer's
   device is pinned to "cpu". Run twice in fresh processes: once for time, once with every step's tensors
   tracked by paratune's PeakMemory (the tracker slows the step; its run is not timed).
3. paratune: `paratune finetune` from the same model directory with `--budget` = `--share` x FunASR's
   tracked peak, the same epochs, optimizer (AdamW), learning rate and warmup. Likewise timed once and
   tracked once (`++memory.cpu_track_every=1`).
Reported: utterances/s and audio seconds/s (training loop only: from the first to the last step's log
time), padding waste of the batches each sampler made, tracked peak tensor bytes, peak RSS, and the
tracked bytes left between steps at the start and end (growth).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "paratune" / "assets" / "demo_model"
sys.path.insert(0, str(ROOT))


class Recorder:
    """Each training forward's time and batch lengths (LFR frames), the same for both trainers."""

    def __init__(self):
        self.record = {"steps": [], "batch_frames": [], "batch_padded": []}

    def note(self, lengths) -> None:
        self.record["steps"].append(time.time())
        self.record["batch_frames"].append(int(lengths.sum()))
        self.record["batch_padded"].append(int(lengths.max()) * int(lengths.numel()))

    def save(self, path: Path, **extra) -> None:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        path.write_text(json.dumps({**self.record, "rss": rss, **extra}))


# ------------------------------------------------------------------ FunASR, in its own process
def run_funasr(args) -> None:
    import torch

    import funasr.train_utils.trainer_ds as trainer_ds
    from funasr.bin import train_ds
    from funasr.download.download_model_from_hub import download_model

    # train_ds.py: `trainer.device = int(os.environ.get("LOCAL_RANK", 0))`, a GPU index, always
    trainer_ds.Trainer.device = property(lambda self: "cpu", lambda self, value: None)
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    recorder, tracker = Recorder(), None
    if args.track:
        from paratune.memory.tracker import PeakMemory

    def wrap(model):
        original_forward = model.forward

        def forward(*a, **kw):  # one call per training batch
            if model.training and kw.get("speech_lengths") is not None:
                recorder.note(kw["speech_lengths"])
            return original_forward(*a, **kw)
        model.forward = forward

    original_warp = trainer_ds.Trainer.warp_optim_scheduler

    def warp_optim_scheduler(self, model, **kw):
        nonlocal tracker
        wrap(model)
        model_, optim, scheduler = original_warp(self, model, **kw)
        if args.track:
            tracker = PeakMemory(model_, optim)
            tracker.__enter__()
        return model_, optim, scheduler
    trainer_ds.Trainer.warp_optim_scheduler = warp_optim_scheduler

    kwargs = download_model(is_training=True, model=str(MODEL), device="cpu", ncpu=args.threads,
                            train_data_set_list=str(args.out / "train.jsonl"),
                            valid_data_set_list=str(args.out / "valid.jsonl"),
                            output_dir=str(args.exp))
    kwargs["dataset_conf"] = {**kwargs.get("dataset_conf", {}), "batch_type": "token",
                              "batch_size": args.batch_size, "max_token_length": 100000, "sort_size": 1024,
                              "buffer_size": 1024, "shuffle": True, "num_workers": 2,
                              "batch_sampler": "BatchSampler", "index_ds": "IndexDSJsonl"}
    kwargs["train_conf"] = {**kwargs.get("train_conf", {}), "max_epoch": args.epochs, "log_interval": 10,
                            "keep_nbest_models": 1, "avg_nbest_model": 1, "validate_interval": 100000,
                            "save_checkpoint_interval": 100000, "use_fp16": False}
    kwargs["optim"], kwargs["optim_conf"] = "adamw", {"lr": args.lr}
    kwargs["scheduler"], kwargs["scheduler_conf"] = "warmuplr", {"warmup_steps": 30}
    train_ds.main(**kwargs)
    extra = {}
    if tracker is not None:
        tracker.__exit__(None, None, None)
        extra = {"tracked_peak": tracker.peak, "tracked_now": tracker.current}
    recorder.save(args.exp / "record.json", **extra)


# ------------------------------------------------------------------ paratune, in its own process
def run_paratune(args, cmd: list[str]) -> None:
    import torch

    from paratune.cli import main as paratune_main
    from paratune.model.paraformer import Paraformer

    from torch._subclasses.fake_tensor import FakeTensor

    torch.set_num_threads(args.threads)
    recorder, original = Recorder(), Paraformer.forward

    def forward(self, speech, speech_lengths, *a, **kw):
        if self.training and not isinstance(speech_lengths, FakeTensor):  # not the memory model's fake steps
            recorder.note(speech_lengths)
        return original(self, speech, speech_lengths, *a, **kw)
    Paraformer.forward = forward
    code = paratune_main(cmd)
    if code:
        raise SystemExit(code)
    recorder.save(args.exp / "record.json")


# ------------------------------------------------------------------ the comparison
def child(cmd: list[str], log: Path, exp: Path) -> int:
    """Run in a fresh output folder (FunASR resumes from what it finds there); the exit status."""
    import shutil
    shutil.rmtree(exp, ignore_errors=True)
    exp.mkdir(parents=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    return proc.returncode


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--utterances", type=int, default=400)
    ap.add_argument("--batch-size", type=int, default=4000, help="FunASR's batch_size (token batches: frames)")
    ap.add_argument("--share", type=float, default=0.6, help="paratune's budget as a share of FunASR's peak")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--lr", type=float, default=0.0005)
    ap.add_argument("--threads", type=int, default=1, help="torch threads in each trainer (default 1: the same for "
                                                           "both, and steady when other processes share the cores)")
    ap.add_argument("--run-funasr", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--run-paratune", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    ap.add_argument("--track", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--exp", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.run_funasr:
        run_funasr(args)
        return 0
    if args.run_paratune is not None:
        run_paratune(args, args.run_paratune)
        return 0

    from benchmarks.gpu_epoch import make_data
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    data = make_data(out, MODEL, args.utterances, 60, 20, seed=1, median_s=2.5, max_s=20.0)
    base = [sys.executable, str(Path(__file__).resolve()), "--out", str(out), "--batch-size", str(args.batch_size),
            "--threads", str(args.threads),
            "--epochs", str(args.epochs), "--lr", str(args.lr), "--run-funasr"]
    results = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "data": data, "cpus": os.cpu_count()}
    rc = child(base + ["--exp", str(out / "funasr_time")], out / "funasr_time.log", out / "funasr_time")
    if rc:
        print((out / "funasr_time.log").read_text()[-3000:])
        return 1
    rc = child(base + ["--exp", str(out / "funasr_mem"), "--track"], out / "funasr_mem.log", out / "funasr_mem")
    if rc:
        print((out / "funasr_mem.log").read_text()[-3000:])
        return 1
    ft = json.loads((out / "funasr_time" / "record.json").read_text())
    fm = json.loads((out / "funasr_mem" / "record.json").read_text())
    budget = int(args.share * fm["tracked_peak"])

    def paratune_run(tag: str, extra: list[str]) -> dict:
        exp = out / f"paratune_{tag}"
        cmd = ["finetune", "--model", str(MODEL), "--train", str(out / "train.jsonl"), "--valid",
               str(out / "valid.jsonl"), "--output", str(exp), "--budget", str(budget), "--device", "cpu",
               f"++train_conf.max_epoch={args.epochs}", "++train_conf.log_interval=10", f"++optim_conf.lr={args.lr}",
               "++scheduler_conf.warmup_steps=30", "++dataset_conf.num_workers=2", "++train_conf.keep_nbest_models=1",
               "++train_conf.save_checkpoint_interval=0", *extra]
        rc = child([sys.executable, str(Path(__file__).resolve()), "--out", str(out), "--exp", str(exp),
                       "--threads", str(args.threads),
                       "--run-paratune", *cmd], out / f"paratune_{tag}.log", exp)
        if rc:
            raise SystemExit((out / f"paratune_{tag}.log").read_text()[-3000:])
        return json.loads((exp / "record.json").read_text())

    pt = paratune_run("time", ["++memory.cpu_track_every=1000000"])
    paratune_run("mem", ["++memory.cpu_track_every=1"])
    import csv
    mem = list(csv.DictReader(open(out / "paratune_mem" / "memory.csv")))
    frame_s = 0.06  # both samplers' lengths are LFR frames (60 ms)

    def summary(rec: dict) -> dict:
        span = rec["steps"][-1] - rec["steps"][0]
        return {"batches": len(rec["steps"]), "loop_s": round(span, 1),
                # the last batch's compute is not inside the span: count the frames of the others
                "audio_s_per_s": round(sum(rec["batch_frames"][:-1]) * frame_s / max(span, 1e-9), 2),
                "padding_waste": round(1 - sum(rec["batch_frames"]) / sum(rec["batch_padded"]), 4),
                "rss_peak_timed_mib": round(rec["rss"] / 2**20, 1)}

    results["funasr"] = {**summary(ft), "tracked_peak_mib": round(fm["tracked_peak"] / 2**20, 1),
                         "between_steps_end_mib": round(fm["tracked_now"] / 2**20, 2)}
    results["paratune"] = {**summary(pt), "budget_mib": round(budget / 2**20, 1),
                           "tracked_peak_mib": round(max(int(r["peak"]) for r in mem) / 2**20, 1),
                           "between_steps_first_last_mib": [round(int(mem[0]["allocated"]) / 2**20, 2),
                                                            round(int(mem[-1]["allocated"]) / 2**20, 2)]}
    results["ratio"] = {
        "throughput": round(results["paratune"]["audio_s_per_s"] / results["funasr"]["audio_s_per_s"], 2),
        "tracked_peak": round(results["paratune"]["tracked_peak_mib"] / results["funasr"]["tracked_peak_mib"], 2)}
    (out / "summary.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
