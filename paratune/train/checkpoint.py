"""Training state on disk: written atomically, read with `weights_only=True`."""
from __future__ import annotations

import random
import re
from pathlib import Path

import torch

from paratune.io import atomic_torch_save


# the kept models a run writes into its folder (validate_and_keep): model.ep3.pt, model.ep3.step500.pt
KEPT_NAME = re.compile(r"model\.ep\d+(\.step\d+)?\.pt")
# what save_state writes; a file without them is not a paratune checkpoint
STATE_KEYS = ("model", "optimizer", "scheduler", "sampler", "rng", "specaug_rng", "step", "epoch", "best")


class CheckpointError(RuntimeError):
    """A checkpoint or kept model that is missing, truncated, not paratune's, or names a file it must not."""


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
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not found") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    except Exception as e:  # noqa: BLE001 - arbitrary bytes make the unpickler raise anything (KeyError, ...)
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated, or not written by paratune): "
                              f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a paratune checkpoint (a {type(state).__name__}, not a dict)")
    return state


def load_state(path: Path) -> dict:
    """A training checkpoint (save_state's), its kept-model list reduced to file names in its folder."""
    state = load(path)
    missing = [k for k in STATE_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"{path}: not a paratune training checkpoint (no {', '.join(missing)})")
    state["best"] = [[cer, kept_name(name, path)] for cer, name in _pairs(state["best"], path)]
    return state


def _pairs(best, path: Path) -> list:
    if not isinstance(best, (list, tuple)) or not all(
            isinstance(b, (list, tuple)) and len(b) == 2 and isinstance(b[0], (int, float)) and isinstance(b[1], str)
            for b in best):
        raise CheckpointError(f"{path}: 'best' is not a list of [CER, file name] pairs")
    return [list(b) for b in best]


def kept_name(entry: str, path: Path) -> str:
    """The file name of a kept model. Checkpoints before names were stored held paths relative to the first
    run's working directory: their last part is the name, looked up in the run folder. Anything that is not
    one of the names validate_and_keep writes is refused: a checkpoint never names a file to delete."""
    name = entry.replace("\\", "/").rsplit("/", 1)[-1]
    if not KEPT_NAME.fullmatch(name):
        raise CheckpointError(f"{path}: kept model {entry!r} is not a name paratune writes (model.epN.pt)")
    return name


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
