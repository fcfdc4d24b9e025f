#!/usr/bin/env python3
"""Build the demo's fine-tuning set (`paratune/assets/finetune/`): the bundled model's domain, spoken in
a condition it never heard, so that `make demo` can show fine-tuning fix it.

    pip install espeakng-loader
    python scripts/make_finetune_set.py      # seeded: a rerun gives the same files

The condition: voice variants the demo model was not trained on (`grandpa`, `aunty`, `m8`, `f5`),
fast speech (250-300 words per minute; training had 120-210) and a white-noise floor at 15-25 dB SNR
(training: -65 to -45 dBFS, i.e. near silence). Sentences come from the demo model's templates
(its 183 characters), with a seed of their own: `train/` 80 sentences, `dev/` 12 others (validation: picks the
epochs to average), `test/` 24 more (CER before and after).
Audio is 16 kHz FLAC (lossless, half the size of wav); `train.jsonl`, `dev.jsonl`, `test.jsonl` are FunASR
manifests with paths relative to themselves.
"""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import numpy as np
import soundfile as sf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_demo_model import Espeak, make_sentences, speak, FS  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "paratune" / "assets" / "finetune"
VARIANTS = ["grandpa", "aunty", "m8", "f5"]


def render(tts: Espeak, text: str, rng: random.Random, variant: str) -> tuple[np.ndarray, str]:
    x, lead, tail, (rate, _, _) = speak(tts, text, rng, variant, rate=(250, 300), lead=(0.1, 0.3), gain=(0.4, 0.8))
    snr = rng.uniform(15, 25)
    power = float(np.mean(x[lead:len(x) - tail] ** 2))
    noise = np.random.default_rng(rng.getrandbits(32)).standard_normal(len(x)).astype(np.float32)
    x = x + noise * np.sqrt(power / 10 ** (snr / 10))
    return np.clip(x, -1, 1).astype(np.float32), f"cmn+{variant} rate {rate} SNR {snr:.0f} dB"


def main() -> int:
    rng = random.Random(20261126)
    tokens = set(json.loads((ROOT / "paratune/assets/demo_model/tokens.json").read_text(encoding="utf-8")))
    pool, _ = make_sentences(400, 0, rng)
    known = [s for s in pool if set(s) <= tokens]  # the templates reach a few characters the model lacks
    train, test, dev = known[:80], known[80:104], known[104:116]
    tts = Espeak()
    for split, texts in (("train", train), ("dev", dev), ("test", test)):
        folder = OUT / split
        folder.mkdir(parents=True, exist_ok=True)
        lines = []
        for i, text in enumerate(texts):
            x, desc = render(tts, text, rng, VARIANTS[i % len(VARIANTS)])
            key = f"{split}_{i:03d}"
            sf.write(str(folder / f"{key}.flac"), x, FS, subtype="PCM_16")
            lines.append(json.dumps({"key": key, "source": f"{split}/{key}.flac", "source_len": int(len(x) / FS * 100),
                                     "target": text, "target_len": len(text), "condition": desc},
                                    ensure_ascii=False))
        (OUT / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        print(f"{split}: {len(texts)} clips, {sum(sf.info(str(p)).duration for p in folder.glob('*.flac')):.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
