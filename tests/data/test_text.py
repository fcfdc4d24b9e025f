"""sentence_postprocess (with and without timestamps) against FunASR's, on real transcripts and
random real-token sequences."""
import copy
import json
import random
import re

import pytest

from paratune.data.text import abbr_dispose, sentence_postprocess, sentence_postprocess_with_timestamps
from paratune.data.tokenizer import CharTokenizer

from .helpers import pieces_of, read_transcripts


@pytest.fixture(scope="module")
def reference(funasr):
    from funasr.utils.postprocess_utils import sentence_postprocess as funasr_sentence_postprocess

    return lambda tokens: funasr_sentence_postprocess(list(tokens))[0]


@pytest.fixture(scope="module")
def vocab(large_dir):
    return json.loads((large_dir / "tokens.json").read_text(encoding="utf-8"))


def test_real_transcripts(reference, zh_real, large_dir, vocab):
    tok = CharTokenizer(large_dir / "tokens.json")
    vocab_set = set(vocab)
    for key, text in read_transcripts(zh_real).items():
        if key.startswith("librispeech"):
            # English as the model emits it: lower-case words and "xx@@" pieces
            tokens = [p for w in text.lower().split() for p in pieces_of(w, vocab_set)]
            expected = text.lower()
        else:
            tokens = tok.ids2tokens(tok.encode(text, strict=True))
            expected = text
        ours = sentence_postprocess(tokens + ["</s>"])
        assert ours == reference(tokens + ["</s>"]), key
        assert ours == expected, key


def _pools(vocab):
    pools = {
        "zh": [t for t in vocab if re.fullmatch(r"[\u4e00-\u9fff]", t)],
        "piece": [t for t in vocab if t.endswith("@@")],
        "word": [t for t in vocab if re.fullmatch(r"[a-z']{2,}", t)],
        "letter": [t for t in vocab if re.fullmatch(r"[a-z]", t)],
        "digit": [t for t in vocab if re.fullmatch(r"[0-9]", t)],
        "digit_piece": [t for t in vocab if re.fullmatch(r"[0-9-]@@", t)],  # "0@@" passes as Chinese
        "special": ["<unk>", "</s>", "<s>", "<blank>"],
        "other": [t for t in vocab if t in ("&", "'", "@", ".", "\U0002b5af")],
    }
    for name, pool in pools.items():
        assert pool, f"no {name} tokens in the vocabulary"
    return pools


# Sequence flavours: each weights the pools so that all of FunASR's branches get exercised
# (all-Chinese, all-alpha with abbreviations, and mixed).
FLAVOURS = {
    "chinese": {"zh": 8, "digit": 2, "digit_piece": 1, "special": 1},
    "english": {"word": 4, "letter": 4, "special": 1, "other": 1},
    "mixed": {"zh": 3, "piece": 3, "word": 2, "letter": 2, "digit": 1, "digit_piece": 1,
              "special": 1, "other": 1},
}


def _random_sequence(rng: random.Random, pools: dict, i: int) -> list[str]:
    """0-14 tokens of case i's flavour (Chinese, English or mixed, in turn)."""
    flavour = FLAVOURS[list(FLAVOURS)[i % 3]]
    names, weights = zip(*flavour.items())
    return [rng.choice(pools[rng.choices(names, weights)[0]]) for _ in range(rng.randint(0, 14))]


def test_random_token_sequences(reference, vocab):
    pools = _pools(vocab)
    rng = random.Random(20240611)
    mismatches = []
    for i in range(3000):
        seq = _random_sequence(rng, pools, i)
        if sentence_postprocess(seq) != reference(seq):
            mismatches.append((seq, sentence_postprocess(seq), reference(seq)))
    assert not mismatches, mismatches[:5]


@pytest.mark.parametrize(
    "tokens, expected",
    [
        (["你", "好", "</s>"], "你好"),
        (["hel@@", "lo", "world"], "hello world"),
        (["a", "b", "c"], "ABC"),  # spelled-out letters become an abbreviation
        (["我", "用", "a", "b", "c", "软", "件"], "我用ABC软件"),
        (["你", "hel@@", "lo", "好"], "你hello好"),
        (["<unk>", "<s>"], ""),
        ([], ""),
        (["hel@@"], ""),  # a dangling piece is dropped, as in FunASR
        ([b"\xe4\xbd\xa0", "ok"], "你ok"),
        # FunASR compares whole tokens as strings, so these made-up tokens count as Chinese
        (["你", "1a@@"], "你1a@@"),
        (["你", "中a@@"], "你中a@@"),
    ],
)
def test_examples(reference, tokens, expected):
    assert sentence_postprocess(tokens) == expected
    assert reference(tokens) == expected


def test_abbr_dispose_merges_only_single_ascii_letters():
    assert abbr_dispose(["a", " ", "b", " ", "c", " ", "dog", " "]) == ["ABC", " ", "dog", " "]
    assert abbr_dispose(["a", " ", "bc"]) == ["a", " ", "bc"]
    assert abbr_dispose(["é", " ", "b"]) == ["é", " ", "b"]
    assert abbr_dispose(["x", " ", "y", "z", " ", "w"]) == ["XY", "ZW"]


def test_abbr_dispose_equals_funasr_on_random_word_lists(funasr):
    from funasr.utils.postprocess_utils import abbr_dispose as funasr_abbr_dispose

    rng = random.Random(7)
    items = ["a", "b", "Z", " ", " ", " ", "dog", "é", "中", "1", "ab"]
    for _ in range(2000):
        words = [rng.choice(items) for _ in range(rng.randint(0, 12))]
        assert abbr_dispose(words) == funasr_abbr_dispose(words), words


@pytest.fixture(scope="module")
def reference_with_timestamps(funasr):
    from funasr.utils.postprocess_utils import sentence_postprocess as funasr_sentence_postprocess

    return lambda tokens, stamps: tuple(funasr_sentence_postprocess(list(tokens), copy.deepcopy(stamps))[:2])


def _outcome(fn):
    try:
        return fn()
    except IndexError:
        return IndexError


def _random_stamps(rng, count):
    bounds = sorted(rng.sample(range(100_000), 2 * count)) if count else []
    return [bounds[i: i + 2] for i in range(0, len(bounds), 2)]


@pytest.mark.reference
def test_random_token_sequences_with_timestamps(reference_with_timestamps, vocab):
    pools = _pools(vocab)
    rng = random.Random(20240612)
    outcomes = []
    for i in range(3000):
        seq = _random_sequence(rng, pools, i)
        # one stamp per token left after the drop, as token_timestamps gives; sometimes fewer or more
        count = sum(t not in ("<s>", "</s>", "<unk>", "<OOV>") for t in seq)
        count = max(0, count + rng.choice([0, 0, 0, 0, -1, -3, 2]))
        stamps = _random_stamps(rng, count)
        ours = _outcome(lambda: sentence_postprocess_with_timestamps(seq, stamps))
        expected = _outcome(lambda: reference_with_timestamps(seq, stamps))
        assert ours == expected, (seq, stamps)
        outcomes.append(ours)
    assert sum(o is IndexError for o in outcomes) > 50
    assert sum(o is not IndexError and len(o[1]) > 3 for o in outcomes) > 1000


@pytest.mark.reference
@pytest.mark.parametrize(
    "tokens, stamps, expected",
    [
        (["你", "好", "</s>"], [[0, 100], [100, 200]], ("你 好", [[0, 100], [100, 200]])),
        (["hel@@", "lo", "world"], [[0, 10], [10, 20], [20, 30]], ("hello world", [[0, 20], [20, 30]])),
        (["a", "b", "c"], [[0, 10], [10, 20], [20, 30]], ("ABC", [[0, 30]])),
        (["我", "用", "a", "b", "c", "软"], [[0, 10], [10, 20], [20, 30], [30, 40], [40, 50], [50, 60]],
         ("我 用 ABC 软", [[0, 10], [10, 20], [20, 50], [50, 60]])),
        (["你", "hel@@", "lo", "好"], [[0, 10], [10, 20], [20, 30], [30, 40]],
         ("你 hello 好", [[0, 10], [10, 30], [30, 40]])),
        # quirks: punctuation takes no stamp, so the next word gets the one after it
        (["你", "。", "好"], [[0, 10], [10, 20], [20, 30]], ("你 。 好", [[0, 10], [20, 30]])),
        # too few stamps: Chinese keeps those there are
        (["你", "好", "吗"], [[0, 10]], ("你 好 吗", [[0, 10]])),
        # a character after an unfinished word gets the pieces' stamp
        (["hel@@", "你", "lo"], [[0, 10], [10, 20], [20, 30]], ("你 hello", [[0, 10], [20, 30]])),
        ([], [], ("", [])),
        (["x", "y"], [[0, 10]], IndexError),  # too few stamps for English
    ],
)
def test_examples_with_timestamps(reference_with_timestamps, tokens, stamps, expected):
    assert _outcome(lambda: sentence_postprocess_with_timestamps(tokens, stamps)) == expected
    assert _outcome(lambda: reference_with_timestamps(tokens, stamps)) == expected


@pytest.mark.reference
def test_abbr_dispose_with_timestamps_equals_funasr_on_random_word_lists(funasr):
    from funasr.utils.postprocess_utils import abbr_dispose as funasr_abbr_dispose

    rng = random.Random(8)
    items = ["a", "b", "Z", " ", " ", " ", "dog", "é", "中", "1", "ab"]
    outcomes = []
    for _ in range(2000):
        words = [rng.choice(items) for _ in range(rng.randint(0, 12))]
        count = max(0, sum(w != " " for w in words) - rng.choice([0, 0, 0, 1, 3]))
        stamps = _random_stamps(rng, count)
        ours = _outcome(lambda: abbr_dispose(words, stamps))
        assert ours == _outcome(lambda: funasr_abbr_dispose(words, copy.deepcopy(stamps))), (words, stamps)
        outcomes.append(ours)
    # abbreviations without a stamp for their first letter, and abbreviations with stamps
    assert sum(o is IndexError for o in outcomes) > 10
    assert sum(o is not IndexError and any(w.isupper() and len(w) > 1 for w in o[0]) for o in outcomes) > 100
