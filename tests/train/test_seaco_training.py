"""SeACo-Paraformer fine-tuning end to end: hotwords sampled from the transcripts (FunASR's defaults), an
OOM split in each epoch (in forward and in backward), SIGTERM mid-epoch and --resume: the ledger, the hotwords of every step, the
validation losses and the final weights equal an uninterrupted run's. A tiny model (d=32) trained from
scratch on 16 clips of 2-5 FSDD digits (4 steps of 4 per epoch)."""
from __future__ import annotations

import json
import os
import random
import re
import signal
from pathlib import Path

import pytest
import soundfile as sf
import torch
import yaml

from paratune.cli import main
from paratune.data.hotwords import HotwordSampling, sample_spans, span_rng
from paratune.model.build import paraformer_config
from paratune.train.finetune import Finetune
from tests.data.digits import concatenate, fsdd_clips

TOKENS = ["<blank>", "<s>", "</s>", "<unk>", *map(str, range(10)), "<no_bias>"]
NO_BIAS = len(TOKENS) - 1


def seaco_config(d: int = 32) -> dict:
    """paraformer-zh's layout (../shared/data/paraformer_family/seaco/config.yaml) at a tiny size."""
    config = paraformer_config(d, 2, 1, 2 * d)
    config["model"] = "SeacoParaformer"
    config["model_conf"].update(inner_dim=d, bias_encoder_type="lstm", bias_encoder_bid=False, seaco_lsm_weight=0.1,
                                seaco_length_normalized_loss=True, train_decoder=True, seaco_weight=0.01,
                                NO_BIAS=NO_BIAS)
    config["predictor"] = "CifPredictorV3"
    config["predictor_conf"].update(smooth_factor2=0.25, noise_threshold2=0.01, upsample_times=3,
                                    use_cif1_cnn=False, upsample_type="cnn_blstm")
    config["seaco_decoder"] = "ParaformerSANMDecoder"
    config["seaco_decoder_conf"] = {"attention_heads": 4, "linear_units": 2 * d, "num_blocks": 1, "dropout_rate": 0.1,
                                    "positional_dropout_rate": 0.1, "self_attention_dropout_rate": 0.1,
                                    "src_attention_dropout_rate": 0.1, "kernel_size": 21, "sanm_shfit": 0,
                                    "use_output_layer": False, "wo_input_layer": True}
    config["tokenizer"], config["tokenizer_conf"] = "CharTokenizer", {"unk_symbol": "<unk>"}
    return config


def _clips(shared_data: Path, folder: Path, speaker: str, n: int, seed: int) -> Path:
    """n clips of 2-5 digits of one speaker and their transcripts (a tsv for `paratune prepare`)."""
    folder.mkdir(parents=True)
    rng, clips, lines = random.Random(seed), fsdd_clips(shared_data / "fsdd", (speaker,)), []
    for i in range(n):
        wave, text, _ = concatenate(clips, rng, rng.randint(2, 5))
        sf.write(folder / f"{speaker}{i:02d}.wav", wave, 16000)
        lines.append(f"{speaker}{i:02d}.wav\t{text}\n")
    (folder.parent / f"{folder.name}.tsv").write_text("".join(lines))
    return folder.parent / f"{folder.name}.tsv"


@pytest.fixture(scope="module")
def setup(shared_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("seaco")
    model = tmp / "model"
    model.mkdir()
    (model / "config.yaml").write_text(yaml.safe_dump(seaco_config(), allow_unicode=True))
    (model / "tokens.json").write_text(json.dumps(TOKENS))
    data = {}
    for split, speaker, n in (("train", "george", 16), ("valid", "lucas", 4)):
        tsv = _clips(shared_data, tmp / split, speaker, n, seed=len(split))
        assert main(["prepare", str(tmp / split), "--transcripts", str(tsv), "--model", str(model),
                     "--output", str(tmp / f"{split}_data")]) == 0
        data[split] = tmp / f"{split}_data" / "data.jsonl"
    return {"model": model, **data}


def _finetune(setup, out: Path, *extra) -> int:
    # OOMs at steps 1 (in forward), 2 (backward) and 6 (forward: the injector counts anew after a resume)
    return main(["finetune", "--model", str(setup["model"]), "--from-scratch", "--train", str(setup["train"]),
                 "--valid", str(setup["valid"]), "--output", str(out), "--budget", "1GiB", "--inject-oom", "1,2,6",
                 "++train_conf.max_epoch=2", "++dataset_conf.max_batch=4", "++dataset_conf.num_workers=0",
                 "++train_conf.seed=5", *extra])


def _record(monkeypatch, steps: list, stop_at: int | None = None) -> None:
    """Each step's micro-batches' (keys, hotword spans, hotword rows); SIGTERM to itself after `stop_at`."""
    real = Finetune.train_step

    def train_step(self, group, n_batches):
        steps.append((self.step + 1, [(m.batch["keys"], m.batch["hotword_spans"], int(m.batch["hotword_pad"].shape[0]))
                                      for m in group]))
        real(self, group, n_batches)
        if self.step == stop_at:
            os.kill(os.getpid(), signal.SIGTERM)
    monkeypatch.setattr(Finetune, "train_step", train_step)


def _ledger(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "ledger.jsonl").read_text().splitlines()]


def _validation(err: str) -> list[str]:
    return re.findall(r"ep\d validation: loss [\d.]+", err)


@pytest.mark.slow
def test_seaco_finetune_samples_hotwords_and_resumes_exactly(setup, tmp_path, monkeypatch, capsys):
    whole, steps = tmp_path / "whole", []
    with monkeypatch.context() as mp:
        _record(mp, steps)
        assert _finetune(setup, whole) == 0
    err = capsys.readouterr().err
    assert err.count("injected out of memory") == 3, err[-3000:]
    validation = _validation(err)
    assert len(validation) == 2
    # the hotwords are FunASR's sampling of each utterance's target, from (seed, epoch, index) only
    rows = [json.loads(x) for x in setup["train"].read_text().splitlines()]
    index = {r["key"]: i for i, r in enumerate(rows)}
    spans = [s for _, group in steps for _, batch_spans, _ in group for s in batch_spans]
    assert sum(s != [-1] for s in spans) >= len(spans) // 2  # 3 in 4 get one
    for step, group in steps:
        epoch = (step - 1) // 4
        for keys, batch_spans, n_hotwords in group:
            assert batch_spans == [sample_spans(len(rows[index[k]]["target"]), span_rng(5, epoch, index[k]),
                                                HotwordSampling(no_bias=NO_BIAS)) for k in keys]
            assert n_hotwords == sum(len(s) // 2 for s in batch_spans if s != [-1]) + 1  # + [sos]

    part, resumed = tmp_path / "part", []
    with monkeypatch.context() as mp:
        _record(mp, resumed, stop_at=3)
        assert _finetune(setup, part) == 143
    assert "interrupted at epoch 0 step 3" in capsys.readouterr().err
    with monkeypatch.context() as mp:
        _record(mp, resumed)
        assert _finetune(setup, part, "--resume") == 0
    assert resumed == steps  # the same batches and hotwords, step by step, after the resume too
    assert _validation(capsys.readouterr().err) == validation  # validation's hotwords too
    assert _ledger(part) == _ledger(whole)
    a = torch.load(whole / "final" / "model.pt", weights_only=True)
    b = torch.load(part / "final" / "model.pt", weights_only=True)
    assert a.keys() == b.keys() and any(k.startswith("bias_encoder.") for k in a)
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a)
