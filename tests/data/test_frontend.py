"""paratune's audio loading and WavFrontend against FunASR's, on the real zh_real clips."""
import numpy as np
import pytest
import soundfile as sf
import torch
import yaml

from paratune.data.audio import load_audio
from paratune.data.frontend import FrontendConfigError, WavFrontend, apply_lfr, load_cmvn

LARGE_FRONTEND = dict(fs=16000, window="hamming", n_mels=80, frame_length=25, frame_shift=10,
                      lfr_m=7, lfr_n=6)


def _clips(zh_real):
    clips = sorted(zh_real.glob("*.wav"))
    assert len(clips) >= 7, f"expected the 7 zh_real clips, found {len(clips)}"
    return clips


@pytest.fixture(scope="module")
def funasr_frontend(funasr, large_dir):
    from funasr.frontends.wav_frontend import WavFrontend as FunasrWavFrontend

    return FunasrWavFrontend(cmvn_file=str(large_dir / "am.mvn"), dither=0.0, **LARGE_FRONTEND)


@pytest.fixture(scope="module")
def frontend(large_dir):
    return WavFrontend(cmvn_file=large_dir / "am.mvn", **LARGE_FRONTEND).eval()


@pytest.mark.slow
def test_load_audio_equals_funasr_loader(funasr, zh_real):
    from funasr.utils.load_utils import load_audio_text_image_video

    rates = set()
    for clip in _clips(zh_real):
        rates.add(sf.info(str(clip)).samplerate)
        ref = load_audio_text_image_video(str(clip), fs=16000).numpy()
        ours = load_audio(clip)
        assert ours.dtype == np.float32 and ours.ndim == 1, clip.name
        assert ours.shape == ref.shape, clip.name
        assert np.max(np.abs(ours - ref)) <= 1e-6, clip.name
    assert 48000 in rates, "the 48 kHz clip must be part of the comparison"


def test_features_equal_funasr(funasr, zh_real, frontend, funasr_frontend):
    from funasr.utils.load_utils import extract_fbank, load_audio_text_image_video

    diffs = {}
    for clip in _clips(zh_real):
        ref_audio = load_audio_text_image_video(str(clip), fs=16000)
        ref, ref_len = extract_fbank(ref_audio, data_type="sound", frontend=funasr_frontend)
        ours = frontend.features(load_audio(clip))
        assert ours.dtype == torch.float32
        assert ours.shape == ref[0].shape == (int(ref_len[0]), 560), clip.name
        diffs[clip.name] = float((ours - ref[0]).abs().max())
    print("max abs feature diff per clip:", diffs)
    assert max(diffs.values()) <= 1e-4, diffs


def test_batch_forward_equals_funasr_batch(funasr, zh_real, frontend, funasr_frontend):
    from funasr.utils.load_utils import extract_fbank

    waves = [load_audio(c) for c in _clips(zh_real)[:3]]
    ref, ref_lens = extract_fbank(waves, data_type="sound", frontend=funasr_frontend)
    feats, lens = frontend(waves)
    assert lens.dtype == torch.int32 and feats.dtype == torch.float32
    assert lens.tolist() == ref_lens.tolist()
    assert feats.shape == ref.shape
    assert float((feats - ref).abs().max()) <= 1e-4
    for i, n in enumerate(lens.tolist()):  # padding is zeros
        assert torch.count_nonzero(feats[i, n:]) == 0


def test_fsdd_8khz_clips_equal_funasr(funasr, shared_data, frontend, funasr_frontend):
    from funasr.utils.load_utils import extract_fbank, load_audio_text_image_video

    clips = sorted((shared_data / "fsdd").glob("*.wav"))[::400]
    if not clips:
        pytest.skip("no fsdd clips in the shared data")
    for clip in clips:
        ref_audio = load_audio_text_image_video(str(clip), fs=16000)
        ours = load_audio(clip)
        assert np.array_equal(ours, ref_audio.numpy()), clip.name
        ref, _ = extract_fbank(ref_audio, data_type="sound", frontend=funasr_frontend)
        assert float((frontend.features(ours) - ref[0]).abs().max()) <= 1e-4, clip.name


@pytest.mark.parametrize("n_samples", [300, 399, 400, 401, 1000, 1601])
def test_short_waveforms_equal_funasr(funasr, n_samples, frontend, funasr_frontend):
    """Clips under one 25 ms frame use FunASR's shortened window."""
    from funasr.utils.load_utils import extract_fbank

    wave = np.random.default_rng(n_samples).uniform(-0.3, 0.3, n_samples).astype(np.float32)
    ref, _ = extract_fbank(torch.from_numpy(wave), data_type="sound", frontend=funasr_frontend)
    ours = frontend.features(wave)
    assert ours.shape == ref[0].shape
    assert float((ours - ref[0]).abs().max()) <= 1e-4


def test_too_short_waveform_is_a_clear_error(frontend):
    with pytest.raises(ValueError, match="10-sample waveform"):
        frontend.features(np.zeros(10, np.float32))
    with pytest.raises(ValueError, match="empty"):
        frontend.features(np.zeros(0, np.float32))
    with pytest.raises(ValueError, match="1-D"):
        frontend.features(np.zeros((2, 1000), np.float32))


@pytest.mark.parametrize("lfr", [(7, 6), (1, 1), (5, 3), (4, 2), (2, 5)])
def test_apply_lfr_equals_funasr(funasr, lfr):
    from funasr.frontends.wav_frontend import apply_lfr as funasr_apply_lfr

    m, n = lfr
    gen = torch.Generator().manual_seed(0)
    for T in range(1, 41):
        feats = torch.randn(T, 4, generator=gen)
        ref = funasr_apply_lfr(feats.clone(), m, n)
        ours = apply_lfr(feats, m, n)
        assert ours.shape == ref.shape, (T, lfr)
        assert torch.equal(ours, ref), (T, lfr)


def test_load_cmvn_equals_funasr(funasr, large_dir):
    from funasr.frontends.wav_frontend import load_cmvn as funasr_load_cmvn

    ours = load_cmvn(large_dir / "am.mvn")
    assert ours.shape == (2, 560)
    assert torch.equal(ours, funasr_load_cmvn(str(large_dir / "am.mvn")))


def test_dither_only_in_training_mode(large_dir, zh_real):
    wave = load_audio(zh_real / "nst_ID003.wav")
    fe = WavFrontend(cmvn_file=large_dir / "am.mvn", **LARGE_FRONTEND)  # dither defaults to 1.0
    assert fe.dither == 1.0

    fe.eval()
    a, b = fe.features(wave), fe.features(wave)
    assert torch.equal(a, b)
    fe_no_dither = WavFrontend(cmvn_file=large_dir / "am.mvn", dither=0.0, **LARGE_FRONTEND)
    assert torch.equal(a, fe_no_dither.eval().features(wave))

    fe.train()
    c, d = fe.features(wave), fe.features(wave)
    assert not torch.equal(c, d)
    assert not torch.equal(a, c)
    # dither of 1 int16 step barely moves the features of real speech
    assert float((c - a).abs().mean()) < 0.1
    # torch's generator drives the noise, so training runs are reproducible
    torch.manual_seed(7)
    e = fe.features(wave)
    torch.manual_seed(7)
    assert torch.equal(e, fe.features(wave))


def test_from_config_uses_large_config_and_ignores_unknown_keys(large_dir):
    conf = yaml.safe_load((large_dir / "config.yaml").read_text())["frontend_conf"]
    conf = dict(conf, filter_length_min=-1, filter_length_max=-1, some_future_key=3)
    fe = WavFrontend.from_config(conf, cmvn_file=large_dir / "am.mvn")
    assert (fe.fs, fe.n_mels, fe.lfr_m, fe.lfr_n, fe.window) == (16000, 80, 7, 6, "hamming")
    assert fe.output_size() == 560
    assert fe.dither == 1.0  # FunASR's default, used in training mode
    assert torch.equal(fe.cmvn, load_cmvn(large_dir / "am.mvn"))
    assert list(fe.parameters()) == [] and "cmvn" not in fe.state_dict()


def test_cmvn_tensor_argument_and_dim_check(large_dir):
    cmvn = load_cmvn(large_dir / "am.mvn")
    fe = WavFrontend(cmvn=cmvn, **LARGE_FRONTEND)
    assert torch.equal(fe.cmvn, cmvn)
    with pytest.raises(FrontendConfigError, match="560"):
        WavFrontend(cmvn=cmvn[:, :80], **LARGE_FRONTEND)


@pytest.mark.parametrize(
    "bad",
    [dict(n_mels=0), dict(lfr_m="7"), dict(lfr_n=2.5), dict(fs=True), dict(frame_length=0),
     dict(frame_shift="10"), dict(dither=-1.0), dict(dither=float("nan")), dict(window="hann")],
)
def test_bad_settings_fail_at_construction(bad):
    with pytest.raises(FrontendConfigError, match=next(iter(bad))):
        WavFrontend(**bad)


# --- malformed am.mvn -------------------------------------------------------------------

GOOD_MVN = """<Nnet>
<Splice> 3 3
[ 0 ]
<AddShift> 3 3
<LearnRateCoef> 0 [ -1.0 -2.0 -3.0 ]
<Rescale> 3 3
<LearnRateCoef> 0 [ 0.5 0.25 0.125 ]
</Nnet>
"""

BAD_MVNS = {
    "empty": ("", "empty"),
    "blank": ("\n\n  \n", "empty"),
    "no_rescale": (GOOD_MVN.replace("<Rescale>", "<Other>"), "no <Rescale>"),
    "no_addshift": (GOOD_MVN.replace("<AddShift>", "<Other>"), "no <AddShift>"),
    "non_numeric": (GOOD_MVN.replace("-2.0", "abc"), r":5: non-numeric"),
    "declared_size": (GOOD_MVN.replace("0.25 ", ""), r":7: <Rescale> declares 3 values but the line has 2"),
    "mismatched": (
        GOOD_MVN.replace("<Rescale> 3 3", "<Rescale> 2 2").replace("0.25 ", ""),
        "<AddShift> has 3 values but <Rescale> has 2",
    ),
    "truncated_mid_vector": (GOOD_MVN[: GOOD_MVN.index("0.25")], r":7: .*not closed"),
    "truncated_after_tag": (GOOD_MVN[: GOOD_MVN.index("<Rescale> 3 3") + 14], "truncated"),
    "no_learn_rate_line": (GOOD_MVN.replace("<LearnRateCoef> 0 [ 0.5", "[ 0.5"), r":7: expected '<LearnRateCoef>"),
    "bad_dimension": (GOOD_MVN.replace("<AddShift> 3 3", "<AddShift> x 3"), r":4: bad dimension"),
}


def test_good_mvn_parses(tmp_path):
    path = tmp_path / "am.mvn"
    path.write_text(GOOD_MVN)
    assert load_cmvn(path).tolist() == [[-1.0, -2.0, -3.0], [0.5, 0.25, 0.125]]


@pytest.mark.parametrize("case", sorted(BAD_MVNS))
def test_malformed_mvn_raises_naming_file(tmp_path, case):
    text, reason = BAD_MVNS[case]
    path = tmp_path / f"{case}.mvn"
    path.write_text(text)
    with pytest.raises(FrontendConfigError, match=reason) as err:
        load_cmvn(path)
    assert str(path) in str(err.value)
    with pytest.raises(FrontendConfigError):
        WavFrontend(cmvn_file=path, n_mels=3)


def test_missing_mvn_raises_naming_file(tmp_path):
    path = tmp_path / "nope" / "am.mvn"
    with pytest.raises(FrontendConfigError, match="not found") as err:
        WavFrontend(cmvn_file=path)
    assert str(path) in str(err.value)
