"""Cached memory-model fits (`paratune.memory.estimate.fit`): one file per model config, step options and
shape range, so that a repeated plan fits nothing, and one outlier clip's range never serves the short
batches of other runs (`pick_fit`)."""
from __future__ import annotations

import json
import os
from pathlib import Path

from paratune.data.hotwords import HotwordSampling
from paratune.io import atomic_write_text
from paratune.memory.estimate import MemoryModel, fit
from paratune.memory.plan_tracer import PlanTracer
from paratune.memory.trace import StepOptions, fit_key
from paratune.train.step import checkpoint_text


def cache_dir() -> Path:
    """Where fits are kept: $PARATUNE_CACHE, else $XDG_CACHE_HOME/paratune/memory (~/.cache/...)."""
    if os.environ.get("PARATUNE_CACHE"):
        return Path(os.environ["PARATUNE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "paratune" / "memory"


def _grid_up(x: int, least: int) -> int:
    """The first of least x (1, 1.5, 2, 3, 4, 6, 8, ...) at or above x (`least` a power of two)."""
    v = least
    while v < x:
        v = v * 3 // 2 if v & (v - 1) == 0 else v * 4 // 3
    return v


def fit_range(max_frames: int, max_tokens: int) -> tuple[int, int]:
    """Round the range up on a coarse grid, so that manifests of similar lengths share a cached fit."""
    frames = _grid_up(max_frames, 64)
    return frames, min(_grid_up(max_tokens, 16), frames)


def entry_key(key: str, max_frames: int, max_tokens: int) -> str:
    """A cached fit's name: the config-and-options hash and the range (one file per range)."""
    return f"{key}.t{max_frames}.u{max_tokens}"


def cached_fits(cache: Path, key: str) -> list[MemoryModel]:
    """The readable fits of this config and options: one per range, and an older single-file entry
    (named by the hash alone) if there is one. A damaged or foreign file is passed over."""
    out = []
    for path in sorted(cache.glob(f"{key}*.json")):
        try:
            model = MemoryModel.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
        if path.stem == model.key and model.key in (key, entry_key(key, model.max_frames, model.max_tokens)):
            out.append(model)
    return out


def pick_fit(fits: list[MemoryModel], max_frames: int, max_tokens: int) -> MemoryModel | None:
    """The smallest fit that covers the range and is within 2x of it (rounded as a new fit would be):
    a fit on much longer probes is poor at short shapes (one fitted to 180,032 frames over-predicted a
    17 x 36-frame batch 48-fold). Among equal ranges a calibrated one."""
    frames, tokens = fit_range(max_frames, max_tokens)
    near = [m for m in fits if m.covers(max_frames, max_tokens)
            and m.max_frames <= 2 * frames and m.max_tokens <= 2 * tokens]
    return min(near, key=lambda m: (m.max_frames, m.max_tokens, not m.calibration), default=None)


def load_or_fit(config: dict, vocab: int, input_size: int, options: StepOptions, max_frames: int,
                max_tokens: int, holdout: int = 2, cache: Path | None = None, log=None,
                hotwords: HotwordSampling | None = None) -> tuple[MemoryModel, bool]:
    """The cached fit for this model config and these options that suits the range (`pick_fit`), else
    a new fit, cached beside the others. `hotwords`: a SeACo run's hotword sampling (default: the one
    `config` gives, see `paratune.memory.trace.hotword_bound`). Returns (model, was_cached)."""
    cache = cache_dir() if cache is None else Path(cache)
    key = fit_key(config, vocab, input_size, options, hotwords)
    model = pick_fit(cached_fits(cache, key), max_frames, max_tokens)
    if model is not None:
        return model, True
    frames, tokens = fit_range(max_frames, max_tokens)
    if log:
        log(f"fitting the memory model ({options.precision}, {options.optimizer}, checkpointing "
            f"{checkpoint_text(options.checkpointing)} blocks) up to {frames} frames, {tokens} tokens")
    model = fit(PlanTracer(config, vocab, input_size, options, hotwords), frames, tokens, holdout=holdout,
                key=entry_key(key, frames, tokens))
    try:
        cache.mkdir(parents=True, exist_ok=True)
        atomic_write_text(cache / f"{model.key}.json", json.dumps(model.to_dict()))
    except OSError as e:  # a read-only home is no reason to fail the plan
        if log:
            log(f"warning: cannot cache the fit in {cache} ({e.strerror or e})")
    return model, False
