"""`paratune finetune` on BiCifParaformer and SeacoParaformer: the OOM split, LoRA, torchrun (DDP, FSDP)
and the exported directory, on real spoken digits strung into numbers (so SeACo samples hotwords)."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile as sf
import yaml

from paratune.cli import main
from tests.data.digits import concatenate, fsdd_clips

ROOT = Path(__file__).resolve().parents[2]
RECIPE_MODEL = ROOT / "examples" / "fsdd" / "model"
SETTINGS = ["++dataset_conf.max_batch=8", "++dataset_conf.num_workers=0", "++train_conf.log_interval=1000"]


def family_dir(kind: str, out: Path, shared_data: Path) -> Path:
    """The FSDD recipe's small model as a BiCifParaformer or SeacoParaformer directory (no weights)."""
    config = yaml.safe_load((RECIPE_MODEL / "config.yaml").read_text(encoding="utf-8"))
    family = yaml.safe_load((shared_data / "paraformer_family" / kind / "config.yaml").read_text(encoding="utf-8"))
    d = config["encoder_conf"]["output_size"]
    config["model"], config["predictor"] = family["model"], "CifPredictorV3"
    config["predictor_conf"].update({k: v for k, v in family["predictor_conf"].items() if k != "idim"})
    tokens = json.loads((RECIPE_MODEL / "tokens.json").read_text(encoding="utf-8"))
    if kind == "seaco":
        tokens.append("<nobias>")
        config["model_conf"].update({**{k: v for k, v in family["model_conf"].items() if k not in config["model_conf"]},
                                     "inner_dim": d, "NO_BIAS": len(tokens) - 1})
        config["seaco_decoder"] = "ParaformerSANMDecoder"
        config["seaco_decoder_conf"] = {**family["seaco_decoder_conf"], "linear_units": 2 * d, "num_blocks": 2,
                                        "att_layer_num": 2, "kernel_size": 11}
    out.mkdir(parents=True)
    (out / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    (out / "tokens.json").write_text(json.dumps(tokens), encoding="utf-8")
    return out


@pytest.fixture(scope="module")
def numbers(shared_data, tmp_path_factory):
    """32 training clips of 2-5 digits (three speakers) and 8 validation clips of a fourth."""
    tmp = tmp_path_factory.mktemp("numbers")
    rng = random.Random(0)
    out = {}
    for split, speakers, n in (("train", ("george", "jackson", "nicolas"), 32), ("valid", ("lucas",), 8)):
        clips = fsdd_clips(shared_data / "fsdd", speakers)
        rows = []
        for i in range(n):
            wave, text, _ = concatenate(clips, rng, rng.randint(2, 5))
            path = tmp / f"{split}_{i}.wav"
            sf.write(path, wave, 16000)
            rows.append(json.dumps({"key": f"{split}_{i}", "source": str(path), "target": text}))
        out[split] = tmp / f"{split}.jsonl"
        out[split].write_text("\n".join(rows) + "\n", encoding="utf-8")
    return out


def _ledger(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["bicif", "seaco"])
def test_finetune_splits_on_oom_trains_lora_and_exports(kind, numbers, shared_data, tmp_path, capsys, monkeypatch):
    import torch

    from paratune.modeldir import load_model
    model = family_dir(kind, tmp_path / "model", shared_data)
    exp = tmp_path / "exp"
    assert main(["finetune", "--model", str(model), "--from-scratch", "--train", str(numbers["train"]),
                 "--valid", str(numbers["valid"]), "--output", str(exp), "--budget", "1GiB",
                 "--inject-oom", "2,4", "++train_conf.max_epoch=2", *SETTINGS]) == 0, capsys.readouterr().err[-3000:]
    err = capsys.readouterr().err
    assert err.count("injected out of memory") == 2
    keys = sorted(json.loads(x)["key"] for x in numbers["train"].read_text().splitlines())
    ledger = _ledger(exp / "ledger.jsonl")
    for epoch in range(2):  # every utterance exactly once per epoch, through the splits
        assert sorted(r["key"] for r in ledger if r["epoch"] == epoch) == keys
    asr = load_model(exp / "final")
    assert type(asr.model).__name__ == {"bicif": "BiCifParaformer", "seaco": "SeacoParaformer"}[kind]
    wav = json.loads(numbers["valid"].read_text().splitlines()[0])["source"]
    (result,) = asr.transcribe_files([wav], timestamps=True)
    # a span per word, in order (FunASR gives none to a token that is neither a letter nor CJK, like
    # the <nobias> an undertrained SeACo can still emit)
    assert 0 < len(result.timestamps) <= len(result.text.split())
    assert all(a <= b for a, b in result.timestamps) and result.timestamps == sorted(result.timestamps)
    if kind == "seaco":
        assert asr.transcribe_files([wav], hotwords="1 2") is not None

    lora = tmp_path / "lora"
    assert main(["finetune", "--model", str(exp / "final"), "--train", str(numbers["train"]), "--output", str(lora),
                 "--budget", "1GiB", "++train_conf.max_epoch=1", "++lora.r=4", *SETTINGS]) == 0
    before = torch.load(exp / "final" / "model.pt", weights_only=True)
    after = torch.load(lora / "final" / "model.pt", weights_only=True)
    assert set(before) == set(after)  # the adapters are merged into FunASR's parameter names
    assert any(not torch.equal(before[k], after[k]) for k in before)
    load_model(lora / "final")


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_seaco_under_torchrun_loses_nothing(numbers, shared_data, tmp_path, fsdp):
    model = family_dir("seaco", tmp_path / "model", shared_data)
    exp = tmp_path / "exp"
    env = dict(os.environ)
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "paratune", "finetune", "--model", str(model), "--from-scratch",
                          "--train", str(numbers["train"]), "--valid", str(numbers["valid"]), "--output", str(exp),
                          "--budget", "1GiB", "--inject-oom", "2", *(["--fsdp"] if fsdp else []),
                          "++train_conf.max_epoch=1", *SETTINGS],
                         env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    keys = sorted(json.loads(x)["key"] for x in numbers["train"].read_text().splitlines())
    assert sorted(r["key"] for r in _ledger(exp / "ledger.jsonl")) == keys
    for rank in (0, 1):
        assert out.stderr.count(f"[rank {rank}] step 2: injected out of memory") == 1
    assert (exp / "final" / "model.pt").exists()
