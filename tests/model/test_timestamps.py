"""Token timestamps (fire_weights, token_timestamps) against FunASR 1.4.16's cif_wo_hidden and
ts_prediction_lfr6_standard, on seeded random upsampled weights and token lists."""
from __future__ import annotations

import random

import pytest
import torch

from paratune.data.text import sentence_postprocess_with_timestamps
from paratune.model.timestamps import FIRE_THRESHOLD, fire_weights, token_timestamps

ZH = list("你好世界我们今天天气很不错的")
WORDS = ["hello", "world", "today", "it's", "fine"]
PIECES = ["hel@@", "wor@@", "to@@", "da@@"]
LETTERS = list("abcxyz")
POOLS = {
    "chinese": ZH,
    "english": WORDS + LETTERS,
    "pieces": WORDS + PIECES,
    "letters": LETTERS,
    "mixed": ZH + WORDS + PIECES + LETTERS + ["1", "。", "'"],
}


def _tokens(rng: random.Random) -> list[str]:
    pool = POOLS[rng.choice(list(POOLS))]
    length = rng.choices([0, rng.randint(1, 2), rng.randint(3, 30)], [1, 2, 7])[0]
    tokens = [rng.choice(pool) for _ in range(length)]
    if rng.random() < 0.4:
        tokens.append("</s>")  # alone: no token, one fire expected
    return tokens


def _alphas(rng: random.Random, gen: torch.Generator, num_tokens: int) -> torch.Tensor:
    """Upsampled weights of one utterance: random, with zero runs (silences at the start and the end,
    long gaps between tokens), scaled to sum to the fire count (tokens + 1) or, one case in three, to
    another count (FunASR then rescales them)."""
    frames = rng.choices([rng.randint(1, 6), rng.randint(num_tokens + 1, 4 * num_tokens + 40)], [1, 4])[0]
    alphas = torch.rand(frames, generator=gen) ** rng.choice([1, 3])
    for _ in range(rng.randint(0, 3)):  # silences anywhere, often longer than 12 frames
        start = rng.randrange(frames)
        alphas[start: start + rng.randint(1, 30)] = 0
    if rng.random() < 0.3:
        alphas[: rng.randint(0, 40)] = 0
    if rng.random() < 0.3:
        alphas[frames - rng.randint(0, 40):] = 0
    if rng.random() < 0.02:
        return alphas * 0  # nothing fires, even rescaled (0 / 0): FunASR raises
    if alphas.sum() == 0:
        alphas[rng.randrange(frames)] = 0.5
    target = num_tokens + 1 if rng.random() < 2 / 3 else max(0.3, num_tokens + 1 + rng.uniform(-3, 3))
    return alphas * (target / alphas.sum())


def _case(seed: int):
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    tokens = _tokens(rng)
    n = len(tokens) - (tokens[-1:] == ["</s>"])
    alphas = _alphas(rng, gen, n)
    if rng.random() < 0.1:  # peaks unrelated to the alphas: only their fire count matters
        peaks = torch.rand(alphas.shape, generator=gen) * 1.2
    else:
        peaks = fire_weights(alphas[None], FIRE_THRESHOLD)[0]
    begin_ms = rng.choice([0, 0, rng.randint(1, 600_000), rng.uniform(0, 1e4)])
    return alphas, peaks, tokens, begin_ms


def _outcome(fn):
    try:
        return fn()
    except IndexError:
        return IndexError


@pytest.mark.reference
def test_fire_weights_bit_identical_to_funasr(funasr):
    from funasr.models.bicif_paraformer.cif_predictor import cif_wo_hidden as bicif_cif_wo_hidden
    from funasr.models.paraformer.cif_predictor import cif_wo_hidden

    gen = torch.Generator().manual_seed(0)
    for i in range(60):
        b, t = 1 + i % 4, [1, 2, 7, 50, 300][i % 5]
        alphas = torch.rand(b, t, generator=gen) * (0.3 + i % 3)
        if i % 6 == 5:
            alphas = alphas.double()  # FunASR adds them into a float32 integrator
        threshold = [1.0, FIRE_THRESHOLD, 0.5][i % 3]
        ours = fire_weights(alphas, threshold)
        assert ours.dtype == torch.float32 and ours.shape == (b, t)
        assert torch.equal(ours, cif_wo_hidden(alphas.clone(), threshold))
        assert torch.equal(ours, bicif_cif_wo_hidden(alphas.clone(), threshold))
    # (FunASR's loop cannot stack zero frames)
    assert fire_weights(torch.zeros(2, 0), 1.0).shape == (2, 0)


@pytest.mark.reference
def test_token_timestamps_equal_funasr_on_random_cases(funasr):
    from funasr.utils.timestamp_tools import ts_prediction_lfr6_standard

    def reference(alphas, peaks, tokens, begin_ms):
        return ts_prediction_lfr6_standard(alphas.clone(), peaks.clone(), list(tokens), vad_offset=begin_ms)[1]

    outcomes, rescaled, silences = [], 0, {"start": 0, "middle": 0, "end": 0}
    for seed in range(3000):
        alphas, peaks, tokens, begin_ms = _case(seed)
        before = alphas.clone()
        ours = _outcome(lambda: token_timestamps(alphas, peaks, tokens, begin_ms))
        assert torch.equal(alphas, before), "the caller's alphas were modified"
        expected = _outcome(lambda: reference(alphas, peaks, tokens, begin_ms))
        assert ours == expected, (seed, tokens, begin_ms, ours, expected)
        outcomes.append(ours)
        n = len(tokens) - (tokens[-1:] == ["</s>"])
        rescaled += bool(tokens) and (peaks >= FIRE_THRESHOLD).sum().item() != n + 1
        if isinstance(ours, list) and ours:  # (a silence is 5 upsampled frames of 20 ms or more)
            silences["start"] += ours[0][0] - begin_ms > 110
            silences["middle"] += any(a[1] < b[0] for a, b in zip(ours, ours[1:]))
            silences["end"] += len(alphas) * 20 + begin_ms - ours[-1][1] > 60
    # the cases reach every branch: rescaling, empty, errors, silences, long token lists
    assert rescaled > 500
    assert sum(o == [] for o in outcomes) > 50
    assert sum(o is IndexError for o in outcomes) > 20
    assert sum(isinstance(o, list) and len(o) > 5 for o in outcomes) > 1000
    assert min(silences.values()) > 200, silences


@pytest.mark.reference
def test_timestamps_and_sentence_equal_funasr_chained(funasr):
    """As BiCifParaformer's inference: the token timestamps, then the sentence with word stamps."""
    from funasr.utils.postprocess_utils import sentence_postprocess
    from funasr.utils.timestamp_tools import ts_prediction_lfr6_standard

    checked = 0
    for seed in range(3000, 4000):
        alphas, peaks, tokens, begin_ms = _case(seed)
        stamps = _outcome(lambda: token_timestamps(alphas, peaks, tokens, begin_ms))
        if stamps is IndexError:
            continue
        ref_stamps = ts_prediction_lfr6_standard(alphas.clone(), peaks.clone(), list(tokens), vad_offset=begin_ms)[1]
        ours = _outcome(lambda: sentence_postprocess_with_timestamps(tokens, stamps))
        expected = _outcome(lambda: tuple(sentence_postprocess(list(tokens), ref_stamps)[:2]))
        assert ours == expected, (seed, tokens, stamps)
        checked += 1
    assert checked > 900


def test_token_timestamps_by_hand():
    # 2 tokens + the closing fire at upsampled frames 10, 14 and 30 (shifted by -1.5): a silence
    # before the first token, a long second token cut at 12 frames, a short tail to frame 32
    alphas = torch.zeros(32)
    alphas[[10, 14, 30]] = 1.0
    peaks = fire_weights(alphas[None], FIRE_THRESHOLD)[0]
    assert token_timestamps(alphas, peaks, ["你", "好", "</s>"]) == [[170, 250], [250, 490]]
    assert token_timestamps(alphas, peaks, ["你", "好"], begin_ms=1000) == [[1170, 1250], [1250, 1490]]
    assert token_timestamps(alphas, peaks, []) == []
    # 3 tokens but 3 fires: the alphas are rescaled to 4 / 3 each, whose leftover fires again at
    # the last frame; the caller's alphas are left as they were
    assert token_timestamps(alphas, peaks, ["a", "b", "c"]) == [[170, 250], [250, 490], [570, 640]]
    assert alphas.sum().item() == 3.0


def test_token_timestamps_raise_when_nothing_fires():
    with pytest.raises(IndexError):
        token_timestamps(torch.zeros(10), torch.zeros(10), ["你"])
    with pytest.raises(ValueError):
        token_timestamps(torch.zeros(1, 10), torch.zeros(1, 10), ["你"])


def test_fire_weights_subtracts_the_threshold():
    fires = fire_weights(torch.tensor([[0.5, 0.5, 0.5, 0.5]]), 0.75)
    assert fires.tolist() == [[0.5, 1.0, 0.75, 0.5]]
