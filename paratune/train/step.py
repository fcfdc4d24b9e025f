"""One optimisation step. The trainer, the benchmarks and the memory model all run this code."""
from __future__ import annotations

import contextlib

import torch
from torch import nn


OPTIMIZERS = ("adamw", "sgd")


def make_optimizer(model: nn.Module, lr: float = 5e-4, weight_decay: float = 0.0, betas=(0.9, 0.999),
                   eps: float = 1e-8, name: str = "adamw", momentum: float = 0.9) -> torch.optim.Optimizer:
    """AdamW (or SGD with momentum) over the trainable parameters, fused where PyTorch has the kernel.

    The fused kernel updates each tensor in place; the default multi-tensor path allocates
    temporaries as large as all parameters together at step time, which is often the step's peak.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")
    params = [p for p in model.parameters() if p.requires_grad]
    device = params[0].device.type if params else "cpu"
    fused = device in ("cpu", "cuda") and all(p.dtype in (torch.float32, torch.float16, torch.bfloat16)
                                             for p in params)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, fused=fused)
    return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=fused)


def autocast_context(device_type: str, dtype: torch.dtype | None):
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=dtype)


def backward_batch(model: nn.Module, batch: dict, scale: float = 1.0, autocast_dtype: torch.dtype | None = None,
                   scaler: torch.amp.GradScaler | None = None) -> dict:
    """Forward and backward of one (micro-)batch, gradients added to `.grad`, loss multiplied by
    `scale` (the batch's share of the step, for accumulation and split batches). Returns the
    model's stats as tensors (reading them syncs a GPU) and the loss weight."""
    device_type = batch["speech"].device.type
    with autocast_context(device_type, autocast_dtype):
        loss, stats, weight = model(**{k: batch[k] for k in ("speech", "speech_lengths", "text", "text_lengths")})
    loss = loss * scale if scale != 1.0 else loss
    if scaler is not None:
        scaler.scale(loss).backward()
    else:
        loss.backward()
    stats["weight"] = weight
    return stats


def optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float | None = None,
                   scaler: torch.amp.GradScaler | None = None, keep_grads: bool = False):
    """Clip, step, drop the gradients. Returns the gradient norm before clipping (a tensor) or None."""
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
    optimizer.zero_grad(set_to_none=not keep_grads)
    return norm


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: dict, grad_clip: float | None = None,
               autocast_dtype: torch.dtype | None = None, scaler: torch.amp.GradScaler | None = None,
               return_stats: bool = True, keep_grads: bool = False) -> dict:
    """Forward, backward, optional clipping, optimizer step. `batch` holds the model's forward
    arguments (speech, speech_lengths, text, text_lengths). Returns float stats.

    Gradients are dropped (set to None) once the optimizer has used them, so they do not stay
    allocated between steps (during validation, checkpoint saving, data loading); the same is done
    on entry in case the caller left some. Under DDP the gradients are views into its buckets
    (`gradient_as_bucket_view=True`), which stay allocated whatever is done: `keep_grads=True` zeroes
    them in place instead, which is what the memory model assumes for DDP."""
    optimizer.zero_grad(set_to_none=not keep_grads)
    stats = backward_batch(model, batch, 1.0, autocast_dtype, scaler)
    norm = optimizer_step(model, optimizer, grad_clip, scaler, keep_grads)
    if not return_stats:  # reading values syncs a GPU, and is impossible on fake tensors (memory model)
        return {}
    if norm is not None:
        stats["grad_norm"] = norm
    return {k: float(v) for k, v in stats.items() if v is not None}
