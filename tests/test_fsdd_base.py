"""examples/fsdd: the committed base model, and the recipe fine-tuning it (loss falls, FunASR loads the export)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from paratune.modeldir import load_model
from paratune.train.validation import load_split, validate

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "examples" / "fsdd"


def test_base_is_a_small_funasr_model_directory_of_the_recipe():
    base = RECIPE / "base"
    assert sorted(p.name for p in base.iterdir()) == ["README.md", "am.mvn", "config.yaml", "model.pt", "tokens.json"]
    assert sum(p.stat().st_size for p in base.iterdir()) <= 10 * 2**20
    config = yaml.safe_load((base / "config.yaml").read_text())
    scratch = yaml.safe_load((RECIPE / "model" / "config.yaml").read_text())
    # the from-scratch recipe and the base share what the data is turned into: features and tokens (the
    # export pins dither to 0, paratune's inference setting, where FunASR's default is 1)
    assert config["model"] == "Paraformer" and config["frontend_conf"] == {**scratch["frontend_conf"], "dither": 0.0}
    assert json.loads((base / "tokens.json").read_text()) == json.loads((RECIPE / "model" / "tokens.json").read_text())
    asr = load_model(base)
    assert sum(p.numel() for p in asr.model.parameters()) > 10**6  # pretrained weights, not the tiny scratch model


def _link(shared_data: Path, folder: Path, speakers: tuple[str, ...], per_digit: int) -> list[Path]:
    folder.mkdir()
    files = [p for p in sorted((shared_data / "fsdd").glob("*.wav"))
             if p.stem.split("_")[1] in speakers and int(p.stem.split("_")[2]) < per_digit]
    for p in files:
        (folder / p.name).symlink_to(p)
    return [folder / p.name for p in files]


@pytest.mark.slow
@pytest.mark.reference
def test_recipe_fine_tunes_the_base_loss_falls_and_funasr_decodes_the_export_alike(shared_data, funasr, tmp_path,
                                                                                   capsys):
    from tests.test_modeldir import funasr_texts, paratune_texts

    train = _link(shared_data, tmp_path / "train", ("george", "jackson", "lucas"), 2)
    test = _link(shared_data, tmp_path / "test", ("nicolas",), 1)
    exp = tmp_path / "exp"
    env = {**os.environ, "PARATUNE": f"{sys.executable} -m paratune", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run(["bash", str(RECIPE / "run.sh"), str(tmp_path / "train"), str(tmp_path / "test"), str(exp),
                          "++train_conf.max_epoch=3", "++scheduler_conf.warmup_steps=2", "++dataset_conf.max_batch=8",
                          "++dataset_conf.num_workers=0"], env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1].startswith("WER ")
    assert len(train) == 60 and len(test) == 10
    before, after = load_model(RECIPE / "base"), load_model(exp / "final")
    rows, lengths, errors = load_split([exp / "data" / "train" / "fit.jsonl"], before)
    assert not errors and len(rows) == 54
    loss_before = validate(before, rows, lengths, "cpu")["loss"]
    loss_after = validate(after, rows, lengths, "cpu")["loss"]
    assert loss_after < 0.9 * loss_before, (loss_before, loss_after)
    assert funasr_texts(exp / "final", test) == paratune_texts(exp / "final", test, capsys)
