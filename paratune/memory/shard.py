"""Per-rank memory under FSDP2 (`fully_shard` on every block of `model.block_stacks()`: the encoder's,
the decoder's and SeACo's seaco decoder's; then on the model, paratune.train.distributed.shard).

FSDP2 shards each parameter on dim 0: every rank keeps ceil(d0 / N) rows, padded, so rank 0 holds the
most. Gradients are reduce-scattered into the same padded shards, and the optimizer's per-parameter
state (AdamW: two moments and a step count; SGD: a momentum buffer) is made like the local shard.
Every parameter is counted, wherever it lives (SeACo's bias encoder and hotword head, BiCif's
upsampling BLSTM). While a block runs, its parameters are all-gathered whole, and in backward its
unsharded gradients exist until they are reduce-scattered; with the next block prefetched that is
about three blocks' worth of parameter bytes on top of the sharded state. The root unit, every
parameter outside the blocks (embeddings, output layers, the predictor; SeACo's bias encoder and
hotword head), stays gathered from its forward to the end of backward: its whole bytes come on top too.
"""
from __future__ import annotations

import math

from torch import nn

from paratune.memory.estimate import MemoryModel


def state_tensors(optimizer: str) -> tuple[int, int]:
    """(tensors shaped like the parameter, bytes of scalars) per parameter, for our optimizers."""
    return (2, 4) if optimizer == "adamw" else (1, 0)


def sharded_static(model: nn.Module, world_size: int, optimizer: str = "adamw") -> dict:
    """Rank 0's bytes of parameters, gradients and optimizer state when sharded over `world_size`."""
    like, scalars = state_tensors(optimizer)
    out = {"parameters": 0, "gradients": 0, "optimizer_state": 0, "largest_block": 0}
    for p in model.parameters():
        rows = p.shape[0] if p.ndim else 1
        local = math.ceil(rows / world_size) * (p.numel() // rows if rows else 0)
        size = local * p.element_size()
        out["parameters"] += size
        if p.requires_grad:
            out["gradients"] += size
            out["optimizer_state"] += like * size + scalars
    blocks = [b for stack in model.block_stacks().values() for b in stack]
    out["largest_block"] = max(sum(p.numel() * p.element_size() for p in b.parameters()) for b in blocks)
    in_blocks = {id(p) for b in blocks for p in b.parameters()}
    out["root_unit"] = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in in_blocks)
    return out


def shard_model(fitted: MemoryModel, model: nn.Module, world_size: int) -> MemoryModel:
    """The fitted single-device model turned into a per-rank FSDP2 prediction."""
    if world_size < 2:
        return fitted
    s = sharded_static(model, world_size, fitted.options.get("optimizer", "adamw"))
    scale = s["gradients"] / max(1, fitted.resident["gradients"])
    gather = 3 * s["largest_block"] + s["root_unit"]
    coef = [[c[0] + gather, *c[1:]] for c in fitted.coef]
    resident = {"parameters": s["parameters"], "buffers": fitted.resident.get("buffers", 0),
                "optimizer_state": s["optimizer_state"], "gradients": s["gradients"]}
    return MemoryModel(resident=resident,
                       static_forward=s["parameters"] + resident["buffers"] + s["optimizer_state"],
                       gradients=[int(g * scale) for g in fitted.gradients], coef=coef,
                       max_frames=fitted.max_frames, max_tokens=fitted.max_tokens,
                       options={**fitted.options, "fsdp_world_size": world_size}, key=fitted.key,
                       probes=fitted.probes, holdout=fitted.holdout, calibration=fitted.calibration,
                       parts=fitted.parts, hotwords=fitted.hotwords)
