"""LoRA adapters (`paratune.train.lora`): a run's gathered state loads into a plain model and exports merged."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import paratune
from paratune.modeldir import read_model_dir
from paratune.train.lora import add_lora, merge_lora, unsharded

DEMO = Path(paratune.__file__).parent / "assets" / "demo_model"


@pytest.mark.slow
def test_a_gathered_lora_state_loads_into_a_plain_model_and_merges():
    """Under FSDP the export rebuilds a plain model and loads the gathered full state dict into it; with
    LoRA that state has peft's keys (issue 25: `Error(s) in loading state_dict`, no final/ after a whole run).
    The adapters are added first, then merged: the weights of the trained model's own merge."""
    spec = read_model_dir(DEMO)
    torch.manual_seed(0)
    trained = add_lora(spec.build(), 4, 16.0, 0.0, ("linear_out",))
    for name, p in trained.named_parameters():
        if "lora_B" in name:  # peft starts B at zero: train it a little so the merge changes the weights
            p.data.normal_(0, 0.1)
    state = {k: v.clone() for k, v in trained.state_dict().items()}
    assert any("lora_A" in k for k in state) and all(k.startswith("base_model.model.") for k in state)
    plain = merge_lora(unsharded(spec.build, state, 4, 16.0, 0.0, ("linear_out",)))
    expected = merge_lora(trained).state_dict()
    got = plain.state_dict()
    assert got.keys() == expected.keys() and not any("lora" in k for k in got)
    assert all(torch.equal(got[k], expected[k]) for k in got)
    layer = "encoder.encoders.0.self_attn.linear_out"
    assert not torch.equal(got[f"{layer}.weight"], state[f"base_model.model.{layer}.base_layer.weight"])
    # without adapters the state loads as it is
    base = spec.build().state_dict()
    assert all(torch.equal(unsharded(spec.build, base).state_dict()[k], base[k]) for k in base)
