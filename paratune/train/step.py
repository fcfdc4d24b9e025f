"""One optimisation step, and the model made ready for it. The trainer, the memory model's tracer and
the calibration all run `train_step` on a model made by `prepare_model`: what is traced is what runs.

A step is a list of micro-batches (gradient accumulation), each with its share of the step's loss.
Each micro-batch's tensors go to the device only when it runs. When one runs out of memory, all of the
step's gradients are dropped (they may hold part of its backward), it is replaced by its two halves
(each scaled by its share of the loss weight, so the sum is the same gradient) and the step starts
again. A single utterance that still does not fit is quarantined: reported, never lost silently. What
counts as out of memory, and where a split cannot help (the run stops), is `paratune.train.oom`.
Across ranks every rank drops a micro-batch that any rank ran out of memory in, so all split together
(`paratune.train.distributed`: a flag after each micro-batch under DDP, sync points inside forward and
backward under FSDP); then the gradients are averaged over the ranks (DDP; FSDP reduce-scatters them in
backward), clipped, and the optimizer steps.
"""
from __future__ import annotations

import contextlib
import gc
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from paratune.data.hotwords import with_hotwords
from paratune.data.loader import INPUTS
from paratune.train import distributed, oom

# adamw8bit: bitsandbytes' blockwise 8-bit state; adamw_offload: the state in host memory (paratune.train.offload)
OPTIMIZERS = ("adamw", "sgd", "adamw8bit", "adamw_offload")
ALL = -1  # checkpointing every block of a stack
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class StepOptions:
    """What changes a step's memory besides the batch shapes."""

    precision: str = "fp32"  # fp32 | bf16 (autocast) | fp16 (autocast + loss scaling)
    # activation checkpointing of the first (encoder, decoder) blocks of each stack (ALL: every one);
    # True and False mean (ALL, ALL) and (0, 0)
    checkpointing: tuple[int, int] = (0, 0)
    frozen: tuple[str, ...] = ()  # parameter-name prefixes not trained, e.g. ("encoder.",)
    grad_clip: float | None = 5.0
    optimizer: str = "adamw"  # adamw | sgd (with momentum) | adamw8bit | adamw_offload
    ddp: bool = False  # gradients averaged over ranks after the micro-batches (bucketed all-reduce)
    device: str = "cpu"  # where the step runs: CUDA rounds every tensor to 512 bytes
    lora_r: int = 0  # LoRA adapters of this rank (0: none) on lora_targets; the base weights are frozen
    lora_targets: tuple[str, ...] = ()
    lora_dropout: float = 0.05  # the adapters' input dropout keeps a mask per step

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; choose from {', '.join(PRECISIONS)}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose from {', '.join(OPTIMIZERS)}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"unknown device {self.device!r}; choose from cpu, cuda")
        object.__setattr__(self, "frozen", tuple(self.frozen))
        object.__setattr__(self, "checkpointing", checkpoint_counts(self.checkpointing))
        # a YAML `grad_clip: 5` and the default 5.0 are the same step: the same cached fit
        object.__setattr__(self, "grad_clip", float(self.grad_clip) if self.grad_clip else None)
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        object.__setattr__(self, "lora_dropout", float(self.lora_dropout))

    @property
    def checkpointed(self) -> bool:
        """Whether any block is checkpointed."""
        return self.checkpointing != (0, 0)

    def to_dict(self) -> dict:
        return {**asdict(self), "frozen": list(self.frozen), "lora_targets": list(self.lora_targets),
                "checkpointing": list(self.checkpointing)}


def checkpoint_counts(value) -> tuple[int, int]:
    """(encoder, decoder) checkpointed blocks from a bool, a pair, or text like "44/0" or "all/2"."""
    if isinstance(value, bool):
        return (ALL, ALL) if value else (0, 0)
    if isinstance(value, str):
        value = value.split("/")
    try:
        pair = tuple(ALL if str(x).strip() == "all" else int(x) for x in value)
    except (TypeError, ValueError):
        pair = ()
    if len(pair) != 2 or min(pair) < ALL:
        raise ValueError(f"checkpointing {value!r}: give (encoder blocks, decoder blocks), each a count or 'all'")
    return pair


def checkpoint_text(counts: tuple[int, int]) -> str:
    """(44, 0) -> '44/0', (ALL, ALL) -> 'all/all'."""
    return "/".join("all" if n == ALL else str(n) for n in counts)


def make_optimizer(model: nn.Module, lr: float = 5e-4, weight_decay: float = 0.0, betas=(0.9, 0.999),
                   eps: float = 1e-8, name: str = "adamw", momentum: float = 0.9) -> torch.optim.Optimizer:
    """AdamW (or SGD with momentum) over the trainable parameters, fused where PyTorch has the kernel.

    The fused kernel updates each tensor in place; the default multi-tensor path allocates
    temporaries as large as all parameters together at step time, which is often the step's peak.
    adamw8bit keeps both moments in 8 bits per element (bitsandbytes: blockwise quantization, 256 per
    block; tensors under 4,096 elements stay fp32): 2 bytes per parameter instead of 8. adamw_offload
    keeps none on the device: `HostAdamW` updates a host copy of the weights.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")
    from torch.distributed.tensor import DTensor
    params = [p for p in model.parameters() if p.requires_grad]
    device = params[0].device.type if params else "cpu"
    fused = device in ("cpu", "cuda") and all(p.dtype in (torch.float32, torch.float16, torch.bfloat16)
                                             for p in params)
    if name == "sgd":  # fused SGD has no rule for FSDP's sharded parameters
        fused = fused and not any(isinstance(p, DTensor) for p in params)
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, fused=fused)
    if name in ("adamw8bit", "adamw_offload") and any(isinstance(p, DTensor) for p in params):
        raise ValueError(f"{name} does not update FSDP's sharded parameters: use adamw with --fsdp")
    if name == "adamw8bit":
        return import_bitsandbytes().optim.AdamW8bit(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    if name == "adamw_offload":
        from paratune.train.offload import HostAdamW
        return HostAdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=fused)


def import_bitsandbytes():
    """bitsandbytes, without the warning its import logs on CPUs with AVX512-BF16 about a 4-bit matmul
    kernel it could not download (paratune uses only its 8-bit optimizer)."""
    import logging
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    import bitsandbytes
    return bitsandbytes


@dataclass
class Prepared:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None


def prepare_model(model: nn.Module, options: StepOptions, device=None, wrap=None, lr: float = 5e-4,
                  weight_decay: float = 0.0, lora_alpha: float = 16.0) -> Prepared:
    """The model as a step with `options` runs it: frozen prefixes, LoRA adapters, checkpointing, on
    `device`, `wrap(model)` applied (rank 0's weights broadcast, FSDP sharding), then its optimizer and
    the fp16 loss scaler. The trainer, the tracer and the calibration all start here."""
    for name, p in model.named_parameters():
        p.requires_grad_(not any(name.startswith(prefix) for prefix in options.frozen))
    if options.lora_r:
        from paratune.train.lora import DEFAULT_TARGETS, add_lora
        model = add_lora(model, options.lora_r, lora_alpha, options.lora_dropout,
                         options.lora_targets or DEFAULT_TARGETS)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"freeze={list(options.frozen)} leaves no parameter to train")
    apply_checkpointing(model, options.checkpointing)
    if device is not None:
        model = model.to(device)
    model.train()
    if wrap is not None:
        model = wrap(model)
    optimizer = make_optimizer(model, lr=lr, weight_decay=weight_decay, name=options.optimizer)
    scaler = torch.amp.GradScaler(torch.device(device or "cpu").type) if options.precision == "fp16" else None
    return Prepared(model, optimizer, scaler)


def apply_checkpointing(model: nn.Module, counts: tuple[int, int]) -> None:
    """`StepOptions.checkpointing` on the model's blocks: a flag per block, nothing else changes."""
    from paratune.model.build import set_checkpointing
    enc, dec = counts
    set_checkpointing(model, encoder_blocks=None if enc == ALL else enc, decoder_blocks=None if dec == ALL else dec)


@dataclass
class Micro:
    batch: dict  # tensors + "keys" (none: a placeholder, see `placeholder`)
    scale: float = 1.0


@dataclass
class StepResult:
    trained: list = field(default_factory=list)
    quarantined: list = field(default_factory=list)
    splits: int = 0
    stats: list[dict] = field(default_factory=list)  # per micro-batch, tensors (reading them syncs a GPU)
    shapes: list[tuple[int, int, int]] = field(default_factory=list)  # (B, T, U) of the micro-batches run
    grad_norm: torch.Tensor | None = None

    def floats(self) -> dict:
        """The micro-batches' stats averaged, as floats (with the gradient norm)."""
        out = {}
        for k in (self.stats[0] if self.stats else {}):
            vals = [float(s[k]) for s in self.stats if s.get(k) is not None]
            if vals:
                out[k] = sum(vals) / len(vals)
        if self.grad_norm is not None:
            out["grad_norm"] = float(self.grad_norm)
        return out


def keys_of(batch: dict) -> list:
    return list(batch["keys"]) if "keys" in batch else list(range(len(batch["speech_lengths"])))


def _hotwords(part: dict, batch: dict, spans) -> dict:
    """`part` of `batch` with its own hotwords when the batch has some: these rows' spans only, as the
    collate would have made them for a batch of these rows."""
    return with_hotwords(part, spans, batch["hotwords"]) if "hotword_spans" in batch else part


def take(batch: dict, rows: slice) -> dict:
    """Rows of a padded batch, trimmed to their own longest utterance and target (and their hotwords)."""
    n_frames = int(batch["speech_lengths"][rows].max())
    n_tokens = int(batch["text_lengths"][rows].max())
    part = {"keys": keys_of(batch)[rows], "speech": batch["speech"][rows, :n_frames],
            "speech_lengths": batch["speech_lengths"][rows], "text": batch["text"][rows, :n_tokens],
            "text_lengths": batch["text_lengths"][rows]}
    return _hotwords(part, batch, batch.get("hotword_spans", [])[rows])


def shape_of(batch: dict) -> tuple[int, int, int]:
    return len(batch["speech_lengths"]), int(batch["speech"].shape[1]), int(batch["text"].shape[1])


def loss_weight(batch: dict, predictor_bias: int, length_normalized: bool) -> float:
    """The weight the model's loss is normalised by: target tokens (with the end token) or utterances."""
    if length_normalized:
        return float((batch["text_lengths"] + predictor_bias).sum())
    return float(len(batch["speech_lengths"]))


def autocast_context(device_type: str, dtype: torch.dtype | None):
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=dtype)


def backward_batch(model: nn.Module, batch: dict, scale: float = 1.0, autocast_dtype: torch.dtype | None = None,
                   scaler: torch.amp.GradScaler | None = None, device=None) -> dict:
    """Forward and backward of one (micro-)batch, moved to `device` first, gradients added to `.grad`,
    loss multiplied by `scale` (its share of the step). Returns the model's stats as tensors and the
    loss weight."""
    inputs = {k: batch[k] if device is None else batch[k].to(device, non_blocking=True) for k in INPUTS if k in batch}
    with autocast_context(inputs["speech"].device.type, autocast_dtype):
        loss, stats, weight = model(**inputs)
    del inputs
    loss = loss * scale if scale != 1.0 else loss
    if scaler is not None:
        scaler.scale(loss).backward()
    else:
        loss.backward()
    stats["weight"] = weight
    return stats


def optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float | None = None,
                   scaler: torch.amp.GradScaler | None = None):
    """Clip, step, drop the gradients (they do not stay allocated between steps). Returns the gradient
    norm before clipping (a tensor) or None."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    norm = None
    if grad_clip:
        norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], grad_clip)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


def _run_micro_batches(model, plan: list[Micro], autocast_dtype, scaler, device, agreement, on_oom):
    """Forward and backward of each micro-batch in turn; the index of the first that ran out of memory
    on any rank (all ranks agree), or None; whether it was this rank's own OOM; and the stats."""
    stats = []
    for i, m in enumerate(plan):
        error, own = None, False
        try:
            with agreement.micro_batch():
                stats.append(backward_batch(model, m.batch, m.scale, autocast_dtype, scaler, device))
        except Exception as e:
            own = oom.is_oom(e)
            if not (own or isinstance(e, agreement.peer_error)):
                raise
            if own and oom.in_fsdp_internals(e):  # the peers may be inside the collective it never joined
                raise oom.stop(e, "FSDP's own all-gather or reduce-scatter buffers") from e
            if own:
                agreement.signal()  # first: other ranks may be waiting at a sync point
            error = e
        if agreement.failed(error is not None):
            if on_oom:  # under DDP a rank learns of another's OOM only here
                on_oom(error or distributed.PeerOutOfMemory("another rank ran out of memory; dropping this "
                                                            "micro-batch with it"), len(m.batch["speech_lengths"]))
            return i, own, stats
    return None, False, stats


def placeholder(batch: dict) -> dict:
    """A few frames of the batch's first utterance, weighing nothing in the loss (run with scale 0) and
    training no key: it keeps a rank's micro-batches in step with ranks that split instead, forward and
    backward included (FSDP's collectives run in both). Hotwords: none sampled ([[sos]] only)."""
    t = min(int(batch["speech_lengths"][0]), 8)
    part = {"keys": [], "speech": batch["speech"][:1, :t], "speech_lengths": batch["speech_lengths"][:1].clamp(max=t),
            "text": batch["text"][:1, :1], "text_lengths": batch["text_lengths"][:1].clamp(max=1)}
    return _hotwords(part, batch, [[-1]])


def _split(plan: list[Micro], failed: int, weight_of, result: StepResult, own: bool = True) -> None:
    """Replace the failed micro-batch by its halves; one utterance: quarantine it if the OOM was this rank's
    (`own`), else run it again, alone. Either way two micro-batches take its place, as a split's halves do
    on the other ranks (placeholders where there is nothing to train)."""
    m = plan.pop(failed)
    n = len(m.batch["speech_lengths"])
    if n <= 1:
        if own:
            result.quarantined += keys_of(m.batch)
            plan[failed:failed] = [Micro(placeholder(m.batch), 0.0), Micro(placeholder(m.batch), 0.0)]
        else:  # a peer's OOM: this utterance is healthy
            plan[failed:failed] = [m, Micro(placeholder(m.batch), 0.0)]
        return
    result.splits += 1
    halves = [take(m.batch, slice(0, n // 2)), take(m.batch, slice(n // 2, n))]
    total = weight_of(m.batch)
    plan[failed:failed] = [Micro(h, m.scale * weight_of(h) / total) for h in halves]


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, micro, grad_clip: float | None = None,
               autocast_dtype: torch.dtype | None = None, scaler: torch.amp.GradScaler | None = None,
               device=None, world_size: int = 1, sharded: bool = False, all_reduce=None,
               agreement: distributed.Local | None = None, on_oom=None) -> StepResult:
    """One optimisation step over `micro` (a list of `Micro`, or one batch dict): accumulation, the OOM
    split, the gradient average over `world_size` ranks (unless `sharded`: FSDP did it in backward),
    clipping, the optimizer. `agreement` makes every rank drop a micro-batch any rank ran out of memory
    in (default: the flag all-reduce when a process group is up); `all_reduce` is the collective for
    the gradients (the tracer passes a no-op). Gradients are None on return."""
    plan = [Micro(micro, 1.0)] if isinstance(micro, dict) else list(micro)
    agreement = agreement or distributed.agreement()
    weight_of = lambda b: loss_weight(b, model.predictor_bias, model.length_normalized_loss)  # noqa: E731
    result = StepResult()
    optimizer.zero_grad(set_to_none=True)
    while True:
        failed, own, stats = _run_micro_batches(model, plan, autocast_dtype, scaler, device, agreement, on_oom)
        if failed is None:
            break
        del stats  # drop everything the failed attempt holds, and the step's partial gradients
        optimizer.zero_grad(set_to_none=True)
        agreement.reset(model)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        _split(plan, failed, weight_of, result, own)
    result.stats = stats
    result.trained = [k for m in plan for k in keys_of(m.batch)]
    result.shapes = [shape_of(m.batch) for m in plan if keys_of(m.batch)]
    if world_size > 1 and not sharded:
        with oom.stops("the gradient all-reduce"):
            distributed.all_reduce_gradients(model, world_size, all_reduce=all_reduce)
    with oom.stops("the optimizer step (clipping, the update, AdamW's state at the first step)"):
        result.grad_norm = optimizer_step(model, optimizer, grad_clip, scaler)
    return result
