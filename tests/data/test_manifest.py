"""read_manifests: audio files, wav.scp, Kaldi folders and FunASR jsonl lists, with per-line errors."""
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from paratune.data.manifest import InputError, Manifest, Record, read_manifests


@pytest.fixture
def audio_dir(tmp_path):
    folder = tmp_path / "audio"
    folder.mkdir()
    for name in ("a", "b", "c"):
        sf.write(folder / f"{name}.wav", np.zeros(1600, np.float32), 16000)
    return folder


def read_inputs(paths):
    """What transcribe reads."""
    return read_manifests(paths, need_audio=True)


def _errors(result):
    return [(e.path, e.line, e.reason) for e in result.errors]


def test_audio_files_are_keyed_by_stem(audio_dir):
    result = read_inputs([audio_dir / "a.wav", str(audio_dir / "b.wav")])
    assert isinstance(result, Manifest)
    assert result.errors == []
    assert result.records == [
        Record("a", str(audio_dir / "a.wav"), None, str(audio_dir / "a.wav")),
        Record("b", str(audio_dir / "b.wav"), None, str(audio_dir / "b.wav")),
    ]
    utterances, errors = result  # unpacks like a tuple
    assert len(utterances) == 2 and errors == []


def test_real_clip_by_content_sniffing(zh_real, tmp_path):
    """An audio file without an audio suffix is recognised by its content."""
    odd = tmp_path / "clip.bin"
    odd.write_bytes((zh_real / "nst_ID003.wav").read_bytes())
    result = read_inputs([zh_real / "nst_ID003.wav", odd])
    assert result.errors == []
    assert [u.key for u in result.records] == ["nst_ID003", "clip"]


def test_wav_scp_with_relative_paths(audio_dir, tmp_path, monkeypatch):
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "local.wav").write_bytes((audio_dir / "c.wav").read_bytes())
    scp = lists / "wav.scp"
    scp.write_text(
        f"utt1 {audio_dir / 'a.wav'}\n"  # absolute
        "utt2 ../audio/b.wav\n"  # relative to the list's folder
        "\n"  # blank lines are skipped
        "utt3\tlocal.wav\n",  # tab separated, next to the list
        encoding="utf-8",
    )
    monkeypatch.chdir(tmp_path)  # "../audio/b.wav" does not exist from here
    result = read_inputs([scp])
    assert result.errors == []
    assert [(u.key, u.target, u.origin) for u in result.records] == [
        ("utt1", None, f"{scp}:1"), ("utt2", None, f"{scp}:2"), ("utt3", None, f"{scp}:4"),
    ]
    assert result.records[1].source == str(lists / "../audio/b.wav")
    assert result.records[2].source == str(lists / "local.wav")


def test_path_existing_as_given_wins(audio_dir, tmp_path, monkeypatch):
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "a.wav").write_bytes(b"not used")
    scp = lists / "wav.scp"
    scp.write_text("k a.wav\n")
    monkeypatch.chdir(audio_dir)
    result = read_inputs([scp])
    assert result.records[0].source == "a.wav"  # the cwd file, not lists/a.wav


def test_scp_recognised_by_content(audio_dir, tmp_path):
    lst = tmp_path / "my_list"
    lst.write_text(f"x {audio_dir / 'a.wav'}\n")
    result = read_inputs([lst])
    assert [u.key for u in result.records] == ["x"] and result.errors == []


def test_jsonl(audio_dir, tmp_path):
    rows = [
        {"key": "j1", "source": str(audio_dir / "a.wav"), "source_len": 10, "target": "你好", "target_len": 2},
        {"key": "j2", "source": "audio/b.wav"},
    ]
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    result = read_inputs([path])
    assert result.errors == []
    assert result.records == [
        Record("j1", str(audio_dir / "a.wav"), "你好", str(path), 1, 10, 2),
        Record("j2", str(tmp_path / "audio/b.wav"), None, str(path), 2),
    ]
    # recognised by content too, BOM and all
    other = tmp_path / "list.txt"
    other.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert [u.key for u in read_inputs([other]).records] == ["j1", "j2"]


def test_bad_jsonl_lines_are_reported_and_skipped(audio_dir, tmp_path):
    a = str(audio_dir / "a.wav")
    path = tmp_path / "data.jsonl"
    lines = [
        json.dumps({"key": "ok1", "source": a}).encode(),
        b'{"key": "broken", "source": ',
        json.dumps({"source": a}).encode(),
        json.dumps({"key": "nosrc"}).encode(),
        json.dumps({"key": 5, "source": a}).encode(),
        json.dumps(["key", "source"]).encode(),
        json.dumps({"key": "t", "source": a, "target": 3}).encode(),
        '{"key": "latin1", "source": "caf\xe9.wav"}'.encode("latin-1"),
        json.dumps({"key": "gone", "source": "missing.wav"}).encode(),
        json.dumps({"key": "ok2", "source": a, "target": "x"}).encode(),
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    result = read_inputs([path])
    assert [u.key for u in result.records] == ["ok1", "ok2"]
    errors = _errors(result)
    assert [line for _, line, _ in errors] == [2, 3, 4, 5, 6, 7, 8, 9]
    assert all(p == str(path) for p, _, _ in errors)
    reasons = [r for _, _, r in errors]
    assert "malformed JSON" in reasons[0]
    assert "key" in reasons[1] and "source" in reasons[2] and "key" in reasons[3]
    assert "JSON object" in reasons[4]
    assert "target" in reasons[5]
    assert "UTF-8" in reasons[6]
    assert "not found" in reasons[7] and "missing.wav" in reasons[7]
    assert str(result.errors[0]).startswith(f"{path}:2: ")


def test_bad_scp_lines_are_reported_and_skipped(audio_dir, tmp_path):
    path = tmp_path / "wav.scp"
    path.write_bytes(
        f"good1 {audio_dir / 'a.wav'}\n".encode()
        + b"onlykey\n"
        + b"k x y z\n"
        + b"pipe sox a.wav -t wav - |\n"
        + b"k2 \xff\xfe.wav\n"
        + b"k3 https://example.com/a.wav\n"
        + f"good2 {audio_dir / 'b.wav'}\n".encode()
    )
    result = read_inputs([path])
    assert [u.key for u in result.records] == ["good1", "good2"]
    errors = _errors(result)
    assert [line for _, line, _ in errors] == [2, 3, 4, 5, 6]
    assert "found only a key" in errors[0][2]
    assert "not found: 'x y z'" in errors[1][2]  # the rest of the line is the path (paths may hold spaces)
    assert "piped commands" in errors[2][2]
    assert "UTF-8" in errors[3][2]
    assert "URL" in errors[4][2]


def test_missing_input_and_folder_of_audio(audio_dir, tmp_path):
    result = read_inputs([tmp_path / "nope.wav", audio_dir, audio_dir / "a.wav"])
    assert [u.key for u in result.records] == ["a", "b", "c"]  # a folder gives its audio files
    assert [(p, line, e.kind) for (p, line, _), e in zip(_errors(result), result.errors)] == [
        (str(tmp_path / "nope.wav"), None, "input"), (str(audio_dir / "a.wav"), None, "duplicate_key"),
    ]
    assert "not found" in result.errors[0].reason
    assert isinstance(result.errors[0], Exception)


def test_empty_list_is_reported(tmp_path):
    (tmp_path / "wav.scp").write_text("\n\n")
    (tmp_path / "data.jsonl").write_text("")
    result = read_inputs([tmp_path / "wav.scp", tmp_path / "data.jsonl"])
    assert result.records == []
    assert [(e.path, e.line) for e in result.errors] == [
        (str(tmp_path / "wav.scp"), None), (str(tmp_path / "data.jsonl"), None),
    ]
    assert all("no utterances" in e.reason for e in result.errors)


def test_duplicate_keys_keep_the_first(audio_dir, tmp_path):
    scp = tmp_path / "wav.scp"
    scp.write_text(f"a {audio_dir / 'b.wav'}\nz {audio_dir / 'c.wav'}\nz {audio_dir / 'a.wav'}\n")
    result = read_inputs([audio_dir / "a.wav", scp])
    assert [(u.key, u.source) for u in result.records] == [
        ("a", str(audio_dir / "a.wav")), ("z", str(audio_dir / "c.wav")),
    ]
    errors = _errors(result)
    assert [(p, line) for p, line, _ in errors] == [(str(scp), 1), (str(scp), 3)]
    assert "duplicate key 'a'" in errors[0][2] and str(audio_dir / "a.wav") in errors[0][2]
    assert f"{scp}:2" in errors[1][2]


def test_input_error_str():
    assert str(InputError("list.scp", 3, "bad")) == "list.scp:3: bad"
    assert str(InputError("x.wav", None, "input not found")) == "x.wav: input not found"


# -- issue 13 ------------------------------------------------------------------------------------------

DEMO = Path(__file__).resolve().parents[2] / "paratune" / "assets"


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize("bad", ["a\tb", "a\nb", "a\rb", "a\x00b", "a\x1bb", "a\u2028b", "a\x85b"])
def test_keys_with_control_characters_are_refused(audio_dir, tmp_path, bad):
    """A key holding a tab or newline would split transcribe's `key<TAB>text` line (defect 13)."""
    a = str(audio_dir / "a.wav")
    path = _jsonl(tmp_path / "data.jsonl", [{"key": "ok", "source": a}, {"key": bad, "source": a}])
    result = read_inputs([path])
    assert [r.key for r in result.records] == ["ok"]
    assert [(e.path, e.line) for e in result.errors] == [(str(path), 2)]
    assert "control character" in result.errors[0].reason


def test_control_characters_in_scp_keys_and_file_names(audio_dir, tmp_path):
    scp = tmp_path / "list.scp"
    scp.write_bytes(b"esc\x1bkey " + str(audio_dir / "a.wav").encode() + b"\n")
    odd = tmp_path / "two\tfields.wav"
    odd.write_bytes((audio_dir / "b.wav").read_bytes())
    result = read_inputs([scp, odd])
    assert result.records == []
    assert [(e.path, e.line) for e in result.errors] == [(str(scp), 1), (str(odd), None)]


def test_output_line_stays_one_line_with_two_fields():
    from paratune.data.manifest import output_line
    assert output_line("k", "你好 world") == "k\t你好 world"
    assert output_line("k", "a\tb\nfake\tline\r") == "k\ta b fake line "
    with pytest.raises(ValueError):
        output_line("a\nb", "x")


def test_transcribe_prints_no_forged_line(tmp_path, capsys):
    """Through the CLI with the bundled model: the tab key is an error naming file:line, the rest decodes."""
    from paratune.cli import main
    wav = str(DEMO / "demo" / "demo_01.wav")
    path = _jsonl(tmp_path / "in.jsonl", [{"key": "good", "source": wav}, {"key": "evil\tforged", "source": wav},
                                           {"key": "evil\nforged\tline", "source": wav}])
    code = main(["transcribe", "--model", str(DEMO / "demo_model"), str(path)])
    out, err = capsys.readouterr()
    assert code == 1  # partial
    lines = out.splitlines()
    assert len(lines) == 1 and lines[0].startswith("good\t") and lines[0].count("\t") == 1
    assert f"{path}:2:" in err and f"{path}:3:" in err and "Traceback" not in err


def test_line_without_source_is_an_error_for_training_not_for_plan(tmp_path):
    """Defect 5: finetune and eval need the audio; plan can work from source_len alone."""
    from paratune.data.lengths import read_lengths
    from paratune.modeldir import read_model_dir
    spec = read_model_dir(DEMO / "demo_model")
    path = _jsonl(tmp_path / "d.jsonl", [{"key": "k1", "source_len": 300, "target": "我的朋友"},
                                         {"key": "k2", "source": "x.wav", "source_len": 300, "target": "我的朋友"}])
    lengths, errors = read_lengths([path], spec.tokenizer, spec.frontend.lfr_n, need_audio=True)
    assert lengths.keys == ["k2"]  # whether x.wav can be read is found at load time, with a ledger entry
    assert [(e.path, e.line, e.kind) for e in errors] == [(str(path), 1, "no_audio")]
    assert "source" in errors[0].reason
    lengths, errors = read_lengths([path], spec.tokenizer, spec.frontend.lfr_n)
    assert lengths.keys == ["k1", "k2"] and errors == []


def test_transcript_of_only_unknown_tokens_is_refused(tmp_path):
    """Defect 6: such a line trains the model to say <unk>."""
    from paratune.data.lengths import read_lengths
    from paratune.modeldir import read_model_dir
    spec = read_model_dir(DEMO / "demo_model")
    path = _jsonl(tmp_path / "d.jsonl", [{"key": "k1", "source_len": 300, "target": "☃☃ ♞"},
                                         {"key": "k2", "source_len": 300, "target": "我的☃"},
                                         {"key": "k3", "source_len": 300, "target": "   "}])
    lengths, errors = read_lengths([path], spec.tokenizer, spec.frontend.lfr_n)
    assert lengths.keys == ["k2"] and list(lengths.tokens) == [3]
    assert [(e.line, e.kind) for e in errors] == [(1, "unknown_tokens"), (3, "empty_transcript")]
    assert str(errors[0]) == f"{path}:1: transcript has only unknown tokens for this model: ☃ ♞"


def test_kaldi_folder_and_audio_folder_with_tsv(audio_dir, tmp_path):
    kaldi = tmp_path / "kaldi"
    kaldi.mkdir()
    (kaldi / "wav.scp").write_text(f"u1 {audio_dir / 'a.wav'}\nu2 {audio_dir / 'b.wav'}\n")
    (kaldi / "text").write_text("u1 你好\nu3 没有音频\n", encoding="utf-8")
    tsv = tmp_path / "t.tsv"
    tsv.write_text("a.wav\t一\nb\t二\nnone.wav\t三\n", encoding="utf-8")
    records, errors = read_manifests([kaldi, audio_dir], targets="paired", transcripts=tsv)
    assert [(r.key, r.target) for r in records] == [("u1", "你好"), ("a", "一"), ("b", "二")]
    assert sorted((e.kind, e.key) for e in errors) == [("no_audio", "none.wav"), ("no_audio", "u3"),
                                                       ("no_transcript", "c"), ("no_transcript", "u2")]
    # transcribe does not need transcripts: nothing is missing then
    records, errors = read_manifests([kaldi], targets="optional")
    assert [(r.key, r.target) for r in records] == [("u1", "你好"), ("u2", None)] and errors == []


def test_lone_surrogates_are_refused(audio_dir, tmp_path):
    """JSON can spell a lone surrogate; it could not be printed or written back as UTF-8."""
    a = json.dumps(str(audio_dir / "a.wav"))
    path = tmp_path / "d.jsonl"
    path.write_text(f'{{"key": "k\\ud800", "source": {a}}}\n{{"key": "t", "source": {a}, "target": "x\\udfff"}}\n'
                    f'{{"key": "ok", "source": {a}}}\n')
    result = read_inputs([path])
    assert [r.key for r in result.records] == ["ok"]
    assert [e.line for e in result.errors] == [1, 2]
