"""The FSDD recipe end to end: train on three speakers, WER on the fourth, and how well the memory
model predicted each tracked training step.

    python benchmarks/fsdd_recipe.py [--keep DIR] [--test-speaker NAME] [--set KEY=VALUE ...] [++key=value ...]

Links george, jackson and lucas's recordings (../shared/data/fsdd) into a training folder and nicolas's
into a test folder (`--test-speaker` holds out another of the four instead; `--test-speaker none` holds
out no voice: FSDD's own split, recordings 0-4 of every speaker for the test, the rest for training),
runs `examples/fsdd/run.sh` (extra arguments go to `paratune finetune`; with FROM_SCRATCH=1 in the
environment the recipe trains from random weights instead of fine-tuning its base), and prints the WER it reports,
wall and CPU time, and from EXP/memory.csv the error of the predicted peak against the tracked peak of
every recorded step. `--keep DIR` keeps the experiment folder (data, logs, final model) in DIR instead
of deleting it. `--set frontend_conf.lfr_n=6` (repeatable) runs a copy of the recipe whose model
`config.yaml` has that value: for what `++` overrides cannot change (the frontend, the model's sizes).
"""
from __future__ import annotations

import csv
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
FSDD = Path(os.environ.get("PARATUNE_SHARED_DATA", ROOT.parent / "shared" / "data")) / "fsdd"


def link_split(root: Path, held_out: str) -> tuple[Path, Path]:
    """root/train and root/test: links to the recordings of the other speakers and of `held_out`
    ("none": recordings 0-4 of every speaker are the test)."""
    train, test = root / "train", root / "test"
    train.mkdir()
    test.mkdir()
    for p in sorted(FSDD.glob("*.wav")):
        _, speaker, index = p.stem.split("_")
        in_test = int(index) < 5 if held_out == "none" else speaker == held_out
        (test if in_test else train).joinpath(p.name).symlink_to(p)
    if not any(test.iterdir()):
        raise SystemExit(f"no recordings of speaker {held_out!r} in {FSDD}")
    return train, test


def main() -> None:
    args, keep, held_out, edits = sys.argv[1:], None, "nicolas", []
    while args[:1] in (["--keep"], ["--test-speaker"], ["--set"]) and len(args) > 1:
        if args[0] == "--keep":
            keep = Path(args[1])
        elif args[0] == "--set":
            edits.append(args[1])
        else:
            held_out = args[1]
        args = args[2:]
    tmp = Path(tempfile.mkdtemp())
    recipe = ROOT / "examples" / "fsdd"
    if edits:
        recipe = tmp / "recipe"
        shutil.copytree(ROOT / "examples" / "fsdd", recipe)
        config = yaml.safe_load((recipe / "model" / "config.yaml").read_text())
        for edit in edits:
            key, _, value = edit.partition("=")
            *path, last = key.split(".")
            node = config
            for k in path:
                node = node.setdefault(k, {})
            node[last] = yaml.safe_load(value)
        (recipe / "model" / "config.yaml").write_text(yaml.safe_dump(config))
    train, test = link_split(tmp, held_out)
    exp = tmp / "exp"
    env = {**os.environ, "PARATUNE": f"{sys.executable} -m paratune", "PARATUNE_CACHE": str(tmp / "cache")}
    start = time.perf_counter()
    out = subprocess.run(["bash", str(recipe / "run.sh"), str(train), str(test), str(exp),
                          *args], env=env, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    if out.returncode != 0:
        raise SystemExit(out.stderr[-3000:])
    rows = list(csv.DictReader(open(exp / "memory.csv")))
    pred = np.array([float(r["predicted"]) for r in rows])
    peak = np.array([float(r["peak"]) for r in rows])
    err = (pred - peak) / peak
    speakers = sorted({p.name.split("_")[1] for p in train.iterdir()})
    tested = "recordings 0-4 of every speaker" if held_out == "none" else held_out
    print(f"train: {len(list(train.iterdir()))} recordings ({', '.join(speakers)}); test: "
          f"{len(list(test.iterdir()))} ({tested}); config edits: {' '.join(edits) or 'none'}; "
          f"overrides: {' '.join(args) or 'none'}")
    print(f"result: {out.stdout.strip().splitlines()[-1]}")
    print(f"wall {wall / 60:.1f} min, CPU {(usage.ru_utime + usage.ru_stime) / 60:.1f} min (user + system, all processes)")
    print(f"memory: {len(rows)} tracked steps, predicted vs tracked peak: mean |error| {100 * np.abs(err).mean():.2f} %, "
          f"tracked above predicted by at most {100 * max(0.0, -err.min()):.2f} %, "
          f"predicted above tracked by at most {100 * err.max():.2f} %")
    print(f"best epochs: {[line for line in out.stderr.splitlines() if 'final model' in line][-1:]}")
    if keep is not None:
        shutil.rmtree(keep, ignore_errors=True)
        shutil.copytree(exp, keep, symlinks=True)
        (keep / "run.log").write_text(out.stderr)
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
