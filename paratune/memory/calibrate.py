"""Compare the memory model with real steps and keep the correction.

On a GPU the allocator's own figures are the truth: `max_memory_allocated` (tensor bytes, rounded to
the allocator's blocks) and `max_memory_reserved` (what it holds from the driver, including free
blocks). The model predicts tensor bytes, so the reserved/predicted ratio is what a budget must allow
for. On a CPU the same code measures real tensors with the tracker the model was fitted with, which
checks the fit itself (allocated = reserved there). The model's weights are random: a training step's
memory depends on the shapes, not the values (CIF is given the target lengths in training). A SeACo
model's real steps carry the hotwords the fit predicts with: the most its sampling can draw per shape.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import platform
import random
import time

import torch

from paratune.data.hotwords import HotwordSampling, sample_spans, with_hotwords
from paratune.memory.cost import step_timing
from paratune.memory.estimate import MemoryModel
from paratune.memory.trace import PRECISIONS, StepOptions, StepTracer, fake_batch, hotword_bound, no_collective
from paratune.memory.tracker import PeakMemory
from paratune.modeldir import ModelSpec
from paratune.train.distributed import Local
from paratune.train.step import prepare_model, train_step


def real_batch(spec: ModelSpec, b: int, t: int, u: int, device, hotwords: HotwordSampling | None = None) -> dict:
    """Random inputs of the padded shape (B, T, U) on `device`; SeACo (`hotwords`): with the most hotword
    rows and tokens the sampling can draw for it, random tokens."""
    batch = fake_batch(b, t, u, spec.input_size, spec.vocab_size, hotwords)
    batch["speech"] = torch.randn(b, t, spec.input_size)
    batch["text"] = torch.randint(1, spec.vocab_size, (b, u))
    if hotwords is not None:
        pad = batch["hotword_pad"]
        pad[:-1] = torch.randint(1, spec.vocab_size, (pad.shape[0] - 1, pad.shape[1]))
    return {k: v.to(device) for k, v in batch.items()}


def sampled_batch(b: int, t: int, u: int, input_size: int, vocab: int, hotwords: HotwordSampling | None,
                  rng: random.Random) -> dict:
    """A real batch as the loader makes one, padded to (B, T, U): random speech and transcripts, the
    first utterance T frames and U tokens long, the others of random lengths up to those; SeACo
    (`hotwords`): each transcript's hotword spans as the sampler draws them (`sample_spans`) and the
    tensors the collate makes of them (`with_hotwords`). For checking the memory model on real steps."""
    gen = torch.Generator().manual_seed(rng.getrandbits(32))
    frames = [t] + [rng.randint(1, t) for _ in range(b - 1)]
    tokens = [u] + [rng.randint(1, u) for _ in range(b - 1)]
    speech = torch.randn(b, t, input_size, generator=gen) * (torch.arange(t)[None, :, None]
                                                            < torch.tensor(frames)[:, None, None])
    text = torch.full((b, u), -1, dtype=torch.long)
    for row, n in enumerate(tokens):
        text[row, :n] = torch.randint(3, vocab, (n,), generator=gen)
    batch = {"speech": speech, "speech_lengths": torch.tensor(frames), "text": text,
             "text_lengths": torch.tensor(tokens), "keys": list(range(b))}
    if hotwords is None:
        return batch
    spans = [sample_spans(n, rng, hotwords) for n in tokens]
    return with_hotwords(batch, spans, hotwords)


def sampling_of(fitted: MemoryModel) -> HotwordSampling | None:
    """The hotword sampling a fit predicts with (SeACo), or None."""
    return HotwordSampling(**fitted.hotwords) if fitted.hotwords else None


def real_stepper(spec: ModelSpec, options: StepOptions, dev: torch.device, hotwords: HotwordSampling | None = None):
    """The model on `dev` prepared for `options` (as the trainer prepares it), its optimizer and
    `step(batch)`, one training step as the trainer runs it. A first small step has created the
    optimizer state, as in a long run. `hotwords`: a SeACo model's sampling (default: its config's)."""
    ready = prepare_model(spec.build(), options, dev)
    model, optimizer = ready.model, ready.optimizer

    def step(batch):
        train_step(model, optimizer, batch, grad_clip=options.grad_clip,
                   autocast_dtype=PRECISIONS[options.precision], scaler=ready.scaler,
                   world_size=2 if options.ddp else 1, all_reduce=no_collective, agreement=Local())

    step(real_batch(spec, 1, 16, 2, dev, hotword_bound(spec.config, hotwords)))
    return model, optimizer, step


def cuda_peaks(step, batch, dev: torch.device) -> tuple[int, int]:
    """(max allocated, max reserved) bytes of one step on a GPU, from an empty cache: otherwise the cache
    still holds the previous shape's blocks and max_memory_reserved reports them."""
    torch.cuda.synchronize(dev)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(dev)
    step(batch)
    torch.cuda.synchronize(dev)
    return torch.cuda.max_memory_allocated(dev), torch.cuda.max_memory_reserved(dev)


def timed_step(step, batch, dev: torch.device) -> float:
    """Seconds of one step, the device's queue drained before and after."""
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda _: None)
    sync(dev)
    start = time.perf_counter()
    step(batch)
    sync(dev)
    return time.perf_counter() - start


def calibrate(spec: ModelSpec, fitted: MemoryModel, options: StepOptions, shapes, device: str = "cuda",
              seed: int = 0) -> dict:
    """Run real training steps at `shapes` [(B, T, U)] on `device`; return the measured figures and the
    ratios to the prediction, for `MemoryModel.calibration`. A second step at each shape is timed (the
    first pays for warm-up) and its matmul FLOPs counted on fake tensors: "timing" is the line
    seconds = per_step + FLOPs / rate through them (`paratune.memory.cost`), or None."""
    dev = torch.device(device)
    torch.manual_seed(seed)
    sampling = sampling_of(fitted)
    model, optimizer, step = real_stepper(spec, options, dev, sampling)
    counter = StepTracer(spec.config, spec.vocab_size, spec.input_size, options, hotwords=sampling)
    rows = []
    for b, t, u in shapes:
        batch = real_batch(spec, b, t, u, dev, sampling)
        if dev.type == "cuda":
            allocated, reserved = cuda_peaks(step, batch, dev)
        else:
            with PeakMemory(model, optimizer) as tracker:
                step(batch)
            allocated = reserved = tracker.peak
        seconds = timed_step(step, batch, dev)
        del batch
        predicted = fitted.peak(b, t, u)
        rows.append({"batch": b, "frames": t, "tokens": u, "predicted": predicted, "allocated": allocated,
                     "reserved": reserved, "allocated_error": (predicted - allocated) / allocated,
                     "seconds": seconds, "flops": counter.flops(b, t, u)})
    timing = step_timing(rows)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({platform.processor() or 'host'})"
    return {"device": name, "date": datetime.date.today().isoformat(), "torch": torch.__version__,
            "rows": rows,
            "allocated_ratio": max(r["allocated"] / r["predicted"] for r in rows),
            "reserved_ratio": max(r["reserved"] / r["predicted"] for r in rows),
            "timing": dataclasses.asdict(timing) if timing else None}


def ddp_rank_peaks(rank: int, world: int, config: dict, vocab: int, input_size: int, shapes, out: str) -> None:
    """One rank of a real gloo group (file store in `out`): the DDP step (default agreement, dist.all_reduce)
    at each (B, T, U) on this rank's own random speech (SeACo: with the most hotwords its config's
    sampling can draw), tracked by PeakMemory after a warm-up step (the optimizer state). Writes
    out/rank{rank}.json: the peaks, and a checksum of the weights (equal on every rank only if the
    gradients were averaged). For benchmarks and tests (torch.multiprocessing)."""
    import json

    import torch.distributed as dist

    from paratune.model.build import build_paraformer
    from paratune.train.step import Micro

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out}/store", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        options = StepOptions(ddp=True)
        ready = prepare_model(build_paraformer(config, vocab, input_size), options)
        net, optimizer = ready.model, ready.optimizer
        gen = torch.Generator().manual_seed(1000 + rank)
        hotwords = hotword_bound(config)

        def step(b, t, u, tracker=None):
            data = fake_batch(b, t, u, input_size, vocab, hotwords)
            data["speech"] = torch.randn(b, t, input_size, generator=gen)
            with tracker if tracker is not None else contextlib.nullcontext():
                train_step(net, optimizer, [Micro(data, 1.0)], grad_clip=options.grad_clip, world_size=world)

        step(1, 8, 2)
        peaks = []
        for shape in shapes:
            tracker = PeakMemory(net, optimizer)
            step(*shape, tracker=tracker)
            peaks.append(tracker.peak)
        checksum = float(torch.cat([p.detach().reshape(-1) for p in net.parameters()]).double().sum())
        with open(f"{out}/rank{rank}.json", "w") as f:
            json.dump({"peaks": peaks, "checksum": checksum}, f)
    finally:
        dist.destroy_process_group()


def spawn_ranks(fn, args, world: int = 2, timeout_s: float = 1800.0) -> None:
    """`fn(rank, *args)` in `world` spawned processes; raises if one fails or they outlast `timeout_s`."""
    import time

    import torch.multiprocessing as mp
    ctx = mp.start_processes(fn, args=args, nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=2):  # raises if a rank failed
            if time.monotonic() > deadline:
                raise TimeoutError(f"the {world} ranks did not finish within {timeout_s:.0f} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
                p.join(10)
