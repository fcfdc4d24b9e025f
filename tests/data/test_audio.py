"""load_audio / audio_info: errors, channel mixing, resampling (FunASR's soundfile + librosa path)."""
import numpy as np
import pytest
import soundfile as sf

from paratune.data.audio import AudioError, audio_info, load_audio, resample


def _tone(sr, seconds, channels=1):
    t = np.arange(int(sr * seconds)) / sr
    x = 0.3 * np.sin(2 * np.pi * 440 * t)[:, None] * np.arange(1, channels + 1)[None, :] / channels
    return x.astype(np.float32) if channels > 1 else x[:, 0].astype(np.float32)


def test_audio_info_reads_header(zh_real):
    sr, frames, channels = audio_info(zh_real / "nst_48k_ID001.wav")
    assert (sr, channels) == (48000, 1)
    assert frames == sf.info(str(zh_real / "nst_48k_ID001.wav")).frames
    assert load_audio(zh_real / "nst_48k_ID001.wav").shape[0] == -(-frames // 3)


def test_16k_file_is_returned_unchanged(tmp_path):
    x = _tone(16000, 0.5)
    sf.write(tmp_path / "a.wav", x, 16000, subtype="FLOAT")
    assert np.array_equal(load_audio(tmp_path / "a.wav"), x)


def test_stereo_is_mixed_like_funasr(funasr, tmp_path):
    from funasr.utils.load_utils import load_audio_text_image_video

    x = _tone(22050, 0.7, channels=2)
    path = tmp_path / "stereo.wav"
    sf.write(path, x, 22050)
    ours = load_audio(path)
    ref = load_audio_text_image_video(str(path), fs=16000).numpy()
    assert ours.shape == ref.shape == (int(np.ceil(len(x) * 16000 / 22050)),)
    assert np.max(np.abs(ours - ref)) <= 1e-6
    # the mix is the channel mean: channel 1 is half channel 2
    mono = load_audio(path, sample_rate=22050)
    assert np.allclose(mono, sf.read(str(path), dtype="float32")[0].mean(axis=1), atol=1e-7)


@pytest.mark.parametrize("in_sr", [8000, 11025, 22050, 44100, 48000])
def test_resample_equals_librosa(funasr, in_sr):
    import librosa  # FunASR's resampler when torchaudio is absent

    rng = np.random.default_rng(in_sr)
    for n in (1, 7, 441, 1000, 4801, 12345):
        x = rng.uniform(-0.5, 0.5, n).astype(np.float32)
        ref = librosa.resample(x, orig_sr=in_sr, target_sr=16000)
        ours = resample(x, in_sr, 16000)
        assert ours.dtype == np.float32
        assert ours.shape == ref.shape, (in_sr, n)
        assert np.array_equal(ours, ref), (in_sr, n)


def _bad_files(tmp_path):
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x10\x00\x00\x00WAVEjunkjunkjunk" + bytes(range(200)))
    text = tmp_path / "notes.wav"
    text.write_text("this is not audio\n")
    no_samples = tmp_path / "no_samples.wav"
    sf.write(no_samples, np.zeros(0, np.float32), 16000)
    folder = tmp_path / "folder.wav"
    folder.mkdir()
    return {
        "missing": (tmp_path / "missing.wav", "not found"),
        "empty": (empty, "empty file"),
        "corrupt": (corrupt, "unreadable or corrupt"),
        "text": (text, "unreadable or corrupt"),
        "no_samples": (no_samples, "no audio samples"),
        "folder": (folder, "not a regular file"),
    }


@pytest.mark.parametrize("case", ["missing", "empty", "corrupt", "text", "no_samples", "folder"])
@pytest.mark.parametrize("reader", [load_audio, audio_info], ids=["load_audio", "audio_info"])
def test_bad_files_raise_audio_error_naming_file(tmp_path, case, reader):
    path, reason = _bad_files(tmp_path)[case]
    with pytest.raises(AudioError, match=reason) as err:
        reader(path)
    assert str(path) in str(err.value)
    assert err.value.path == str(path)
