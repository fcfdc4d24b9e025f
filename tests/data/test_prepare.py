"""`paratune prepare`: inputs, the validation report, long clips dropped, kept or refused."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

import paratune
from paratune.cli import main

DEMO = Path(paratune.__file__).parent / "assets" / "demo_model"


def _zh(zh_real):
    text = dict(line.split(maxsplit=1) for line in (zh_real / "text").read_text(encoding="utf-8").splitlines())
    return {p.stem: (p, text[p.stem].strip()) for p in sorted(zh_real.glob("*.wav")) if p.stem in text}


@pytest.fixture()
def bad_corpus(tmp_path, zh_real):
    rows = [{"key": k, "source": str(p), "target": t} for k, (p, t) in _zh(zh_real).items()]
    (tmp_path / "corrupt.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk" + os.urandom(300))
    (tmp_path / "empty.wav").write_bytes(b"")
    rng = np.random.default_rng(0)
    sf.write(tmp_path / "d8k.wav", (rng.standard_normal(8000) * 0.01).astype("float32"), 8000)
    sf.write(tmp_path / "d48k.wav", (rng.standard_normal(48000) * 0.01).astype("float32"), 48000)
    sf.write(tmp_path / "ten_minutes.wav", np.zeros(16000 * 600, dtype="int16"), 16000, subtype="PCM_16")
    rows += [{"key": "corrupt", "source": "corrupt.wav", "target": "你好"},
             {"key": "empty", "source": "empty.wav", "target": "你好"},
             {"key": "missing", "source": "nowhere.wav", "target": "你好"},
             {"key": "d8k", "source": "d8k.wav", "target": "你好"},
             {"key": "d48k", "source": "d48k.wav", "target": "你好"},
             {"key": "long", "source": "ten_minutes.wav", "target": "你好"},
             {"key": "blank", "source": "d8k.wav", "target": "   "},
             {"key": "snowman", "source": "d8k.wav", "target": "你好☃"},
             {"key": "d8k", "source": "d48k.wav", "target": "重复"}]
    path = tmp_path / "data.jsonl"
    with open(path, "wb") as f:
        for r in rows:
            f.write((json.dumps(r, ensure_ascii=False) + "\n").encode())
        f.write('{"key": "latin1", "source": "d8k.wav", "target": "café"}\n'.encode("latin-1"))
    return path, len(rows) + 1


def test_bad_corpus_each_problem_reported_the_rest_prepared(capsys, tmp_path, bad_corpus, large_dir):
    data, n_lines = bad_corpus
    out = tmp_path / "out"
    code = main(["prepare", str(data), "--model", str(large_dir), "--output", str(out), "--max-duration", "30",
                 "--long-audio", "drop"])
    printed = capsys.readouterr().out
    assert code == 1
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    kinds = {e["key"]: e["kind"] for e in report["excluded"] if e["key"]}
    assert kinds["corrupt"] == "corrupt_audio"
    assert kinds["empty"] == "empty_audio"
    assert kinds["missing"] == "missing_audio"
    assert kinds["long"] == "too_long"
    assert kinds["blank"] == "empty_transcript"
    assert kinds["snowman"] == "unknown_tokens"
    assert any(e["kind"] == "duplicate_key" and e["key"] == "d8k" for e in report["excluded"])
    bad_line = [e for e in report["excluded"] if e["kind"] == "bad_line"]
    assert bad_line and bad_line[0]["origin"] == f"{data}:{n_lines}" and "UTF-8" in bad_line[0]["reason"]
    assert "☃" in report["unknown_tokens"]
    # the English clip: upper-case letters are not in paraformer-large's tokens without its seg_dict
    assert kinds["librispeech_1995-1837-0001"] == "unknown_tokens"
    # mixed sample rates: kept, with a warning naming the rate
    warned = {w["key"]: " ".join(w["warnings"]) for w in report["warnings"]}
    assert "8000 Hz" in warned["d8k"] and "48000 Hz" in warned["d48k"]
    assert report["sample_rates"] == {"8000": 1, "16000": 5, "48000": 2}
    # every line is either kept or excluded, never both, never neither
    kept = [json.loads(line) for line in (out / "data.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(kept) + len(report["excluded"]) == n_lines
    assert {r["key"] for r in kept}.isdisjoint(k for k, v in kinds.items() if v != "duplicate_key")
    for r in kept:
        info = sf.info(r["source"])
        assert r["duration"] == pytest.approx(info.frames / info.samplerate, abs=1e-3)
        assert r["source_len"] == int(info.frames / info.samplerate * 100)
        assert r["frames"] == -(-max(r["source_len"] - 2, 1) // 6)
        assert r["tokens"] == r["target_len"] == len(r["target"].replace(" ", ""))
    assert (out / "report.png").read_bytes()[:4] == b"\x89PNG"
    assert "excluded, corrupt audio: 1" in (out / "report.txt").read_text(encoding="utf-8")
    assert "wrote" in printed


def test_long_clip_kept_with_a_warning(tmp_path, bad_corpus, large_dir, capsys):
    data, _ = bad_corpus
    main(["prepare", str(data), "--model", str(large_dir), "--output", str(tmp_path / "o"), "--max-duration", "30"])
    report = json.loads((tmp_path / "o" / "report.json").read_text(encoding="utf-8"))
    assert any(w["key"] == "long" and "kept (--long-audio keep)" in w["warnings"][0] for w in report["warnings"])


def test_split_refuses_labelled_audio_without_an_alignment_model(tmp_path, bad_corpus, large_dir, capsys):
    data, _ = bad_corpus
    code = main(["prepare", str(data), "--model", str(large_dir), "--output", str(tmp_path / "o"),
                 "--max-duration", "30", "--long-audio", "split"])
    assert code == 2
    assert "needs --align-model" in capsys.readouterr().err
    assert not (tmp_path / "o" / "data.jsonl").exists()


def test_kaldi_folder_and_audio_folder_with_tsv(tmp_path, zh_real, large_dir, capsys):
    zh = {k: v for k, v in _zh(zh_real).items() if not k.startswith("librispeech")}
    kaldi = tmp_path / "kaldi"
    kaldi.mkdir()
    (kaldi / "wav.scp").write_text("".join(f"{k} {p}\n" for k, (p, _) in zh.items()) + "orphan /x.wav\n")
    (kaldi / "text").write_text("".join(f"{k} {t}\n" for k, (_, t) in zh.items()) + "lonely 你好\n",
                                encoding="utf-8")
    code = main(["prepare", str(kaldi), "--model", str(large_dir), "--output", str(tmp_path / "k")])
    report = json.loads((tmp_path / "k" / "report.json").read_text(encoding="utf-8"))
    excluded = {e["key"]: e["kind"] for e in report["excluded"]}
    assert code == 1 and excluded == {"orphan": "no_transcript", "lonely": "no_audio"}
    assert report["counts"]["kept"] == len(zh)
    folder = tmp_path / "audio"
    folder.mkdir()
    for k, (p, _) in zh.items():
        (folder / p.name).symlink_to(p)
    tsv = tmp_path / "transcripts.tsv"
    tsv.write_text("".join(f"{p.name}\t{t}\n" for k, (p, t) in zh.items()), encoding="utf-8")
    code = main(["prepare", str(folder), "--transcripts", str(tsv), "--model", str(large_dir),
                 "--output", str(tmp_path / "f")])
    rows = [json.loads(x) for x in (tmp_path / "f" / "data.jsonl").read_text(encoding="utf-8").splitlines()]
    assert code == 0
    assert {r["key"]: r["target"] for r in rows} == {k: t for k, (_, t) in zh.items()}


def test_speaking_rate_outlier_is_flagged(tmp_path, capsys):
    rng = np.random.default_rng(1)
    rows = []
    for i in range(15):
        sf.write(tmp_path / f"{i}.wav", (rng.standard_normal(16000 * 2) * 0.01).astype("float32"), 16000)
        rows.append({"key": f"u{i}", "source": str(tmp_path / f"{i}.wav"), "target": "你好我们" + "好" * (i % 3)})
    rows[3]["target"] = "你好" * 40  # 80 tokens in 2 s: not what the audio says
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tokens = json.loads((DEMO / "tokens.json").read_text(encoding="utf-8"))
    assert all(c in tokens for c in "你好我们")
    code = main(["prepare", str(tmp_path / "d.jsonl"), "--model", str(DEMO), "--output", str(tmp_path / "o")])
    report = json.loads((tmp_path / "o" / "report.json").read_text(encoding="utf-8"))
    assert code == 0
    flagged = {w["key"]: w["warnings"] for w in report["warnings"]}
    assert list(flagged) == ["u3"] and "tokens/s is fast" in flagged["u3"][0]


def test_missing_input_is_an_error(tmp_path, capsys):
    code = main(["prepare", str(tmp_path / "nope.jsonl"), "--model", str(DEMO), "--output", str(tmp_path / "o")])
    assert code == 2 and "nope.jsonl: not found" in capsys.readouterr().err


def test_non_finite_audio_is_found_by_reading_it(tmp_path, capsys):
    """A float WAV with NaN or inf samples has a good header: prepare decodes it and leaves it out."""
    rng = np.random.default_rng(2)
    rows = []
    for name in ("good", "nan", "inf"):
        wave = (rng.standard_normal(16000) * 0.01).astype("float32")
        if name != "good":
            wave[8000] = np.nan if name == "nan" else -np.inf
        sf.write(tmp_path / f"{name}.wav", wave, 16000, subtype="FLOAT")
        rows.append({"key": name, "source": f"{name}.wav", "target": "你好"})
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    code = main(["prepare", str(tmp_path / "d.jsonl"), "--model", str(DEMO), "--output", str(tmp_path / "o")])
    report = json.loads((tmp_path / "o" / "report.json").read_text(encoding="utf-8"))
    assert code == 1
    assert {e["key"]: e["kind"] for e in report["excluded"]} == {"nan": "non_finite_audio", "inf": "non_finite_audio"}
    assert all("NaN or inf" in e["reason"] and "0.500 s" in e["reason"] for e in report["excluded"])
    assert [json.loads(x)["key"] for x in (tmp_path / "o" / "data.jsonl").read_text().splitlines()] == ["good"]


def test_split_segment_files_stay_in_the_output_folder(tmp_path, capsys, monkeypatch):
    """Defect 1: segment files were named after the key, so `/abs/evil` or `../../evil` wrote outside
    --output. Every key now gives a file in OUTPUT/segments, and keys that would share one both survive."""
    from paratune.data import longaudio
    monkeypatch.setattr(longaudio, "split", lambda wave, limit, tokens, align: [
        longaudio.Segment(0.0, 1.0, None), longaudio.Segment(1.0, len(wave) / 16000, None)])
    work = tmp_path / "work" / "deep"
    work.mkdir(parents=True)
    sf.write(work / "long.wav", np.zeros(16000 * 3, dtype="int16"), 16000, subtype="PCM_16")
    keys = [str(tmp_path / "outside" / "evil"), "../../evil", "a/b", "A", "a", ".."]
    (work / "d.jsonl").write_text("".join(json.dumps({"key": k, "source": "long.wav"}) + "\n" for k in keys))
    before = {p for p in tmp_path.rglob("*")}
    out = work / "out"
    code = main(["prepare", str(work / "d.jsonl"), "--model", str(DEMO), "--output", str(out),
                 "--max-duration", "2", "--long-audio", "split"])
    assert code == 0, capsys.readouterr().err
    created = {p for p in tmp_path.rglob("*")} - before
    assert all(p == out or out in p.parents for p in created), sorted(map(str, created - {out}))
    rows = [json.loads(x) for x in (out / "data.jsonl").read_text().splitlines()]
    assert [r["key"] for r in rows] == [f"{k}-{i:03d}" for k in keys for i in range(2)]
    sources = [Path(r["source"]) for r in rows]
    assert all(p.parent == (out / "segments").resolve() and p.is_file() for p in sources)
    assert len({p.name.casefold() for p in sources}) == len(rows)  # "A" and "a" too (one file on macOS)
    report = json.loads((out / "report.json").read_text())
    warned = {w["key"]: " ".join(w["warnings"]) for w in report["warnings"]}
    assert "already used by key 'A-000'" in warned["a-000"]
