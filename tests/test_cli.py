"""The command line refuses bad arguments with a message, not a traceback or silence (issue 13, defects 12, 14)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import soundfile as sf

from paratune import cli
from paratune.cli import main

MODEL = Path(__file__).resolve().parents[1] / "paratune" / "assets" / "demo_model"
DEMO_WAV = Path(__file__).resolve().parents[1] / "paratune" / "assets" / "demo" / "demo_01.wav"


@pytest.mark.parametrize("argv, message", [
    (["transcribe", "--model", "m", "--batch-size", "0", "x.wav"], "--batch-size: expected an integer >= 1"),
    (["transcribe", "--model", "m", "--batch-size", "-1", "x.wav"], "--batch-size: expected an integer >= 1"),
    (["transcribe", "--model", "m", "--threads", "-1", "x.wav"], "--threads: expected an integer >= 0"),
    (["transcribe", "--model", "m", "--max-duration", "0", "x.wav"], "--max-duration: expected a number > 0"),
    (["prepare", "x", "--model", "m", "--output", "o", "--workers", "0"], "--workers: expected an integer >= 1"),
    (["prepare", "x", "--model", "m", "--output", "o", "--max-duration", "-5"], "--max-duration: expected a number > 0"),
    (["prepare", "x", "--model", "m", "--output", "o", "--max-duration", "nan"], "--max-duration: expected a number"),
    (["plan", "--model", "m", "--data", "d", "--budget", "1GiB", "--world-size", "0"], "--world-size: expected"),
])
def test_bad_numbers_are_refused_by_the_parser(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.fixture
def no_cuda(monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.mark.parametrize("argv", [
    ["transcribe", "--model", str(MODEL), "--device", "cuda", str(DEMO_WAV)],
    ["eval", "--model", str(MODEL), "--device", "cuda", "--data", "nothing.jsonl"],
    ["finetune", "--model", str(MODEL), "--device", "cuda:0", "--train", "nothing.jsonl", "--output", "unused"],
    ["transcribe", "--model", str(MODEL), "--device", "gpu", str(DEMO_WAV)],
])
def test_a_device_that_is_not_there_is_one_error_line(argv, no_cuda, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --device ") and err.count("\n") == 1, err
    assert not (tmp_path / "unused").exists()  # refused before anything is written


def test_an_unreadable_input_names_its_path_once(tmp_path, capsys):
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    assert main(["transcribe", "--model", str(MODEL), str(empty), str(DEMO_WAV)]) == 1
    out, err = capsys.readouterr()
    assert out.startswith("demo_01\t")
    assert err.count(str(empty)) == 1, err


def test_long_inputs_are_cut_at_pauses_and_joined(shared_data, tmp_path, capsys):
    long = shared_data / "long_audio" / "zh_70s.wav"
    if not long.exists():
        pytest.skip(f"{long} not found")
    assert main(["transcribe", "--model", str(MODEL), "--max-duration", "20", str(long), str(DEMO_WAV)]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert [line.split("\t")[0] for line in lines] == ["zh_70s", "demo_01"]  # one line per input, in order
    assert all(line.split("\t")[1] for line in lines)
    assert "zh_70s: 70.5 s is over --max-duration 20" in err and "pieces cut at pauses" in err


def test_a_long_input_without_pauses_is_cut_at_the_limit(tmp_path, capsys):
    import numpy as np
    noise = tmp_path / "hum.wav"  # no speech, so no pause to cut at
    sf.write(noise, (0.01 * np.sin(np.arange(16000 * 5) / 5)).astype(np.float32), 16000)
    shutil.copy(DEMO_WAV, tmp_path / "short.wav")
    assert main(["transcribe", "--model", str(MODEL), "--max-duration", "2", str(noise), str(tmp_path / "short.wav")]) == 0
    out, err = capsys.readouterr()
    assert [line.split("\t")[0] for line in out.splitlines()] == ["hum", "short"]
    assert "3 pieces cut every 2 s" in err


def test_pieces_texts_are_joined_as_their_script_wants():
    from paratune.decode_long import join_texts
    assert join_texts(["你好", " 世界", ""]) == "你好世界"
    assert join_texts(["hello there", "world", "你好"]) == "hello there world你好"


@pytest.mark.parametrize("error, code, said", [
    (KeyboardInterrupt(), 130, "interrupted"),
    (OSError(28, "No space left on device", "/runs/exp/ledger.jsonl"), 2,
     "error: /runs/exp/ledger.jsonl: No space left on device"),
])
def test_interrupts_and_os_errors_are_a_line_not_a_traceback(monkeypatch, capsys, tmp_path, error, code, said):
    def fails(args):
        raise error
    monkeypatch.setitem(cli.COMMANDS, "doctor", fails)
    assert cli.main(["doctor", str(tmp_path / "log.txt")]) == code
    assert said in capsys.readouterr().err


def test_overrides_may_stand_anywhere_on_the_line(tmp_path, capsys):
    """`--device cpu ++a.b=c --budget 1GiB`: a FunASR user's habit; argparse alone refused the override."""
    code = main(["plan", "--model", str(MODEL), "++train_conf.max_epoch=abc", "--data", str(tmp_path / "none.jsonl"),
                 "--budget", "1GiB", "++train_conf.seed=1"])
    assert code == 2
    assert "train_conf.max_epoch" in capsys.readouterr().err  # the override was read (and checked), not refused


def test_a_command_without_overrides_refuses_one(capsys):
    with pytest.raises(SystemExit):
        main(["transcribe", "--model", str(MODEL), "++train_conf.seed=1", str(DEMO_WAV)])
    assert "takes no ++overrides" in capsys.readouterr().err


def test_a_dead_peer_under_torchrun_is_one_line(monkeypatch, capsys, tmp_path):
    """What gloo raises on the surviving rank when another is killed (seen in the fault matrix)."""
    import paratune.train.finetune as finetune

    def peer_died(options):
        raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
                           "[127.0.0.1]:26026. This is typically caused by a remote worker crashing.")
    monkeypatch.setattr(finetune, "finetune", peer_died)
    code = main(["finetune", "--model", str(MODEL), "--train", str(tmp_path / "t.jsonl"), "--output",
                 str(tmp_path / "exp")])
    err = capsys.readouterr().err
    assert code == 2 and "lost another rank" in err and "--resume" in err


def test_other_runtime_errors_are_not_dressed_up(monkeypatch, tmp_path):
    import paratune.train.finetune as finetune

    def bug(options):
        raise RuntimeError("a bug in paratune")
    monkeypatch.setattr(finetune, "finetune", bug)
    with pytest.raises(RuntimeError, match="a bug in paratune"):
        main(["finetune", "--model", str(MODEL), "--train", str(tmp_path / "t.jsonl"), "--output",
              str(tmp_path / "exp")])


def test_pieces_timestamps_are_moved_to_where_each_piece_starts():
    from paratune.decode_long import join_pieces
    from paratune.modeldir import Transcript
    joined = join_pieces([Transcript("a b", [[0, 100], [100, 250]]), Transcript("", []),
                          Transcript("c", [[40, 90]])], [0.0, 12.5, 20.25])
    assert joined == Transcript("a b c", [[0, 100], [100, 250], [20290, 20340]])
    assert join_pieces([Transcript("你好"), Transcript("世界")], [0.0, 3.0]) == Transcript("你好世界")


def test_long_inputs_keep_their_timestamps_in_place(shared_data, large_dir, tmp_path, capsys):
    """A timed model's pieces: every timestamp is in the clip's own time, in order."""
    import json

    import torch
    import yaml

    from paratune.modeldir import ASRModel, read_model_dir, save_model
    from tests.model.reference import small_config
    long = shared_data / "long_audio" / "zh_70s.wav"
    src = tmp_path / "src"
    src.mkdir()
    config = small_config(yaml.safe_load((shared_data / "paraformer_family" / "bicif" / "config.yaml").read_text()))
    (src / "config.yaml").write_text(yaml.safe_dump(config))
    for name in ("tokens.json", "am.mvn"):
        shutil.copy(large_dir / name, src / name)
    spec = read_model_dir(src)
    torch.manual_seed(0)
    save_model(ASRModel(spec.build().eval(), spec.frontend, spec.tokenizer, spec.config), tmp_path / "bicif")
    assert main(["transcribe", "--model", str(tmp_path / "bicif"), "--max-duration", "20", "--timestamps",
                 str(long)]) == 0
    key, text, stamps = capsys.readouterr().out.rstrip("\n").split("\t")
    stamps = json.loads(stamps)
    assert key == "zh_70s" and text and stamps
    assert stamps == sorted(stamps) and all(a <= b for a, b in stamps)
    assert 20000 < stamps[-1][1] <= 70500  # later pieces moved by their start, none past the end
