"""`paratune demo`: the bundled tiny model fine-tuned on the bundled set in a condition it never heard
(other voices, fast speech, 15-25 dB noise; see paratune/assets/README.md), through the same
`paratune finetune` users run. Prints the CER before and after, and where the model and the memory
plot are."""
from __future__ import annotations

import sys
import time
from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
MODEL = ASSETS / "demo_model"
DATA = ASSETS / "finetune"


def cer(model_dir: Path) -> float:
    import torch

    from paratune.modeldir import load_model
    from paratune.train.validation import load_split, validate
    asr = load_model(model_dir)
    rows, lengths, _ = load_split([DATA / "test.jsonl"], asr)
    return validate(asr, rows, lengths, torch.device("cpu"))["cer"]


def run_demo(output: Path, budget: str = "2GiB") -> int:
    from paratune.memory.plan import parse_bytes
    from paratune.train.finetune import FinetuneOptions, finetune
    start = time.time()
    say = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    say(f"paratune demo: fine-tune {MODEL.name} (a tiny Mandarin Paraformer) on {DATA.name}/train.jsonl, "
        "80 clips in a condition it never heard (other voices, fast speech, noise)")
    before = cer(MODEL)
    say(f"CER on the 24 test clips before fine-tuning: {100 * before:.2f} %\n")
    code = finetune(FinetuneOptions(model=MODEL, train=[DATA / "train.jsonl"], valid=[DATA / "dev.jsonl"],
                                    output=Path(output), budget=parse_bytes(budget), device="cpu",
                                    config=DATA / "finetune.yaml", overwrite=True))  # a demo may run again
    if code != 0:
        return code
    after = cer(output / "final")
    say(f"\nCER on the 24 test clips: {100 * before:.2f} % before, {100 * after:.2f} % after fine-tuning "
        f"({time.time() - start:.0f} s)")
    say(f"model:       {output / 'final'} (a FunASR model directory: paratune transcribe or funasr.AutoModel)")
    say(f"memory plot: {output / 'memory.png'} (and memory.csv; `paratune doctor {output / 'memory.csv'}`)")
    say(f"ledger:      {output / 'ledger.jsonl'}")
    return 0 if after < before else 1
