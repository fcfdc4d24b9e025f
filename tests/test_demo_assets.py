"""The bundled demo (what `make demo` transcribes): the tiny model decodes the bundled clips exactly.

The assets are made by scripts/make_demo_model.py (see paratune/assets/README.md). If a change to the
model, frontend or decoding breaks these transcripts, the bundled model no longer matches the code
that loads it: fix the code, or rebuild the assets with the script.
"""
from pathlib import Path

import pytest

import paratune
from paratune.data.audio import audio_info
from paratune.train.metrics import edit_distance

ASSETS = Path(paratune.__file__).resolve().parent / "assets"
MODEL = ASSETS / "demo_model"
DEMO = ASSETS / "demo"
MAX_MODEL_BYTES = 10 * 1024 * 1024
MAX_CER = 0.0  # the clips are held-out sentences the model decodes exactly; any error is a regression


def _references() -> dict[str, str]:
    refs = {}
    for line in (DEMO / "text").read_text(encoding="utf-8").splitlines():
        if line.strip():
            key, text = line.split(" ", 1)
            refs[key] = text.strip()
    return refs


@pytest.fixture(scope="module")
def demo_model():
    return paratune.load_model(MODEL)


def test_assets_are_complete_and_small():
    for name in ("config.yaml", "model.pt", "tokens.json", "am.mvn"):
        assert (MODEL / name).is_file(), f"{MODEL / name} missing"
    size = sum(f.stat().st_size for f in MODEL.rglob("*") if f.is_file())
    assert size < MAX_MODEL_BYTES, f"demo model is {size / 1e6:.1f} MB (limit 10 MiB)"
    refs = _references()
    wavs = sorted(DEMO.glob("*.wav"))
    assert len(wavs) >= 2
    assert sorted(w.stem for w in wavs) == sorted(refs), "demo/*.wav and demo/text list different keys"
    for w in wavs:
        sr, frames, channels = audio_info(w)
        assert (sr, channels) == (16000, 1) and frames / sr < 10, w


def test_demo_model_transcribes_bundled_clips(demo_model):
    refs = _references()
    wavs = sorted(DEMO.glob("*.wav"))
    hyps = dict(zip((w.stem for w in wavs), demo_model.transcribe_files(wavs)))
    errors = sum(edit_distance(hyps[k], refs[k]) for k in refs)
    cer = errors / sum(len(r) for r in refs.values())
    assert cer <= MAX_CER, f"CER {cer:.2%}: " + "; ".join(f"{k}: {hyps[k]!r} != {refs[k]!r}"
                                                         for k in refs if hyps[k] != refs[k])


def test_demo_command_prints_the_transcripts(capsys):
    """`make demo` runs exactly this: `paratune transcribe --model <demo_model> <demo/*.wav>`."""
    from paratune.cli import main

    wavs = sorted(DEMO.glob("*.wav"))
    assert main(["transcribe", "--model", str(MODEL), *map(str, wavs)]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "\t" in line]
    assert dict(line.split("\t", 1) for line in lines) == _references()
