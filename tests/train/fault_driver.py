"""`python tests/train/fault_driver.py finetune ...`: `paratune` in this process, with one SIGKILL armed.

No hook in the product: the driver wraps one function before `paratune.cli.main` runs, and on its Nth call
(counted from this process's start) the process kills itself with SIGKILL: no handler, no `finally`, no
flush, what a power cut, the kernel's OOM killer or a scheduler's `kill -9` leaves behind. Under torchrun
every worker runs this file; only the rank named in PARATUNE_FAULT_RANK arms the fault.

Environment:
  PARATUNE_FAULT       SITE:N, SITE one of
                         backward-before, backward-after     paratune.train.step.backward_batch: before the
                                                             forward of a micro-batch, or after its backward
                         optimizer-before, optimizer-after   paratune.train.step.optimizer_step
                         save                                torch.save: half of the bytes written and synced,
                                                             then the kill (a torn temp file beside the target)
                         valid-forward                       validation, before the forward of a batch
                         valid-decode                        validation, once every batch is decoded
  PARATUNE_FAULT_RANK  the rank that dies (default 0)
  PARATUNE_FAULT_LOG   a file: `SITE N rank R` is appended (and synced) just before the kill, so the test
                       knows that the fault fired, and where
  PARATUNE_FAULT_TRACE a path: no fault; every rank appends one JSON line per call of a site to PATH.rankR
                       ({"site": ..., and for torch.save "file", with "epoch" and "step" for a checkpoint}),
                       the calls an uninterrupted run makes, which the test picks its kill points from
"""
from __future__ import annotations

import functools
import io
import json
import os
import re
import signal
import sys
from pathlib import Path

RANK = os.environ.get("RANK", "0")
SITES = {"backward-before": "backward", "backward-after": "backward", "optimizer-before": "optimizer",
         "optimizer-after": "optimizer", "save": "save", "valid-forward": "valid-forward",
         "valid-decode": "valid-decode"}


def _die(site: str, n: int) -> None:
    log = os.environ.get("PARATUNE_FAULT_LOG")
    if log:
        with open(log, "a", encoding="utf-8") as f:
            f.write(f"{site} {n} rank {RANK}\n")
            f.flush()
            os.fsync(f.fileno())
    os.kill(os.getpid(), signal.SIGKILL)


def _in_memory_model() -> bool:
    """Called by the memory model's fit (paratune.memory: a traced train_step on fake tensors, run when the
    fit is not cached yet), not by training itself: not counted."""
    frame = sys._getframe(2)
    while frame is not None:
        if f"paratune{os.sep}memory{os.sep}" in frame.f_code.co_filename:
            return True
        frame = frame.f_back
    return False


def _killing(fn, site: str, n: int):
    """fn, killing this process at its Nth call: before it runs, or after (site ending in -after)."""
    calls, after = 0, site.endswith("-after")

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        nonlocal calls
        if _in_memory_model():
            return fn(*args, **kwargs)
        calls += 1
        if calls == n and not after:
            _die(site, n)
        result = fn(*args, **kwargs)
        if calls == n:
            _die(site, n)
        return result
    return wrapper


def _torn_save(save, n: int):
    calls = 0

    @functools.wraps(save)
    def wrapper(obj, f, *args, **kwargs):
        nonlocal calls
        calls += 1
        if calls != n:
            return save(obj, f, *args, **kwargs)
        buf = io.BytesIO()
        save(obj, buf, *args, **kwargs)
        data = buf.getvalue()[: len(buf.getvalue()) // 2]
        if hasattr(f, "write"):
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        else:
            Path(f).write_bytes(data)
        _die("save", n)
    return wrapper


def _target(f) -> str:
    """The file a torch.save writes, as folder/name of the final file (atomic_write's `.NAME.XXXX.tmp`)."""
    if hasattr(f, "fileno"):  # os.fdopen's file: its name is the descriptor
        name = getattr(f, "name", None)
        path = Path(name if isinstance(name, str) else os.readlink(f"/proc/self/fd/{f.fileno()}"))
    else:
        path = Path(f)
    m = re.fullmatch(r"\.(.+)\.[^.]+\.tmp", path.name)
    return f"{path.parent.name}/{m.group(1) if m else path.name}"


def _tracing(fn, site: str, out):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if _in_memory_model():
            return fn(*args, **kwargs)
        row = {"site": site}
        if site == "save":
            obj, f = args[0], args[1]
            row["file"] = _target(f)
            if isinstance(obj, dict) and {"epoch", "step", "sampler"} <= set(obj):
                row.update(epoch=int(obj["epoch"]), step=int(obj["step"]))
        out.write(json.dumps(row) + "\n")
        out.flush()
        return fn(*args, **kwargs)
    return wrapper


def _patch(wrap) -> None:
    """wrap(fn, site) applied at every site."""
    import torch

    import paratune.train.step as step
    import paratune.train.validation as validation
    step.backward_batch = wrap(step.backward_batch, "backward")
    step.optimizer_step = wrap(step.optimizer_step, "optimizer")
    save = torch.save
    wrapped = wrap(save, "save")
    # pickling a tensor (all_gather_object's random states) torch.saves it into a BytesIO: not a save site
    torch.save = lambda obj, f, *a, **k: (save if isinstance(f, io.BytesIO) else wrapped)(obj, f, *a, **k)
    validation.model_inputs = wrap(validation.model_inputs, "valid-forward")  # before each batch's forward
    validation.error_rate = wrap(validation.error_rate, "valid-decode")  # once the whole set is decoded


def arm(spec: str) -> None:
    site, _, n = spec.rpartition(":")
    if site not in SITES or not n.isdigit() or int(n) < 1:
        raise SystemExit(f"PARATUNE_FAULT={spec!r}: expected SITE:N, N >= 1, SITE one of {', '.join(SITES)}")
    base, n = SITES[site], int(n)
    if base == "save":
        _patch(lambda fn, s: _torn_save(fn, n) if s == "save" else fn)
    else:
        _patch(lambda fn, s: _killing(fn, site, n) if s == base else fn)


def main() -> int:
    trace, spec = os.environ.get("PARATUNE_FAULT_TRACE"), os.environ.get("PARATUNE_FAULT")
    if trace:
        out = open(f"{trace}.rank{RANK}", "a", encoding="utf-8")  # noqa: SIM115 - open until the process ends
        _patch(lambda fn, site: _tracing(fn, site, out))
    elif spec and RANK == os.environ.get("PARATUNE_FAULT_RANK", "0"):
        arm(spec)
    from paratune.cli import main as paratune
    return paratune(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
