"""The type and range of every fine-tuning configuration value (paratune.train.config.DEFAULTS).

Checked once, when the configuration is read, so that a bad value is refused before any data is
read, any memory fit runs or any model is loaded, with the key's name in the message. Integers are
strict: `10.0` and `true` are not an integer (YAML reads `++a.b=10.0` as a float, `true` as a bool).
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Num:
    """An int (`integer=True`) or a finite number within [lo, hi] (`hi_open`: hi itself excluded)."""

    integer: bool = False
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    null: bool = False

    def ok(self, v) -> bool:
        if v is None:
            return self.null
        if isinstance(v, bool) or not isinstance(v, int if self.integer else (int, float)):
            return False
        if not math.isfinite(v):
            return False
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        return self.hi is None or (v < self.hi if self.hi_open else v <= self.hi)

    def expected(self) -> str:
        text = "an integer" if self.integer else "a number"
        bounds = []
        if self.lo is not None:
            bounds.append(f"{'>' if self.lo_open else '>='} {self.lo:g}")
        if self.hi is not None:
            bounds.append(f"{'<' if self.hi_open else '<='} {self.hi:g}")
        return text + (" " + " and ".join(bounds) if bounds else "") + (" or null" if self.null else "")


@dataclass(frozen=True)
class Choice:
    values: tuple

    def ok(self, v) -> bool:
        return isinstance(v, str) and v in self.values

    def expected(self) -> str:
        return "one of " + ", ".join(self.values)


@dataclass(frozen=True)
class Checkpointing:
    """auto, on, off, or the blocks of each stack as "ENCODER/DECODER" (each a count or all)."""

    def ok(self, v) -> bool:
        if not isinstance(v, str):
            return False
        if v in ("auto", "on", "off"):
            return True
        parts = v.split("/")
        return len(parts) == 2 and all(p.strip() == "all" or p.strip().isdigit() for p in parts)

    def expected(self) -> str:
        return 'auto, on, off, or "E/D": encoder and decoder blocks checkpointed (counts or all), e.g. "12/0"'


@dataclass(frozen=True)
class Bool:
    def ok(self, v) -> bool:
        return isinstance(v, bool)

    def expected(self) -> str:
        return "true or false"


@dataclass(frozen=True)
class Strings:
    """A list of non-empty strings (an empty prefix would match every parameter name)."""

    null: bool = False
    nonempty: bool = False

    def ok(self, v) -> bool:
        if v is None:
            return self.null
        return (isinstance(v, list) and (bool(v) or not self.nonempty)
                and all(isinstance(x, str) and x for x in v))

    def expected(self) -> str:
        return (f"a {'non-empty ' if self.nonempty else ''}list of non-empty strings"
                + (" or null" if self.null else ""))


@dataclass(frozen=True)
class Numbers:
    """null or a non-empty list of numbers each within `each`; `pair`: exactly [lo, hi] with lo <= hi."""

    each: Num
    pair: bool = False

    def ok(self, v) -> bool:
        if v is None:
            return True
        if not isinstance(v, list) or not v or not all(self.each.ok(x) for x in v):
            return False
        return not self.pair or (len(v) == 2 and v[0] <= v[1])

    def expected(self) -> str:
        if self.pair:
            return "null or a list [low, high] of numbers with low <= high"
        return f"null or a non-empty list of numbers, each {self.each.expected().removeprefix('a number ')}"


POSITIVE = Num(lo=0, lo_open=True)
SCHEMA = {
    "train_conf": {"max_epoch": Num(True, 1), "accum_grad": Num(True, 1),
                   "grad_clip": Num(lo=0, null=True),  # 0 or null: no clipping
                   "keep_nbest_models": Num(True, 1), "avg_nbest_model": Num(True, 0),
                   "log_interval": Num(True, 1), "save_checkpoint_interval": Num(True, 0),
                   "validate_interval": Num(True, 0), "seed": Num(True, 0),  # numpy seeds are >= 0
                   "collective_timeout_s": POSITIVE},
    "optim_conf": {"lr": POSITIVE, "weight_decay": Num(lo=0), "optimizer": Choice(("adamw", "sgd"))},
    "scheduler_conf": {"warmup_steps": Num(True, 0)},
    "dataset_conf": {"buffer_size": Num(True, 1),
                     "buckets": Num(lo=1, lo_open=True, null=True),  # growth of geometric length buckets
                     "num_workers": Num(True, 0), "costliest_first": Bool(), "specaug": Bool(),
                     "max_batch": Num(True, 1, null=True), "speed_perturb": Numbers(POSITIVE),
                     "gain_db": Num(lo=0), "noise_snr_db": Numbers(Num(), pair=True),
                     "tilt": Num(lo=0, hi=1, hi_open=True),
                     # SeACo-Paraformer's hotwords sampled from the targets (FunASR's AudioDatasetHotword)
                     "hotword_min_length": Num(True, 1), "hotword_max_length": Num(True, 1),
                     "hotword_sample_rate": Num(lo=0, hi=1), "hotword_double_rate": Num(lo=0, hi=1)},
    "memory": {"precision": Choice(("fp32", "bf16", "fp16")), "checkpointing": Checkpointing(),
               # AdamW's state: auto (8-bit, then on a GPU host memory, only when the budget needs it),
               # fp32, 8bit (bitsandbytes) or offload (host memory: paratune.train.offload)
               "optimizer_state": Choice(("auto", "fp32", "8bit", "offload")),
               "margin": Num(lo=0, hi=1, null=True),  # the share of the budget kept free
               "cpu_track_every": Num(True, 1), "fit_timeout_s": POSITIVE},
    "freeze": Strings(),
    "lora": {"r": Num(True, 0), "alpha": POSITIVE, "dropout": Num(lo=0, hi=1, hi_open=True),
             "targets": Strings(null=True, nonempty=True)},
}
