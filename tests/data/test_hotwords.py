"""SeACo hotwords: FunASR's sampling and collator, per-utterance seeding (workers, resume), the OOM split,
and the hotwords a user gives for decoding."""
from __future__ import annotations

import random
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from paratune.data.hotwords import (HotwordError, HotwordSampling, hotword_ids, hotword_sampling, hotword_tensors,
                                    read_hotwords, sample_spans, span_rng)
from paratune.data.loader import FeatureDataset, collate, make_loader, model_inputs, placeholder_batch, step_batch
from paratune.data.sampler import MemoryBoundedSampler
from paratune.data.tokenizer import CharTokenizer
from paratune.modeldir import read_model_dir
from paratune.train.config import DEFAULTS, ConfigError, load_config
from paratune.train.step import Micro, placeholder, take, train_step

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "paratune" / "assets" / "demo"
NO_BIAS = 57
SETTINGS = [HotwordSampling(no_bias=NO_BIAS),  # FunASR's defaults
            HotwordSampling(no_bias=NO_BIAS, min_length=1, max_length=3, sample_rate=1.0, double_rate=0.9),
            HotwordSampling(no_bias=NO_BIAS, min_length=3, max_length=3, sample_rate=0.5, double_rate=0.5)]


def _funasr_generate_index(rng: random.Random):
    """FunASR's `generate_index`, the function nested in AudioDatasetHotword.__getitem__, drawing from `rng`."""
    from funasr.datasets.audio_datasets.datasets import AudioDatasetHotword
    consts = AudioDatasetHotword.__getitem__.__code__.co_consts
    code = next(c for c in consts if getattr(c, "co_name", None) == "generate_index")
    defaults = next(c for c in consts if isinstance(c, tuple) and len(c) == code.co_argcount - 1)
    assert not code.co_freevars and defaults == (2, 8, 0.75, 0.1, 0.0, None, None)  # pre_prob 0: as FunASR calls it
    return types.FunctionType(code, {"random": rng}, "generate_index", defaults)


@pytest.mark.reference
@pytest.mark.parametrize("sampling", SETTINGS)
def test_sampling_draws_what_funasr_draws(sampling, funasr):
    seen = set()
    for seed in range(60):
        theirs, ours = random.Random(seed), random.Random(seed)
        generate_index = _funasr_generate_index(theirs)
        for length in range(0, 40):
            expected = generate_index(torch.tensor(length, dtype=torch.int32), sampling.min_length,
                                      sampling.max_length, sampling.sample_rate, sampling.double_rate)
            got = sample_spans(length, ours, sampling)
            assert got == [int(x) for x in expected], (seed, length)
            assert all(type(x) is int for x in got)
            seen.add(len(got))
        assert theirs.getstate() == ours.getstate()  # the same number of draws
    assert seen == {1, 2, 4}  # no hotword, one, two


def _samples(n: int, rng: random.Random, sampling: HotwordSampling):
    texts = [torch.randint(4, 50, (rng.randint(0, 14),)) for _ in range(n)]
    return texts, [sample_spans(len(t), rng, sampling) for t in texts]


@pytest.mark.reference
@pytest.mark.parametrize("sampling", SETTINGS)
def test_collate_makes_funasrs_tensors(sampling, funasr):
    from funasr.datasets.audio_datasets.datasets import AudioDatasetHotword
    stub = types.SimpleNamespace(int_pad_value=-1, float_pad_value=0.0)
    rng = random.Random(1)
    for trial in range(30):
        texts, spans = _samples(rng.randint(1, 6), rng, sampling)
        frames = [rng.randint(5, 30) for _ in texts]
        samples = [{"speech": torch.randn(t, 4), "speech_lengths": torch.tensor([t], dtype=torch.int32),
                    "text": x, "text_lengths": torch.tensor([len(x)], dtype=torch.int32), "hotword_indx": s,
                    "seaco_id": NO_BIAS} for t, x, s in zip(frames, texts, spans)]
        expected = AudioDatasetHotword.collator(stub, samples)
        items = [{"key": f"u{i}", "index": i, "speech": s["speech"], "text": x, "hotword_spans": sp}
                 for i, (s, x, sp) in enumerate(zip(samples, texts, spans))]
        got = collate(items, hotwords=sampling)
        assert torch.equal(got["text"], expected["text"])
        for name in ("hotword_pad", "hotword_lengths", "seaco_label_pad"):
            assert got[name].dtype == expected[name].dtype, name
            assert torch.equal(got[name], expected[name]), (trial, name)
        assert got["hotword_spans"] == spans and got["hotwords"] == sampling
        assert set(model_inputs(got, "cpu")) == {"speech", "speech_lengths", "text", "text_lengths", "hotword_pad",
                                                 "hotword_lengths", "seaco_label_pad"}


def test_hotword_tensors_by_hand():
    text = torch.tensor([[5, 6, 7, 8], [9, 10, -1, -1], [11, -1, -1, -1]])
    out = hotword_tensors(text, torch.tensor([4, 2, 1]), [[1, 2], [-1], [0, 0, -1]], sos=1, no_bias=99)
    assert out["hotword_pad"].tolist() == [[6, 7], [11, 0], [1, 0]]
    assert out["hotword_lengths"].tolist() == [2, 1, 1] and out["hotword_lengths"].dtype == torch.int32
    assert out["seaco_label_pad"].tolist() == [[99, 6, 7, 99], [99, 99, -1, -1], [11, -1, -1, -1]]


def test_placeholder_batch_has_only_sos():
    batch = placeholder_batch(8, HotwordSampling(no_bias=NO_BIAS, sos=1))
    assert batch["hotword_pad"].tolist() == [[1]] and batch["hotword_lengths"].tolist() == [1]
    assert batch["seaco_label_pad"].tolist() == [[NO_BIAS]] and batch["hotword_spans"] == [[-1]]
    assert "hotword_pad" not in placeholder_batch(8)
    unreadable = collate([{"key": "a", "index": 0, "excluded": "bad"}], feature_dim=8, hotwords=SETTINGS[0])
    assert unreadable["keys"] == [] and unreadable["excluded"] == [("a", 0, "bad")]
    assert unreadable["hotword_pad"].tolist() == [[1]] and unreadable["seaco_label_pad"].tolist() == [[NO_BIAS]]


# -- the dataset: spans of (seed, epoch, index) only

def _rows(n: int = 12):
    texts = dict(line.split(maxsplit=1) for line in (DEMO / "text").read_text(encoding="utf-8").splitlines())
    keys = sorted(texts)
    return [{"key": f"{keys[i % 3]}_{i}", "source": str(DEMO / f"{keys[i % 3]}.wav"), "target": texts[keys[i % 3]]}
            for i in range(n)]


@pytest.fixture(scope="module")
def demo_spec():
    return read_model_dir(ROOT / "paratune" / "assets" / "demo_model")


def _dataset(spec, rows, sampling, seed=3, epoch=0, train=True):
    dataset = FeatureDataset(rows, spec.frontend, spec.tokenizer, train=train, seed=seed, hotwords=sampling)
    dataset.epoch = epoch
    return dataset


def _spans(seed: int, epoch: int, lengths: list[int], sampling: HotwordSampling) -> list[list[int]]:
    return [sample_spans(n, span_rng(seed, epoch, i), sampling) for i, n in enumerate(lengths)]


def test_spans_depend_on_seed_epoch_and_utterance_only(demo_spec):
    sampling = SETTINGS[1]
    rows = _rows()
    lengths = [len(demo_spec.tokenizer.encode(r["target"])) for r in rows]
    a = _dataset(demo_spec, rows, sampling)
    state = random.getstate()
    forward = [a[i]["hotword_spans"] for i in range(len(rows))]
    backward = [a[i]["hotword_spans"] for i in reversed(range(len(rows)))][::-1]
    assert forward == backward == _spans(3, 0, lengths, sampling)
    assert random.getstate() == state  # the global generator is left alone
    assert _dataset(demo_spec, rows, sampling, train=False)[5]["hotword_spans"] == forward[5]  # validation too
    assert [_dataset(demo_spec, rows, sampling, epoch=1)[i]["hotword_spans"] for i in range(len(rows))] != forward
    assert [_dataset(demo_spec, rows, sampling, seed=4)[i]["hotword_spans"] for i in range(len(rows))] != forward
    assert "hotword_spans" not in _dataset(demo_spec, rows, None)[0]


def test_workers_and_another_process_draw_the_same_spans(demo_spec):
    sampling, rows = SETTINGS[0], _rows()
    lengths = [len(demo_spec.tokenizer.encode(r["target"])) for r in rows]
    frames = [100] * len(rows)
    sampler = MemoryBoundedSampler(frames, lengths, max_frames=400, seed=0)
    dataset = _dataset(demo_spec, rows, sampling, epoch=2)
    expected = _spans(3, 2, lengths, sampling)
    for batch in make_loader(dataset, sampler, workers=2):
        assert batch["hotword_spans"] == [expected[i] for i in batch["indices"]]
        assert batch["hotwords"] == sampling and "hotword_pad" in step_batch(batch)
    code = ("import json, sys; from paratune.data.hotwords import HotwordSampling, sample_spans, span_rng; "
            f"s = HotwordSampling(no_bias={NO_BIAS}); "
            f"print(json.dumps([sample_spans(n, span_rng(3, 2, i), s) for i, n in enumerate({lengths})]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT,
                         env={"PYTHONHASHSEED": "123", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert out.stdout.strip() == str(expected).replace("'", '"')


# -- the OOM split

def _batch(sampling, n=5, seed=0):
    rng = random.Random(seed)
    texts = [torch.randint(4, 50, (rng.randint(1, 14),)) for _ in range(n)]
    items = [{"key": f"u{i}", "index": i, "speech": torch.randn(rng.randint(5, 30), 4), "text": t,
              "hotword_spans": sample_spans(len(t), rng, sampling)} for i, t in enumerate(texts)]
    return collate(items, hotwords=sampling)


def test_take_rebuilds_each_halfs_hotwords():
    sampling = SETTINGS[1]
    batch = step_batch(_batch(sampling))
    for rows in (slice(0, 2), slice(2, 5), slice(4, 5)):
        half = take(batch, rows)
        assert half["hotword_spans"] == batch["hotword_spans"][rows]
        alone = collate([{"key": k, "index": 0, "speech": batch["speech"][i, :int(batch["speech_lengths"][i])],
                          "text": batch["text"][i, :int(batch["text_lengths"][i])],
                          "hotword_spans": batch["hotword_spans"][i]}
                         for i, k in zip(range(5)[rows], half["keys"])], hotwords=sampling)
        for name in ("text", "hotword_pad", "hotword_lengths", "seaco_label_pad"):
            assert torch.equal(half[name], alone[name]), (rows, name)
    small = placeholder(batch)
    assert small["hotword_pad"].tolist() == [[sampling.sos]] and small["seaco_label_pad"].shape == (1, 1)
    assert "hotword_pad" not in take({k: v for k, v in batch.items() if not k.startswith(("hotword", "seaco"))},
                                     slice(0, 2))


class _Recorder(torch.nn.Module):
    """Records the hotword inputs of each forward; out of memory for more than two utterances."""

    predictor_bias, length_normalized_loss = 1, True

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))
        self.calls = []

    def forward(self, speech, speech_lengths, text, text_lengths, hotword_pad=None, hotword_lengths=None,
                seaco_label_pad=None):
        if len(speech) > 2:
            raise torch.OutOfMemoryError("too many")
        self.calls.append((hotword_pad, hotword_lengths, seaco_label_pad))
        loss = self.w * speech.sum() * 0 + self.w
        return loss, {"loss": loss.detach()}, (text_lengths + 1).sum()


def test_a_split_step_trains_each_rows_own_hotwords():
    sampling = SETTINGS[1]
    batch = step_batch(_batch(sampling, n=4, seed=2))
    model = _Recorder()
    result = train_step(model, torch.optim.SGD(model.parameters(), lr=0.1), [Micro(batch, 1.0)])
    assert result.splits == 1 and sorted(result.trained) == ["u0", "u1", "u2", "u3"]
    for (pad, lengths, labels), rows in zip(model.calls, (slice(0, 2), slice(2, 4))):
        half = take(batch, rows)
        assert torch.equal(pad, half["hotword_pad"]) and torch.equal(lengths, half["hotword_lengths"])
        assert torch.equal(labels, half["seaco_label_pad"])
    plain = {k: v for k, v in batch.items() if k in ("speech", "speech_lengths", "text", "text_lengths", "keys")}
    model.calls = []
    train_step(model, torch.optim.SGD(model.parameters(), lr=0.1), [Micro(take(plain, slice(0, 2)), 1.0)])
    assert model.calls == [(None, None, None)]  # a plain Paraformer batch passes no hotwords


# -- configuration

def test_config_defaults_are_funasrs():
    sampling = hotword_sampling(load_config({}, None, [])["dataset_conf"], NO_BIAS)
    assert sampling == HotwordSampling(no_bias=NO_BIAS)
    assert hotword_sampling(DEFAULTS["dataset_conf"], None) is None
    conf = load_config({}, None, ["++dataset_conf.hotword_max_length=4", "++dataset_conf.hotword_double_rate=0"])
    assert hotword_sampling(conf["dataset_conf"], 9) == HotwordSampling(no_bias=9, max_length=4, double_rate=0.0)


@pytest.mark.parametrize("override", ["hotword_min_length=0", "hotword_max_length=2.5", "hotword_sample_rate=1.5",
                                      "hotword_double_rate=-0.1", "hotword_sample_rate=null"])
def test_config_refuses_bad_values(override):
    with pytest.raises(ConfigError, match="dataset_conf.hotword_"):
        load_config({}, None, [f"++dataset_conf.{override}"])


def test_config_refuses_min_above_max():
    conf = load_config({}, None, ["++dataset_conf.hotword_min_length=5", "++dataset_conf.hotword_max_length=3"])
    with pytest.raises(ConfigError, match=r"hotword_max_length: expected >= hotword_min_length \(5\), got 3"):
        hotword_sampling(conf["dataset_conf"], None)


# -- hotwords for decoding

TOKENS = ["<blank>", "<s>", "</s>", "<unk>", "你", "好", "世", "界", "hel@@", "lo", "1", "2", "阿里巴巴"]
SEG = {"hello": ["hel@@", "lo"], "你": ["你"], "好": ["好"], "世": ["世"], "界": ["界"], "1": ["1"], "2": ["2"]}


def _ids(*tokens):
    return [TOKENS.index(t) for t in tokens]


def test_hotword_ids_with_and_without_seg_dict():
    plain = CharTokenizer(TOKENS)
    # FunASR without a seg_dict: a word is one token (a word not in the vocabulary is <unk>)
    assert hotword_ids(["阿里巴巴", "你好", "好"], plain) == [_ids("阿里巴巴"), _ids("<unk>"), _ids("好")]
    assert hotword_ids(["你 好"], plain) == [_ids("你", "好")]  # a file line's pieces are its tokens
    seg = CharTokenizer(TOKENS, seg_dict=SEG)
    assert hotword_ids(["你好", "HELLO", "世界12", "abc", "你x"], seg) == [
        _ids("你", "好"), _ids("hel@@", "lo"), _ids("世", "界", "1", "2"), _ids("<unk>"), _ids("<unk>")]
    assert hotword_ids(["你好 hello 界"], seg) == [_ids("你", "好", "hel@@", "lo", "界")]


def test_read_hotwords_from_text_and_any_file(tmp_path):
    seg = CharTokenizer(TOKENS, seg_dict=SEG)
    assert read_hotwords(None, None, seg) is None
    assert read_hotwords(" 你好\thello \n世界 ", None, seg) == [_ids("你", "好"), _ids("hel@@", "lo"), _ids("世", "界")]
    path = tmp_path / "words.list"  # not .txt: read all the same
    path.write_bytes("\ufeff你好\r\n\r\n  hello 世界 \r\n".encode("utf-8"))
    assert read_hotwords(None, path, seg) == [_ids("你", "好"), _ids("hel@@", "lo", "世", "界")]
    assert read_hotwords("1", str(path), seg) == [_ids("1"), _ids("你", "好"), _ids("hel@@", "lo", "世", "界")]


@pytest.mark.reference
def test_read_hotwords_is_funasrs(tmp_path, funasr):
    from funasr.models.seaco_paraformer.model import SeacoParaformer
    (tmp_path / "seg_dict").write_text("".join(f"{k} {' '.join(v)}\n" for k, v in SEG.items()), encoding="utf-8")
    seg = CharTokenizer(TOKENS, seg_dict=tmp_path / "seg_dict")
    words = tmp_path / "hotwords.txt"
    words.write_text("你好\nHello 世界\n世界12\nabc\n", encoding="utf-8")
    this = types.SimpleNamespace(sos=1)
    for model_dir in (tmp_path, tmp_path / "elsewhere"):  # with the seg_dict, and without it
        frontend = types.SimpleNamespace(cmvn_file=str(model_dir / "am.mvn"))
        tokenizer = seg if model_dir == tmp_path else CharTokenizer(TOKENS)
        for given in ("你好 hello 阿里巴巴 世界12 x", str(words)):
            expected = SeacoParaformer.generate_hotwords_list(this, given, tokenizer=tokenizer, frontend=frontend)
            got = read_hotwords(None, given, tokenizer) if given.endswith(".txt") else \
                read_hotwords(given, None, tokenizer)
            assert got + [[1]] == expected, given


@pytest.mark.parametrize("content, message", [
    (None, "not found"), ("", "no hotword"), ("\n \n\t\n", "no hotword"),
    ("你好\nhel\x00lo\n", r"line 2: control character\(s\) U\+0000"), (b"\xff\xfe\x00", "not UTF-8"),
])
def test_bad_hotword_files_say_which_and_where(tmp_path, content, message):
    path = tmp_path / "hw.txt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(HotwordError, match=message) as info:
        read_hotwords(None, path, CharTokenizer(TOKENS))
    assert str(path) in str(info.value)


def test_bad_hotword_strings_and_folders(tmp_path):
    tokenizer = CharTokenizer(TOKENS)
    with pytest.raises(HotwordError, match="is a folder"):
        read_hotwords(None, tmp_path, tokenizer)
    with pytest.raises(HotwordError, match="--hotword: no hotword"):
        read_hotwords("  ", None, tokenizer)
    with pytest.raises(HotwordError, match=r"--hotword: control character\(s\) U\+001B"):
        read_hotwords("你好 \x1b[0m", None, tokenizer)
