"""Model directories: FunASR's load in paratune, paratune's load in FunASR, same transcripts."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import paratune
from paratune.cli import main as cli_main
from paratune.modeldir import ModelDirError
from tests.model.reference import funasr_paraformer, load_config, shallow_config, small_config


def _clips(zh_real):
    return sorted(zh_real.glob("*.wav"))


def make_funasr_dir(path, large_dir, config, seed=0):
    """A directory exactly as FunASR ships one: its config, tokens, am.mvn and its model's weights."""
    path.mkdir(parents=True, exist_ok=True)
    shutil.copy(large_dir / "tokens.json", path / "tokens.json")
    shutil.copy(large_dir / "am.mvn", path / "am.mvn")
    (path / "config.yaml").write_text(yaml.safe_dump(config, allow_unicode=True), encoding="utf-8")
    vocab = len(yaml.safe_load((large_dir / "tokens.json").read_text(encoding="utf-8")))
    torch.manual_seed(seed)
    ref = funasr_paraformer(config, vocab)
    torch.save(ref.state_dict(), path / "model.pt")
    return path


def funasr_texts(model_dir, wavs):
    from funasr import AutoModel

    # dither 0: FunASR's frontend otherwise adds random noise at inference, paratune's only in training
    model = AutoModel(model=str(model_dir), device="cpu", disable_update=True, disable_pbar=True,
                      disable_log=True, frontend_conf={"dither": 0.0})
    return {w.stem: model.generate(input=str(w))[0]["text"] for w in wavs}


def paratune_texts(model_dir, wavs, capsys, batch_size=4):
    capsys.readouterr()  # drop whatever FunASR printed before
    code = cli_main(["transcribe", "--model", str(model_dir), "--batch-size", str(batch_size), *map(str, wavs)])
    out = capsys.readouterr().out
    assert code == 0
    lines = [line.split("\t", 1) for line in out.splitlines()]
    assert [k for k, _ in lines] == [w.stem for w in wavs]  # input order, one line each
    return dict(lines)


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory, large_dir, funasr):
    return make_funasr_dir(tmp_path_factory.mktemp("funasr_small"), large_dir, small_config(load_config(large_dir)))


def test_transcribe_prints_what_funasr_generates(small_dir, zh_real, capsys):
    wavs = _clips(zh_real)
    ours = paratune_texts(small_dir, wavs, capsys)
    theirs = funasr_texts(small_dir, wavs)
    assert ours == theirs
    assert sum(len(t) for t in ours.values()) > 20  # random weights still emit plenty of tokens


def test_saved_directory_loads_in_funasr_and_decodes_identically(small_dir, zh_real, tmp_path, capsys):
    asr = paratune.load_model(small_dir)
    out = paratune.save_model(asr, tmp_path / "saved")
    assert sorted(p.name for p in out.iterdir()) == ["am.mvn", "config.yaml", "model.pt", "tokens.json"]
    # FunASR silently skips weights it cannot match (ignore_init_mismatch): check every tensor arrived
    from funasr import AutoModel

    loaded = AutoModel(model=str(out), device="cpu", disable_update=True, disable_pbar=True, disable_log=True)
    theirs = loaded.model.state_dict()
    for name, value in asr.model.state_dict().items():
        assert torch.equal(theirs[name], value), name
    from funasr.frontends.wav_frontend import load_cmvn

    assert torch.equal(load_cmvn(str(out / "am.mvn")), load_cmvn(str(small_dir / "am.mvn")))
    wavs = _clips(zh_real)
    assert funasr_texts(out, wavs) == paratune_texts(out, wavs, capsys) == paratune_texts(small_dir, wavs, capsys)
    again = paratune.load_model(out)
    for name, value in asr.model.state_dict().items():
        assert torch.equal(again.model.state_dict()[name], value)


@pytest.mark.slow
def test_transcribe_large_config_matches_funasr(tmp_path_factory, large_dir, zh_real, capsys):
    config = shallow_config(load_config(large_dir))  # the large widths and settings, 4 + 2 blocks
    model_dir = make_funasr_dir(tmp_path_factory.mktemp("funasr_large"), large_dir, config, seed=3)
    wavs = _clips(zh_real)
    ours = paratune_texts(model_dir, wavs, capsys, batch_size=7)
    assert sum(len(t) for t in ours.values()) > 20  # random weights still emit plenty of tokens
    assert ours == funasr_texts(model_dir, wavs)


def test_batching_does_not_change_transcripts(small_dir, zh_real, capsys):
    wavs = _clips(zh_real)
    assert paratune_texts(small_dir, wavs, capsys, batch_size=1) == paratune_texts(small_dir, wavs, capsys, 7)


def test_bad_inputs_are_reported_and_the_rest_decoded(small_dir, zh_real, tmp_path, capsys):
    wavs = _clips(zh_real)[:2]
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt garbage" * 3)
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    missing = tmp_path / "missing.wav"
    import numpy as np
    import soundfile as sf

    tiny = tmp_path / "tiny.wav"  # 5 ms: not one full analysis frame
    sf.write(tiny, np.zeros(80, dtype=np.float32), 16000)
    scp = tmp_path / "wav.scp"
    scp.write_text(f"good1 {wavs[0]}\nbroken_line_without_path\ngood2 {wavs[1]}\n", encoding="utf-8")
    code = cli_main(["transcribe", "--model", str(small_dir), str(corrupt), str(wavs[0]), str(empty),
                     str(missing), str(tiny), str(scp)])
    captured = capsys.readouterr()
    assert code == 1  # some failed, some decoded
    keys = [line.split("\t")[0] for line in captured.out.splitlines()]
    assert keys == [wavs[0].stem, "good1", "good2"]
    for name in ("corrupt.wav", "empty.wav", "missing.wav", "tiny.wav", "wav.scp:2"):
        assert name in captured.err, name


def test_bad_model_directories_name_the_file(small_dir, tmp_path):
    def copy(name):
        d = tmp_path / name
        shutil.copytree(small_dir, d)
        return d

    def with_encoder_setting(name, key, value):
        d = copy(name)
        config = yaml.safe_load((d / "config.yaml").read_text(encoding="utf-8"))
        config["encoder_conf"][key] = value
        (d / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
        return d

    d = copy("bad_yaml")
    (d / "config.yaml").write_text("model: Paraformer\nencoder_conf: [unclosed\n", encoding="utf-8")
    with pytest.raises(ModelDirError, match="config.yaml"):
        paratune.load_model(d)

    d = with_encoder_setting("bad_key", "no_such_option", 1)
    with pytest.raises(ModelDirError, match=r"config.yaml.*encoder_conf.no_such_option"):
        paratune.load_model(d)

    d = copy("bad_mvn")
    (d / "am.mvn").write_text("<Nnet>\n<AddShift> 560 560\n<LearnRateCoef> 0 [ 1 2 x ]\n", encoding="utf-8")
    with pytest.raises(ModelDirError, match="am.mvn"):
        paratune.load_model(d)

    d = copy("bad_weights")
    (d / "model.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelDirError, match="model.pt"):
        paratune.load_model(d)

    d = with_encoder_setting("wrong_shape", "num_blocks", 2)
    with pytest.raises(ModelDirError, match=r"model.pt.*do not fit"):
        paratune.load_model(d)

    d = copy("bad_tokens")
    (d / "tokens.json").write_text('["<blank>", "<s>"', encoding="utf-8")
    with pytest.raises(ModelDirError, match="tokens.json"):
        paratune.load_model(d)

    with pytest.raises(ModelDirError, match="not a model directory"):
        paratune.load_model(tmp_path / "nowhere")


def test_console_script_reports_a_bad_model_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "paratune", "transcribe", "--model", str(tmp_path), "x.wav"],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "config.yaml" in result.stderr and "Traceback" not in result.stderr


def test_a_missing_am_mvn_is_warned_about(tmp_path, capsys):
    demo = Path(paratune.__file__).parent / "assets" / "demo_model"
    d = tmp_path / "no_mvn"
    shutil.copytree(demo, d)
    (d / "am.mvn").unlink()
    wav = Path(paratune.__file__).parent / "assets" / "demo" / "demo_01.wav"
    assert cli_main(["transcribe", "--model", str(d), str(wav)]) == 0
    err = capsys.readouterr().err
    assert err.startswith(f"warning: {d}: no am.mvn") and err.count("\n") == 1
    assert cli_main(["transcribe", "--model", str(demo), str(wav)]) == 0
    assert "warning" not in capsys.readouterr().err
