"""Training state on disk: written atomically, read with `weights_only=True`."""
from __future__ import annotations

import random
from pathlib import Path

import torch

from paratune.io import atomic_torch_save


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    v = state["python"]
    random.setstate((v[0], tuple(v[1]), v[2]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(path: Path, state: dict) -> None:
    atomic_torch_save(state, path)


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def average(paths) -> dict:
    """The mean of several saved model state dicts (integer tensors from the last)."""
    states = [load(p) for p in paths]
    return {k: torch.stack([s[k].float() for s in states]).mean(0).to(v.dtype) if v.is_floating_point() else v
            for k, v in states[-1].items()}


def full_state(model, optimizer, fsdp: bool):
    """Whole (unsharded) model and optimizer state dicts, on the CPU; a collective under FSDP."""
    if not fsdp:
        return model.state_dict(), (optimizer.state_dict() if optimizer is not None else None)
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=opts)
    optim_state = get_optimizer_state_dict(model, optimizer, options=opts) if optimizer is not None else None
    return model_state, optim_state


def set_full_state(model, optimizer, model_state, optim_state, fsdp: bool) -> None:
    if not fsdp:
        model.load_state_dict(model_state)
        optimizer.load_state_dict(optim_state)
        return
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)
    opts = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_state, options=opts)
    set_optimizer_state_dict(model, optimizer, optim_state, options=opts)
