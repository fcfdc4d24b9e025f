"""The OOM guard: a split step gives the unsplit step's gradient; quarantine; injected OOMs."""
from __future__ import annotations

import copy

import pytest
import torch

from paratune.model.build import build_paraformer
from paratune.train import distributed
from paratune.train.guard import InjectOOM
from paratune.train.step import Micro, make_optimizer, take, train_step
from tests.data.digits import digit_config


def _deterministic_model():
    config = digit_config(d=32, enc_blocks=2, dec_blocks=1)  # no dropout
    config["model_conf"]["sampling_ratio"] = 0.0  # the glancing sampler draws random positions
    torch.manual_seed(0)
    return build_paraformer(config, 14, 560).train()


def _batch(n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(20, 60, (n,), generator=g)
    tokens = torch.randint(1, 6, (n,), generator=g)
    speech = torch.randn(n, int(lengths.max()), 560, generator=g)
    text = torch.full((n, int(tokens.max())), -1)
    for i in range(n):
        speech[i, lengths[i]:] = 0
        text[i, :tokens[i]] = torch.randint(4, 14, (int(tokens[i]),), generator=g)
    return {"speech": speech, "speech_lengths": lengths, "text": text, "text_lengths": tokens,
            "keys": [f"u{i}" for i in range(n)]}


def _grads(model, optimizer):
    """The gradients the optimizer will step with (train_step drops them after the step)."""
    seen = {}
    optimizer.register_step_pre_hook(lambda *_: seen.update(
        {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    return seen


def _reference_grads(model, batch) -> dict:
    """The gradients a plain step of `batch` steps with, on a copy of `model`."""
    reference = copy.deepcopy(model)
    opt = make_optimizer(reference, lr=0.0)
    expected = _grads(reference, opt)
    train_step(reference, opt, [Micro(batch, 1.0)])
    return expected


def _assert_same_grads(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for name in expected:
        assert torch.allclose(got[name], expected[name], atol=1e-6, rtol=1e-5), name


@pytest.mark.parametrize("oom_steps", [[1], [1, 2]], ids=["forward", "forward-then-backward"])
def test_split_step_has_the_unsplit_gradient(oom_steps):
    model = _deterministic_model()
    batch = _batch()
    expected = _reference_grads(model, batch)
    opt = make_optimizer(model, lr=0.0)
    got = _grads(model, opt)
    inject = InjectOOM(model, oom_steps)
    seen = []
    for step in oom_steps:
        inject.arm(step)
        result = train_step(model, opt, [Micro(batch, 1.0)], on_oom=lambda e, n: seen.append(str(e)))
        assert result.splits == 1 and sorted(result.trained) == sorted(batch["keys"]) and not result.quarantined
        assert [s[0] for s in result.shapes] == [3, 3]
        _assert_same_grads(got, expected)
    assert "in forward" in seen[0] and (len(seen) < 2 or "in backward" in seen[1])
    assert all(isinstance(e, str) and "injected out of memory" in e for e in seen)


def test_one_utterance_that_never_fits_is_quarantined():
    model = _deterministic_model()
    batch = _batch(4)
    too_long = batch["speech_lengths"].argmax().item()

    def oom_on_long(module, args):
        if args[0].shape[1] >= int(batch["speech_lengths"][too_long]):
            raise torch.OutOfMemoryError("too long for this card")
    model.encoder.register_forward_pre_hook(oom_on_long)
    result = train_step(model, make_optimizer(model), [Micro(batch, 1.0)])
    assert result.quarantined == [f"u{too_long}"]
    assert sorted(result.trained + result.quarantined) == sorted(batch["keys"])


class PeerRanOutOnce(distributed.Local):
    """The agreement of a rank whose peer ran out of memory in the step's first micro-batch (issue 25: the
    peer's flag arrives through the all-reduce; this rank's own micro-batch was fine)."""

    def __init__(self):
        self.told = False

    def failed(self, oom: bool) -> bool:
        told, self.told = self.told, True
        return oom or not told


def test_a_peers_out_of_memory_on_one_utterance_leaves_this_ranks_utterance_trained():
    """Only the rank whose OOM it was quarantines its utterance: this one trains its own, alone, beside the
    placeholder that keeps it in step with the peer's two (the peer runs two placeholders), with the
    gradient of a step of that utterance."""
    model = _deterministic_model()
    batch = _batch(1)
    expected = _reference_grads(model, batch)
    opt = make_optimizer(model, lr=0.0)
    got = _grads(model, opt)
    forwards = []
    model.encoder.register_forward_pre_hook(lambda module, args: forwards.append(args[0].shape[0]))
    result = train_step(model, opt, [Micro(batch, 1.0)], agreement=PeerRanOutOnce())
    assert not result.quarantined and result.trained == ["u0"]
    assert len(forwards) == 3  # the dropped attempt, then the utterance and a placeholder: the peer's count
    _assert_same_grads(got, expected)


def test_take_trims_padding():
    batch = _batch(4)
    half = take(batch, slice(0, 2))
    assert half["speech"].shape[1] == int(batch["speech_lengths"][:2].max())
    assert half["text"].shape[1] == int(batch["text_lengths"][:2].max())
    assert half["keys"] == ["u0", "u1"]
