"""BiCifParaformer and SeacoParaformer model directories end to end: `paratune transcribe` prints what
`funasr.AutoModel(model=DIR).generate()` returns (text, timestamps, hotwords), `save_model` writes a
directory FunASR loads, and what paratune refuses it refuses with a one-line error."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import paratune
from paratune.cli import main as cli_main
from paratune.model.seaco import SeacoParaformer
from paratune.modeldir import ModelDirError, read_model_dir
from tests.model.reference import funasr_model, shallow_config, small_config

KINDS = ("bicif", "seaco")
FAMILY_CLASS = {"bicif": "BiCifParaformer", "seaco": "SeacoParaformer"}
# Random SeACo weights made to use the hotwords (otherwise every hotword's vector is about the same and the
# hotwords change next to nothing): the bias encoder's weights and the seaco decoder's hotword-attention output
# scaled by HOTWORD_GAIN, its queries by HOTWORD_SHARPNESS (attention on a few hotwords: which ones, and which 50
# the filter keeps, changes the text), and the hotword head's NO_BIAS logit raised by NO_BIAS_BOOST so that the
# text mixes the decoder's tokens and the hotword head's (small: about 70% hotword head with 4 hotwords, 50% with
# 60; large: about 50% with 4). Checked: feeding shifted hotword ids, leaving out [sos], filtering by the first
# utterance's scores or keeping 49 changes 4 to 7 of the 7 clips' texts.
HOTWORD_GAIN, HOTWORD_SHARPNESS, NO_BIAS_BOOST = 8.0, 8.0, 4.0


def _clips(zh_real):
    return sorted(zh_real.glob("*.wav"))


def family_config(shared_data, kind: str, size: str = "small") -> dict:
    """../shared/data/paraformer_family/<kind>/config.yaml, at tests/model/reference.py's small sizes for
    "small": SeACo's bias encoder and seaco decoder at the encoder's width, the seaco decoder's six
    attention blocks (att_layer_num's default; FunASR's hotword filter reads the sixth) kept."""
    config = yaml.safe_load((shared_data / "paraformer_family" / kind / "config.yaml").read_text(encoding="utf-8"))
    return small_config(config) if size == "small" else config


def _model_dir_files(path: Path, large_dir: Path, config: dict) -> int:
    path.mkdir(parents=True, exist_ok=True)
    shutil.copy(large_dir / "tokens.json", path / "tokens.json")
    shutil.copy(large_dir / "am.mvn", path / "am.mvn")
    (path / "config.yaml").write_text(yaml.safe_dump(config, allow_unicode=True), encoding="utf-8")
    return len(json.loads((large_dir / "tokens.json").read_text(encoding="utf-8")))


def make_funasr_dir(path: Path, large_dir: Path, config: dict, seed: int = 0) -> Path:
    """A directory as FunASR ships one, with FunASR's model's weights (random, from `seed`)."""
    vocab = _model_dir_files(path, large_dir, config)
    torch.manual_seed(seed)
    ref = funasr_model(config, vocab)
    if config["model"] == "SeacoParaformer":
        with torch.no_grad():
            for name, weight in ref.bias_encoder.named_parameters():
                if name.startswith("weight"):
                    weight *= HOTWORD_GAIN
            for block in ref.seaco_decoder.decoders:
                block.src_attn.linear_out.weight *= HOTWORD_GAIN
                block.src_attn.linear_q.weight *= HOTWORD_SHARPNESS
            ref.hotword_output_layer.bias[config["model_conf"]["NO_BIAS"]] += NO_BIAS_BOOST
    torch.save(ref.state_dict(), path / "model.pt")
    return path


def make_paratune_dir(path: Path, large_dir: Path, config: dict, seed: int = 0) -> Path:
    """The same with paratune's model's weights (no funasr needed)."""
    _model_dir_files(path, large_dir, config)
    torch.manual_seed(seed)
    torch.save(read_model_dir(path).build().state_dict(), path / "model.pt")
    return path


def funasr_results(model_dir: Path, wavs, **generate) -> dict:
    """{clip: (text, timestamp)} from `AutoModel(model=dir).generate(input=wav, **generate)`, one clip at a
    time (batch size 1, FunASR's default)."""
    from funasr import AutoModel

    # dither 0: FunASR's frontend otherwise adds random noise at inference, paratune's only in training
    model = AutoModel(model=str(model_dir), device="cpu", disable_update=True, disable_pbar=True,
                      disable_log=True, frontend_conf={"dither": 0.0})
    out = {}
    for w in wavs:
        (result,) = model.generate(input=str(w), **generate)
        out[w.stem] = (result["text"], result["timestamp"])
    return out


def paratune_results(model_dir: Path, wavs, capsys, *flags: str, check_plain: bool = True) -> dict:
    """{clip: (text, timestamps)} that `paratune transcribe --timestamps` prints at the default batch size
    (the 7 clips decoded together); with `check_plain`, the same text is printed without --timestamps."""
    capsys.readouterr()  # drop whatever FunASR printed before
    args = ["transcribe", "--model", str(model_dir), *flags]
    assert cli_main([*args, "--timestamps", *map(str, wavs)]) == 0
    timed = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    assert [k for k, *_ in timed] == [w.stem for w in wavs]  # input order, one line each
    assert all(len(fields) == 3 for fields in timed)
    if check_plain:
        assert cli_main([*args, *map(str, wavs)]) == 0
        assert [line.split("\t") for line in capsys.readouterr().out.splitlines()] == [f[:2] for f in timed]
    return {key: (text, json.loads(stamps)) for key, text, stamps in timed}


def assert_same(ours: dict, theirs: dict):
    """Equal per clip, with the first differing clip named."""
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert ours[key][0] == theirs[key][0], f"{key}: text differs"
        assert ours[key][1] == theirs[key][1], f"{key}: timestamps differ"


def one_line_error(captured) -> str:
    """stderr holds one `error: ...` line, stdout nothing."""
    assert captured.out == ""
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1, captured.err
    assert "Traceback" not in captured.err
    return captured.err


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory, shared_data, large_dir, funasr):
    return {kind: make_funasr_dir(tmp_path_factory.mktemp(f"funasr_{kind}"), large_dir,
                                  family_config(shared_data, kind), seed=i)
            for i, kind in enumerate(KINDS)}


@pytest.fixture(scope="module")
def tokens(large_dir) -> list[str]:
    return json.loads((large_dir / "tokens.json").read_text(encoding="utf-8"))


def single_token_words(tokens: list[str], n: int, start: int = 100) -> list[str]:
    """`n` Chinese characters of the vocabulary: each is one token (without a seg_dict FunASR maps each
    space-separated hotword to one token, so a longer word would be <unk>)."""
    return [t for t in tokens[start:] if len(t) == 1 and "\u4e00" <= t <= "\u9fff"][:n]


# ---- 1. transcribe = AutoModel.generate ------------------------------------------------------------

@pytest.mark.reference
@pytest.mark.parametrize("kind", KINDS)
def test_transcribe_prints_text_and_timestamps_funasr_generates(kind, family_dirs, zh_real, capsys):
    wavs = _clips(zh_real)
    ours = paratune_results(family_dirs[kind], wavs, capsys)
    assert_same(ours, funasr_results(family_dirs[kind], wavs))
    assert sum(len(stamps) for _, stamps in ours.values()) > 50  # random weights still emit plenty of words


@pytest.mark.slow
@pytest.mark.reference
@pytest.mark.parametrize("case", ["few", "many", "file"])
def test_seaco_hotwords_bias_as_in_funasr(case, family_dirs, zh_real, tokens, tmp_path, capsys, monkeypatch):
    wavs = _clips(zh_real)
    model_dir = family_dirs["seaco"]
    if case == "few":
        hotwords = "广 州 房 the"  # single tokens, "the" an English word of the vocabulary
        flags, generate = ["--hotwords", hotwords], {"hotword": hotwords}
    elif case == "many":  # over 50: each utterance keeps the 50 its decoder attends to most (ASF)
        hotwords = " ".join(single_token_words(tokens, 60))
        flags, generate = ["--hotwords", hotwords], {"hotword": hotwords}
    else:  # one hotword a line, its tokens separated by spaces; FunASR reads a file only if it ends in .txt
        hw = tmp_path / "hw.txt"
        hw.write_text("广 州\n房\n滨 海 新 区\nthe\n你 好\n", encoding="utf-8")
        flags, generate = ["--hotword-file", str(hw)], {"hotword": str(hw)}

    filtered = []
    original = SeacoParaformer._filter
    monkeypatch.setattr(SeacoParaformer, "_filter",
                        lambda self, *a, **k: filtered.append(1) or original(self, *a, **k))
    ours = paratune_results(model_dir, wavs, capsys, *flags)
    assert bool(filtered) == (case == "many")
    assert_same(ours, funasr_results(model_dir, wavs, **generate))
    # the hotword head took over some tokens, not all
    plain = paratune_results(model_dir, wavs, capsys, check_plain=False)
    pairs = [(a, b) for k in ours for a, b in zip(ours[k][0].split(), plain[k][0].split())]
    assert 0 < sum(a != b for a, b in pairs) < len(pairs)


# ---- 2. save_model's directory in AutoModel ---------------------------------------------------------

@pytest.mark.slow
@pytest.mark.reference
@pytest.mark.parametrize("kind", KINDS)
def test_saved_directory_loads_in_funasr_and_decodes_identically(kind, family_dirs, zh_real, tmp_path, capsys):
    asr = paratune.load_model(family_dirs[kind])
    out = paratune.save_model(asr, tmp_path / "saved")
    assert sorted(p.name for p in out.iterdir()) == ["am.mvn", "config.yaml", "model.pt", "tokens.json"]
    from funasr import AutoModel

    # FunASR silently skips weights it cannot match (ignore_init_mismatch): check every tensor arrived
    loaded = AutoModel(model=str(out), device="cpu", disable_update=True, disable_pbar=True, disable_log=True)
    assert type(loaded.model).__name__ == FAMILY_CLASS[kind]
    theirs = loaded.model.state_dict()
    assert theirs.keys() == asr.model.state_dict().keys()
    for name, value in asr.model.state_dict().items():
        assert torch.equal(theirs[name], value), name
    wavs = _clips(zh_real)
    ours = paratune_results(out, wavs, capsys)
    assert_same(ours, funasr_results(out, wavs))
    assert_same(ours, paratune_results(family_dirs[kind], wavs, capsys))
    if kind == "seaco":
        hotwords = "广 州 房"
        assert_same(paratune_results(out, wavs, capsys, "--hotwords", hotwords),
                    funasr_results(out, wavs, hotword=hotwords))


@pytest.mark.reference
@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_large_config_matches_funasr(kind, tmp_path, shared_data, large_dir, zh_real, capsys):
    config = shallow_config(family_config(shared_data, kind, "large"))  # the large widths and settings, 4 + 2 blocks
    model_dir = make_funasr_dir(tmp_path / kind, large_dir, config, seed=5)
    wavs = _clips(zh_real)
    flags, generate = [], {}
    if kind == "seaco":
        hotwords = "广 州 房 the"
        flags, generate = ["--hotwords", hotwords], {"hotword": hotwords}
    ours = paratune_results(model_dir, wavs, capsys, *flags, check_plain=False)
    assert sum(len(text) for text, _ in ours.values()) > 20  # random weights still emit plenty of tokens
    assert_same(ours, funasr_results(model_dir, wavs, **generate))


# ---- 2b. what load_model refuses --------------------------------------------------------------------

@pytest.fixture(scope="module")
def paratune_dirs(tmp_path_factory, shared_data, large_dir):
    """Small BiCif / SeACo directories with paratune's random weights (no funasr needed)."""
    return {kind: make_paratune_dir(tmp_path_factory.mktemp(f"paratune_{kind}"), large_dir,
                                    family_config(shared_data, kind)) for kind in KINDS}


@pytest.mark.parametrize("other", ["ParaformerStreaming", "ContextualParaformer"])
def test_other_funasr_models_are_refused_in_one_line(other, paratune_dirs, tmp_path, capsys):
    d = tmp_path / other
    shutil.copytree(paratune_dirs["bicif"], d)
    config = yaml.safe_load((d / "config.yaml").read_text(encoding="utf-8"))
    config["model"] = other
    (d / "config.yaml").write_text(yaml.safe_dump(config, allow_unicode=True), encoding="utf-8")
    with pytest.raises(ModelDirError, match=other):
        paratune.load_model(d)
    assert cli_main(["transcribe", "--model", str(d), "x.wav"]) == 2
    err = one_line_error(capsys.readouterr())
    assert str(d / "config.yaml") in err and repr(other) in err
    for supported in ("builds Paraformer (", "BiCifParaformer (", "SeacoParaformer ("):
        assert supported in err, supported


def test_console_script_refuses_another_model_without_traceback(paratune_dirs, tmp_path):
    d = tmp_path / "streaming"
    shutil.copytree(paratune_dirs["seaco"], d)
    text = (d / "config.yaml").read_text(encoding="utf-8")
    text = text.replace("model: SeacoParaformer", "model: ParaformerStreaming")
    (d / "config.yaml").write_text(text, encoding="utf-8")
    result = subprocess.run([sys.executable, "-m", "paratune", "transcribe", "--model", str(d), "x.wav"],
                            capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert "ParaformerStreaming" in result.stderr and "SeacoParaformer" in result.stderr


@pytest.mark.parametrize("kind", KINDS)
def test_weights_that_do_not_fit_name_model_pt(kind, paratune_dirs, tmp_path):
    source = paratune_dirs[kind]
    state = torch.load(source / "model.pt", weights_only=True)

    def with_state(name, new_state):
        d = tmp_path / name
        shutil.copytree(source, d)
        torch.save(new_state, d / "model.pt")
        return d

    missing = sorted(state)[-1]
    d = with_state("missing", {k: v for k, v in state.items() if k != missing})
    with pytest.raises(ModelDirError, match=r"model\.pt.*missing " + re.escape(repr([missing]))):
        paratune.load_model(d)

    d = with_state("extra", {**state, "predictor.no_such_weight": torch.zeros(3)})
    with pytest.raises(ModelDirError, match=r"model\.pt.*unexpected \['predictor\.no_such_weight'\]"):
        paratune.load_model(d)

    if kind == "seaco":  # a BiCif model's weights under a SeACo config: the hotword parts are missing
        bicif = torch.load(paratune_dirs["bicif"] / "model.pt", weights_only=True)
        d = with_state("bicif_weights", bicif)
        with pytest.raises(ModelDirError, match=r"model\.pt.*missing \['bias_encoder\."):
            paratune.load_model(d)


# ---- 3. CLI errors -----------------------------------------------------------------------------------

def test_transcribe_option_errors_are_one_line(paratune_dirs, zh_real, tmp_path, capsys):
    wav = str(_clips(zh_real)[0])
    demo = Path(paratune.__file__).parent / "assets" / "demo_model"  # a plain Paraformer

    assert cli_main(["transcribe", "--model", str(demo), "--timestamps", wav]) == 2
    err = one_line_error(capsys.readouterr())
    assert "--timestamps" in err and "Paraformer has no timestamp head" in err

    for option in (["--hotwords", "广 州"], ["--hotword-file", str(tmp_path / "hw.txt")]):
        (tmp_path / "hw.txt").write_text("广\n", encoding="utf-8")
        assert cli_main(["transcribe", "--model", str(paratune_dirs["bicif"]), *option, wav]) == 2
        err = one_line_error(capsys.readouterr())
        assert "BiCifParaformer takes none" in err and "SeacoParaformer" in err, err
        assert cli_main(["transcribe", "--model", str(demo), *option, wav]) == 2
        assert "Paraformer takes none" in one_line_error(capsys.readouterr())

    missing = tmp_path / "no_such_hotwords.txt"
    assert cli_main(["transcribe", "--model", str(paratune_dirs["seaco"]), "--hotword-file", str(missing), wav]) == 2
    err = one_line_error(capsys.readouterr())
    assert str(missing) in err and "not found" in err
