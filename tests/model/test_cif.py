"""Vectorised CIF against FunASR's loop CIF (values and gradients) and its training-path cif_v1."""
from __future__ import annotations

import pytest
import torch

from paratune.model.cif import CifPredictorV2, cif


def _random_case(seed: int, b=4, t=60, d=16, tail=False):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, d, generator=g)
    alphas = torch.rand(b, t, generator=g) * 0.7
    lengths = torch.randint(t // 3, t + 1, (b,), generator=g)
    lengths[0] = t
    mask = (torch.arange(t)[None] < lengths[:, None]).float()
    alphas = alphas * mask
    if tail:  # what CifPredictorV2 does at inference: tail weight past each end, one extra frame
        pred = CifPredictorV2(d, 1, 1, tail_threshold=0.45)
        hidden, alphas, _ = pred._add_tail(hidden * mask[:, :, None], alphas, mask)
    return hidden, alphas


@pytest.mark.parametrize("tail", [False, True])
@pytest.mark.parametrize("seed", range(8))
def test_vectorised_cif_equals_funasr_loop(funasr, seed, tail):
    from funasr.models.paraformer.cif_predictor import cif as loop_cif

    hidden, alphas = _random_case(seed, tail=tail)
    h1, a1 = hidden.clone().requires_grad_(), alphas.clone().requires_grad_()
    h2, a2 = hidden.clone().requires_grad_(), alphas.clone().requires_grad_()
    emb, fires = cif(h1, a1)
    emb_ref, fires_ref = loop_cif(h2, a2, 1.0)
    assert emb.shape == emb_ref.shape
    assert torch.allclose(emb, emb_ref, atol=1e-5, rtol=1e-5)
    assert torch.allclose(fires, fires_ref, atol=1e-5)
    assert (emb.abs().sum(-1) > 0).sum().item() > 0
    w = torch.randn(emb.shape, generator=torch.Generator().manual_seed(99))
    (emb * w).sum().backward()
    (emb_ref * w).sum().backward()
    assert torch.allclose(h1.grad, h2.grad, atol=1e-5, rtol=1e-5)
    assert torch.allclose(a1.grad, a2.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("seed", range(4))
def test_training_path_equals_funasr_cif_v1_and_fires_every_target(funasr, seed):
    """Alphas scaled to integer target lengths (training): FunASR 1.4.16's predictor uses cif_v1."""
    from funasr.models.paraformer.cif_predictor import cif_v1

    hidden, alphas = _random_case(seed)
    targets = torch.round(alphas.sum(-1)).clamp(min=1)
    scaled = alphas * (targets / alphas.sum(-1))[:, None]
    emb, _ = cif(hidden, scaled, 1.0, targets)
    emb_ref, _ = cif_v1(hidden, scaled, 1.0)
    fired = (emb.abs().sum(-1) > 0).sum(1)
    assert fired.tolist() == targets.long().tolist()
    fired_ref = (emb_ref.abs().sum(-1) > 0).sum(1)
    same = fired_ref == fired  # where FunASR's float rounding also fired the last token
    assert same.any()
    assert torch.allclose(emb[same], emb_ref[same], atol=1e-4, rtol=1e-4)


def test_last_token_fires_even_when_the_sum_rounds_below_the_target():
    hidden = torch.ones(1, 4, 2)
    alphas = torch.tensor([[0.5, 0.5, 0.5, 0.4999997]])  # sums to 2 - 3e-7: float32 keeps it below 2
    emb, _ = cif(hidden, alphas)
    assert (emb.abs().sum(-1) > 0).sum().item() == 1  # without targets: only one crossing
    emb, _ = cif(hidden, alphas, 1.0, torch.tensor([2.0]))
    assert (emb.abs().sum(-1) > 0).sum().item() == 2
    assert torch.allclose(emb.sum(), torch.tensor(4.0), atol=1e-5)  # every frame's weight is used


def test_cif_shares_are_exact_on_a_hand_example():
    hidden = torch.tensor([[[1.0], [10.0], [100.0], [1000.0]]])
    alphas = torch.tensor([[0.6, 0.6, 0.6, 0.3]])
    emb, fires = cif(hidden, alphas)
    # token 0: 0.6*1 + 0.4*10; token 1: 0.2*10 + 0.6*100 + 0.2*1000; remaining 0.1 never fires
    assert emb.shape == (1, 2, 1)
    assert torch.allclose(emb[0, :, 0], torch.tensor([4.6, 262.0]))
    assert torch.allclose(fires[0], torch.tensor([0.6, 1.2, 0.8, 1.1]))


def test_nothing_fires():
    emb, fires = cif(torch.randn(2, 5, 3), torch.full((2, 5), 0.05))
    assert emb.shape == (2, 0, 3)
    assert fires.shape == (2, 5)
