"""Long clips cut at pauses (silero-vad), transcripts divided by a digit model's CIF alignment."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
import soundfile as sf

from paratune.cli import main
from paratune.data.longaudio import SplitError, cut_points
from tests.data.digits import concatenate, fsdd_clips, train_digit_model


@pytest.fixture(scope="module")
def digit_model(shared_data, tmp_path_factory):
    """Trained here, on three speakers' 1-4 digit clips: 250 steps without dropout (about 30 s on one
    core) place every digit of the held-out speaker's segments (200 steps: 95 %)."""
    return train_digit_model(shared_data / "fsdd", tmp_path_factory.mktemp("digits") / "model")


@pytest.mark.slow
def test_split_long_digit_clips_divides_the_transcripts(digit_model, shared_data, tmp_path, capsys):
    rng = random.Random(3)
    clips = fsdd_clips(shared_data / "fsdd", ("nicolas", "george"))  # nicolas was never trained on
    rows, truth = [], {}
    for i in range(10):
        wave, text, spans = concatenate(clips, rng, rng.randint(10, 20), gap=(0.25, 0.7))
        path = tmp_path / f"long{i}.wav"
        sf.write(path, wave, 16000)
        rows.append({"key": f"long{i}", "source": str(path), "target": text})
        truth[f"long{i}"] = (text, spans)
    (tmp_path / "long.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    code = main(["prepare", str(tmp_path / "long.jsonl"), "--model", str(digit_model), "--output", str(out),
                 "--max-duration", "4", "--long-audio", "split", "--align-model", str(digit_model)])
    assert code == 0, capsys.readouterr()
    report = json.loads((out / "report.json").read_text())
    segments = [json.loads(x) for x in (out / "data.jsonl").read_text().splitlines()]
    assert len(report["split"]) == 10 and len(segments) > 30
    right = 0
    for seg in segments:
        key = seg["key"].rsplit("-", 1)[0]
        text, spans = truth[key]
        assert seg["duration"] <= 4.0 + 1e-3
        # where the segment lies in the long clip, from the report's warning "(start-end s)"
        warning = next(w for w in report["warnings"] if w["key"] == seg["key"])["warnings"][0]
        start, end = (float(x) for x in warning.rsplit("(", 1)[1].rstrip(" s)").split("-"))
        expected = "".join(d for d, (a, b) in zip(text, spans) if start <= (a + b) / 2 < end)
        right += seg["target"] == expected
    assert right / len(segments) >= 0.95, (right, len(segments))
    # all digits of every clip are in its segments, in order
    for key, (text, _) in truth.items():
        assert "".join(s["target"] for s in segments if s["key"].startswith(key + "-")) == text


@pytest.mark.slow
def test_vad_split_of_real_long_mandarin(shared_data, tmp_path, capsys):
    folder = shared_data / "long_audio"
    code = main(["prepare", str(folder), "--model", str(shared_data / "paraformer_large"), "--output",
                 str(tmp_path / "o"), "--max-duration", "12", "--long-audio", "split"])
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    rows = [json.loads(x) for x in (tmp_path / "o" / "data.jsonl").read_text().splitlines()]
    assert code in (0, 1)
    originals = {p.stem: sf.info(p).duration for p in folder.glob("*.wav")}
    long_ones = {k for k, d in originals.items() if d > 12}
    failed = {e["key"] for e in report["excluded"] if e["kind"] == "split_failed"}
    assert {s["key"] for s in report["split"]} | failed == long_ones and len(failed) < len(long_ones)
    for s in report["split"]:
        pieces = [r for r in rows if r["key"] in s["segments"]]
        assert all(r["duration"] <= 12 + 1e-3 for r in pieces)
        # the pieces cover the whole clip: nothing is lost at the cuts
        assert sum(r["duration"] for r in pieces) == pytest.approx(originals[s["key"]], abs=0.01)


def test_cut_points_choose_the_last_pause_before_the_limit():
    speech = [(0.0, 2.0), (2.4, 5.0), (5.6, 7.5), (8.0, 11.0)]
    assert cut_points(speech, 11.0, 6.0) == [pytest.approx(5.3)]  # 5.7 s remain: within the limit
    assert cut_points(speech, 11.0, 4.0) == [pytest.approx(2.2), pytest.approx(5.3), pytest.approx(7.75)]
    with pytest.raises(SplitError, match="no pause between 0.0 s and 1.0 s"):
        cut_points(speech, 11.0, 1.0)
    assert cut_points(speech, 11.0, 20.0) == []


def test_segments_do_not_split_a_word(large_dir):
    from paratune.data.prepare import token_spans
    from paratune.data.tokenizer import CharTokenizer
    tok = CharTokenizer(["<unk>", "a@@", "b", "c"], seg_dict={"ab": ["a@@", "b"], "c": ["c"]})
    assert token_spans(tok, "ab c") == [(0, 2), (0, 2), (3, 4)]
    assert np.array(token_spans(CharTokenizer(["<unk>", "你", "好"]), "你 好")).tolist() == [[0, 1], [2, 3]]


def test_the_vad_leaves_torchs_thread_count_alone():
    """silero_vad's import sets torch.set_num_threads(1) for the whole process: everything decoded or
    trained after a split ran on one thread (and an in-process run differed from a fresh process's)."""
    import subprocess
    import sys
    code = ("import numpy as np, torch; torch.set_num_threads(3); from paratune.data.longaudio import speech_segments;"
            " speech_segments(np.zeros(16000, dtype=np.float32)); print(torch.get_num_threads())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split()[-1] == "3"
