"""A reference point for the FSDD recipe: a plain CNN digit classifier on the same speaker split.

    python benchmarks/fsdd_cnn.py [--test-speaker nicolas] [--epochs 30]

The recipe (examples/fsdd/run.sh, benchmarks/fsdd_recipe.py) trains a Paraformer on three speakers and
scores the fourth. This script asks how hard that split is for a model built for the job: 80 log-mel
bins (paratune's frontend, no LFR), normalised with the training set's statistics, three 1-D
convolutions, mean pooling over time and a 10-way softmax, trained with AdamW and a frequency mask.
It prints the held-out speaker's error rate (= WER: one word per recording) every 5 epochs.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from paratune.data.audio import load_audio
from paratune.data.frontend import WavFrontend

ROOT = Path(__file__).resolve().parents[1]
FSDD = Path(os.environ.get("PARATUNE_SHARED_DATA", ROOT.parent / "shared" / "data")) / "fsdd"


def load(frontend, speakers):
    feats, labels = [], []
    for p in sorted(FSDD.glob("*.wav")):
        digit, speaker, _ = p.stem.split("_")
        if speaker in speakers:
            feats.append(frontend.features(load_audio(p, frontend.fs)))
            labels.append(int(digit))
    return feats, torch.tensor(labels)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--test-speaker", default="nicolas")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    speakers = {p.stem.split("_")[1] for p in FSDD.glob("*.wav")}
    if args.test_speaker not in speakers:
        raise SystemExit(f"no recordings of speaker {args.test_speaker!r} in {FSDD}")
    frontend = WavFrontend(fs=16000, n_mels=80).eval()
    train_x, train_y = load(frontend, speakers - {args.test_speaker})
    test_x, test_y = load(frontend, {args.test_speaker})
    every = torch.cat(train_x)
    mean, std = every.mean(0), every.std(0)

    def pad(xs, augment=False):
        t = max(x.shape[0] for x in xs)
        out, mask = torch.zeros(len(xs), 80, t), torch.zeros(len(xs), 1, t)
        for i, x in enumerate(xs):
            out[i, :, :x.shape[0]] = ((x - mean) / std).T
            mask[i, :, :x.shape[0]] = 1
        if augment:
            f0 = int(rng.integers(0, 60))
            out[:, f0:f0 + int(rng.integers(0, 20))] = 0
        return out, mask

    conv = nn.Sequential(nn.Conv1d(80, 128, 5, padding=2), nn.ReLU(), nn.BatchNorm1d(128), nn.Dropout(0.2),
                         nn.Conv1d(128, 128, 5, padding=2), nn.ReLU(), nn.BatchNorm1d(128), nn.Dropout(0.2),
                         nn.Conv1d(128, 128, 5, padding=2), nn.ReLU())
    head = nn.Linear(128, 10)
    opt = torch.optim.AdamW([*conv.parameters(), *head.parameters()], 1e-3, weight_decay=0.01)

    def logits(xs, augment=False):
        x, mask = pad(xs, augment)
        h = conv(x)
        return head((h * mask).sum(2) / mask.sum(2))

    print(f"train: {len(train_x)} recordings ({', '.join(sorted(speakers - {args.test_speaker}))}); "
          f"test: {len(test_x)} ({args.test_speaker})")
    for epoch in range(args.epochs):
        conv.train()
        order = torch.randperm(len(train_x))
        for i in range(0, len(order), 32):
            idx = order[i:i + 32]
            loss = nn.functional.cross_entropy(logits([train_x[j] for j in idx], True), train_y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        if epoch % 5 == 4 or epoch == args.epochs - 1:
            conv.eval()
            with torch.no_grad():
                err = (logits(test_x).argmax(1) != test_y).float().mean().item()
            print(f"epoch {epoch + 1}: WER {100 * err:.2f}% on {args.test_speaker}", flush=True)


if __name__ == "__main__":
    main()
