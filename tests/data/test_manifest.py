"""read_manifests: audio files, wav.scp, Kaldi folders and FunASR jsonl lists, with per-line errors."""
import json

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
