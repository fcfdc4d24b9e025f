"""LoRA adapters through the `peft` library: trained instead of the full weights, merged into them for
export, so the final directory is a plain FunASR `model.pt`.

peft is an optional dependency (`pip install paratune[lora]`): it brings transformers and accelerate,
which nothing else in paratune needs.
"""
from __future__ import annotations

from torch import nn

# every Linear of the SANM encoder and decoder blocks: attention projections and feed-forward layers
DEFAULT_TARGETS = ("linear_q_k_v", "linear_q", "linear_k_v", "linear_out", "w_1", "w_2")


def add_lora(model: nn.Module, r: int, alpha: float = 16.0, dropout: float = 0.05, targets=DEFAULT_TARGETS):
    """The model with rank-`r` adapters on `targets`; only the adapters train."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:  # say what to install, not a traceback
        raise ImportError("LoRA needs the peft library: pip install 'paratune[lora]' (or pip install peft)") from e
    config = LoraConfig(r=int(r), lora_alpha=float(alpha), lora_dropout=float(dropout),
                        target_modules=list(targets))
    from torch._subclasses.fake_tensor import FakeTensor
    if not any(isinstance(p, FakeTensor) for p in model.parameters()):
        return get_peft_model(model, config)
    # Under FakeTensorMode (the memory model's tracer) every tensor is already a fake CPU tensor; peft's
    # moves of modules to their base layer's device would try to swap fake parameters, which torch
    # refuses, so module moves are skipped while the adapters are made.
    to = nn.Module.to
    nn.Module.to = lambda self, *args, **kwargs: self
    try:
        return get_peft_model(model, config)
    finally:
        nn.Module.to = to


def merge_lora(model: nn.Module) -> nn.Module:
    """The plain model with the adapters folded into its weights (a no-op without adapters)."""
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model


def unsharded(build, state: dict, r: int = 0, alpha: float = 16.0, dropout: float = 0.05,
              targets=DEFAULT_TARGETS) -> nn.Module:
    """A plain model from `build()` holding `state`, the full state dict FSDP gathers of the trained model:
    with the run's LoRA adapters first where it trained some (rank `r` > 0), whose keys (peft's) the state
    has; `merge_lora` then folds them in."""
    model = build()
    if r:
        model = add_lora(model, r, alpha, dropout, targets or DEFAULT_TARGETS)
    model.load_state_dict(state)
    return model
