"""Learning from a pretrained start: leave-one-speaker-out WER on FSDD for the base model alone, the
base fine-tuned by `examples/fsdd/run.sh`, the same fine-tuning through FunASR 1.4.16's trainer, and
the recipe from scratch.

    python benchmarks/fsdd_pretrained.py --out DIR [--speakers george,jackson,lucas,nicolas] [--seeds 0,1,2]
                                         [--skip scratch,funasr,paratune] [--reuse results.json]

For each held-out speaker (its 500 recordings are the test; the other three speakers' 1,500 train):
- zero-shot: `paratune eval` of `examples/fsdd/base` on the test recordings;
- paratune: `examples/fsdd/run.sh` (fine-tunes the base; `++train_conf.seed=S` per seed);
- FunASR: `funasr.bin.train_ds.main` from the same base directory on the same fit/held-out manifests
  the recipe wrote, with the recipe's settings: the same epochs, AdamW at the same learning rate and no
  weight decay, warmuplr with the same warmup, batches of the recipe's `max_batch` utterances
  (`batch_type: example`), SpecAugLFR with the same mask ranges, the same number of best epochs by validation
  accuracy averaged (the recipe: by CER), seed S. Its averaged weights are decoded by `paratune eval` (paratune's
  decoding equals FunASR's `generate`: tests/test_modeldir.py);
- scratch: `FROM_SCRATCH=1 examples/fsdd/run.sh` (seed 0 only; two speakers at a time, one thread each).
The paratune and FunASR runs of one seed run side by side, one torch thread each, so their wall
times share the machine alike. Writes DIR/results.json and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.fsdd_recipe import link_split  # noqa: E402

RECIPE = ROOT / "examples" / "fsdd"
BASE = RECIPE / "base"
SPEAKERS = ["george", "jackson", "lucas", "nicolas"]


def recipe_settings() -> dict:
    """The fine-tuning settings run.sh passes (`++section.key=value`), read from the script itself."""
    text = (RECIPE / "run.sh").read_text()
    block = text[text.index("start=(++"):text.index(")", text.index("start=(++"))]
    out = {}
    for item in block[len("start=("):].split():
        key, _, value = item[2:].partition("=")
        out[key] = yaml.safe_load(value)
    return out


def timed(cmd: list[str], log: Path, env: dict) -> subprocess.Popen:
    f = open(log, "w")
    proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    proc.started, proc.log = time.time(), log
    return proc


def finish(proc: subprocess.Popen) -> tuple[float, float]:
    """Wall seconds and CPU seconds (the process and everything it waited for)."""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{proc.args[:4]} failed:\n" + proc.log.read_text()[-3000:])
    return round(time.time() - proc.started, 1), round(usage.ru_utime + usage.ru_stime, 1)


def wer_of(text: str) -> float:
    last = text.strip().splitlines()[-1]
    if not last.startswith("WER "):
        raise SystemExit(f"no WER in: {last}")
    return float(last.split()[1].rstrip("%"))


def evaluate(model: Path, data: Path, env: dict) -> float:
    out = subprocess.run([sys.executable, "-m", "paratune", "eval", "--model", str(model), "--data", str(data)],
                         capture_output=True, text=True, env=env, check=True)
    return wer_of(out.stdout)


def run_funasr(args) -> None:
    """In its own process: FunASR's train_ds from the base on the recipe's manifests."""
    import torch

    import funasr.train_utils.trainer_ds as trainer_ds
    from funasr.bin import train_ds
    from funasr.download.download_model_from_hub import download_model

    # train_ds.py sets `trainer.device` to the GPU index whatever `device` says: pin it to the CPU
    trainer_ds.Trainer.device = property(lambda self: "cpu", lambda self, value: None)
    torch.set_num_threads(1)
    s = recipe_settings()
    lfr_m = yaml.safe_load((BASE / "config.yaml").read_text())["frontend_conf"]["lfr_m"]
    kwargs = download_model(is_training=True, model=str(BASE), device="cpu", ncpu=1,
                            train_data_set_list=str(args.data / "fit.jsonl"),
                            valid_data_set_list=str(args.data / "heldout.jsonl"), output_dir=str(args.exp))
    kwargs["dataset_conf"] = {**kwargs.get("dataset_conf", {}), "batch_type": "example",
                              "batch_size": s["dataset_conf.max_batch"], "max_token_length": 100000,
                              "sort_size": 1024, "buffer_size": 1024, "shuffle": True, "num_workers": 1,
                              "batch_sampler": "BatchSampler", "index_ds": "IndexDSJsonl"}
    kwargs["train_conf"] = {**kwargs.get("train_conf", {}), "max_epoch": s["train_conf.max_epoch"],
                            "keep_nbest_models": s["train_conf.keep_nbest_models"],
                            "avg_nbest_model": s["train_conf.avg_nbest_model"], "avg_keep_nbest_models_type": "acc",
                            "log_interval": 50, "validate_interval": 10**6, "save_checkpoint_interval": 10**6,
                            "use_fp16": False, "grad_clip": 5.0, "accum_grad": 1}
    kwargs["optim"], kwargs["optim_conf"] = "adamw", {"lr": s["optim_conf.lr"], "weight_decay": 0.0}
    kwargs["scheduler"], kwargs["scheduler_conf"] = "warmuplr", {"warmup_steps": s["scheduler_conf.warmup_steps"]}
    # paratune's SpecAugment (paratune/data/specaug.py): one band of 0-30 mel bins in every stacked frame, one
    # run of 0-4 LFR frames. FunASR's mask widths are randint(lo, hi): hi is excluded; its freq mask repeats
    # over lfr_rate + 1 stacked frames (paraformer-large: lfr_m 7, lfr_rate 6); its time mask is in LFR frames.
    kwargs["specaug"] = "SpecAugLFR"
    kwargs["specaug_conf"] = {"apply_time_warp": False, "apply_freq_mask": True, "freq_mask_width_range": [0, 31],
                              "lfr_rate": lfr_m - 1, "num_freq_mask": 1, "apply_time_mask": True,
                              "time_mask_width_range": [0, 5], "num_time_mask": 1}
    kwargs["seed"] = args.seed
    train_ds.main(**kwargs)


def funasr_model(exp: Path, dest: Path) -> Path:
    """FunASR's averaged weights in a copy of the base directory."""
    import torch

    state = torch.load(exp / f"model.pt.avg{recipe_settings()['train_conf.avg_nbest_model']}", map_location="cpu",
                       weights_only=True)
    shutil.copytree(BASE, dest, dirs_exist_ok=True)
    torch.save(state.get("state_dict", state), dest / "model.pt")
    return dest


def speaker_runs(speaker: str, out: Path, seeds: list[int], skip: set[str]) -> dict:
    """Zero-shot, and per seed the recipe's fine-tuning beside FunASR's on the same manifests (without
    FunASR: two seeds side by side)."""
    root = out / speaker
    env = {**os.environ, "PARATUNE": f"{sys.executable} -m paratune", "PYTHONPATH": str(ROOT),
           "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    result = {"paratune": [], "funasr": []}
    if "paratune" not in skip:
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        train, test = link_split(root, speaker)

    def recipe(seed: int) -> subprocess.Popen:
        return timed(["bash", str(RECIPE / "run.sh"), str(train), str(test), str(root / f"paratune_{seed}"),
                      f"++train_conf.seed={seed}"], root / f"paratune_{seed}.log", env)

    def collect(seed: int, proc: subprocess.Popen) -> None:
        wall, cpu = finish(proc)
        log = (root / f"paratune_{seed}.log").read_text()
        # the finetune command's own time, from its last line ("wrote ...; 139 s"): FunASR's counterpart
        train_s = float(re.findall(r"wrote .*; (\d+) s$", log, re.M)[-1])
        result["paratune"].append({"seed": seed, "wer": wer_of(log), "wall_s": wall, "cpu_s": cpu,
                                   "train_s": train_s})

    if "paratune" in skip:
        return {"funasr": funasr_only(root, seeds, env), "zero_shot": evaluate(BASE, manifest(root, seeds[0]), env)}
    waves = [[s] for s in seeds] if "funasr" not in skip else [seeds[i:i + 2] for i in range(0, len(seeds), 2)]
    for wave in waves:
        procs = [(seed, recipe(seed)) for seed in wave]
        fproc = None if "funasr" in skip else funasr_beside(procs[0][1], root, wave[0], env)
        for seed, proc in procs:
            collect(seed, proc)
        if fproc is not None:
            wall, cpu = finish(fproc)
            model = funasr_model(root / f"funasr_{wave[0]}", root / f"funasr_{wave[0]}_model")
            result["funasr"].append({"seed": wave[0], "wer": evaluate(model, manifest(root, wave[0]), env),
                                     "wall_s": wall, "cpu_s": cpu})
        print(speaker, "seeds", wave, result, flush=True)
    result["zero_shot"] = evaluate(BASE, manifest(root, seeds[0]), env)
    return result


def manifest(root: Path, seed: int) -> Path:
    return root / f"paratune_{seed}" / "data" / "test" / "data.jsonl"


def funasr_only(root: Path, seeds: list[int], env: dict) -> list[dict]:
    """FunASR's runs, two seeds side by side, on the manifests an earlier run of the recipe wrote."""
    out = []
    for wave in (seeds[i:i + 2] for i in range(0, len(seeds), 2)):
        procs = []
        for seed in wave:
            data, fexp = root / f"paratune_{seed}" / "data", root / f"funasr_{seed}"
            shutil.rmtree(fexp, ignore_errors=True)
            fexp.mkdir()
            procs.append((seed, timed([sys.executable, __file__, "--run-funasr", "--data", str(data / "train"),
                                       "--exp", str(fexp), "--seed", str(seed)], root / f"funasr_{seed}.log", env)))
        for seed, proc in procs:
            wall, cpu = finish(proc)
            model = funasr_model(root / f"funasr_{seed}", root / f"funasr_{seed}_model")
            out.append({"seed": seed, "wer": evaluate(model, manifest(root, seed), env), "wall_s": wall, "cpu_s": cpu})
        print(root.name, "FunASR seeds", wave, out, flush=True)
    return out


def funasr_beside(proc: subprocess.Popen, root: Path, seed: int, env: dict) -> subprocess.Popen | None:
    """FunASR's run of `seed`, started once the recipe has written its manifests (None if it ended first)."""
    data = root / f"paratune_{seed}" / "data"
    while True:
        if (data / "train" / "heldout.jsonl").exists() and (data / "test" / "data.jsonl").exists():
            time.sleep(1)
            fexp = root / f"funasr_{seed}"
            fexp.mkdir()
            return timed([sys.executable, __file__, "--run-funasr", "--data", str(data / "train"), "--exp", str(fexp),
                          "--seed", str(seed)], root / f"funasr_{seed}.log", env)
        if os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
            return None  # the recipe ended early: finish() reports it
        time.sleep(2)


def scratch_runs(speakers: list[str], out: Path) -> dict:
    """The recipe from scratch (seed 0), two held-out speakers at a time, one torch thread each."""
    env = {**os.environ, "PARATUNE": f"{sys.executable} -m paratune", "PYTHONPATH": str(ROOT),
           "OMP_NUM_THREADS": "1", "FROM_SCRATCH": "1"}
    results = {}
    for pair in (speakers[i:i + 2] for i in range(0, len(speakers), 2)):
        procs = {}
        for speaker in pair:
            root = out / speaker
            shutil.rmtree(root / "scratch", ignore_errors=True)
            procs[speaker] = timed(["bash", str(RECIPE / "run.sh"), str(root / "train"), str(root / "test"),
                                    str(root / "scratch")], root / "scratch.log", env)
        for speaker, proc in procs.items():
            wall, cpu = finish(proc)
            results[speaker] = {"wer": wer_of((out / speaker / "scratch.log").read_text()), "wall_s": wall,
                                "cpu_s": cpu}
    return results


def stats(values: list[float]) -> str:
    if not values:
        return "-"
    mean = sum(values) / len(values)
    return f"{mean:.2f} % ({min(values):.2f}-{max(values):.2f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--speakers", default=",".join(SPEAKERS))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--skip", default="", help="comma-separated: scratch, funasr, paratune (FunASR alone on the "
                                               "manifests of an earlier run in the same --out)")
    ap.add_argument("--reuse", type=Path, help="an earlier run's results.json: the skipped kinds' figures come from "
                                               "it (valid while the base, FSDD and run.sh's ++ settings are the same)")
    ap.add_argument("--run-funasr", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--exp", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.run_funasr:
        run_funasr(args)
        return
    seeds = [int(s) for s in args.seeds.split(",")]
    skip = set(filter(None, args.skip.split(",")))
    results = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "settings": recipe_settings()}
    speakers = args.speakers.split(",")
    for speaker in speakers:
        results[speaker] = speaker_runs(speaker, args.out, seeds, skip)
        (args.out / "results.json").write_text(json.dumps(results, indent=1))
    if "scratch" not in skip:
        for speaker, result in scratch_runs(speakers, args.out).items():
            results[speaker]["scratch"] = result
    if args.reuse:
        earlier = json.loads(args.reuse.read_text())
        if earlier["settings"] != results["settings"]:
            raise SystemExit(f"{args.reuse}: run with other fine-tuning settings: {earlier['settings']}")
        for speaker in speakers:
            for kind in skip & set(earlier.get(speaker, {})):
                results[speaker][kind] = earlier[speaker][kind]
        results["reused"] = {"from": str(args.reuse), "date": earlier["date"], "kinds": sorted(skip)}
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    print("| held-out speaker | base alone | fine-tuned (paratune) | fine-tuned (FunASR) | from scratch |")
    print("|---|---|---|---|---|")
    for speaker in args.speakers.split(","):
        r = results[speaker]
        scratch = f"{r['scratch']['wer']:.2f} %" if "scratch" in r else "-"
        print(f"| {speaker} | {r['zero_shot']:.2f} % | {stats([x['wer'] for x in r['paratune']])} | "
              f"{stats([x['wer'] for x in r['funasr']])} | {scratch} |")
    for who, what in (("paratune", "run.sh: prepare, finetune, eval"), ("funasr", "train_ds")):
        runs = [x for s in speakers for x in results[s][who]]
        if runs:
            print(f"{who} ({what}; one torch thread): wall {sum(x['wall_s'] for x in runs) / len(runs) / 60:.2f} min "
                  f"mean, CPU {sum(x['cpu_s'] for x in runs) / len(runs) / 60:.2f} min mean, "
                  f"{max(x['cpu_s'] for x in runs) / 60:.2f} min most; the trainer alone (finetune, train_ds) "
                  f"{sum(x.get('train_s', x['wall_s']) for x in runs) / len(runs) / 60:.2f} min mean wall")


if __name__ == "__main__":
    main()
