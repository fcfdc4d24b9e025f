"""FSDP2 per-rank static memory: predicted against real `fully_shard` runs on CPU (gloo)."""
from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from paratune.memory.shard import shard_model, sharded_static
from paratune.memory.trace import StepOptions
from tests.model.reference import load_config, small_config


def _rank(rank: int, world_size: int, config: dict, tmp: str) -> None:
    from torch.distributed.fsdp import fully_shard

    from paratune.memory.trace import fake_batch
    from paratune.model.build import build_paraformer
    from paratune.train.step import make_optimizer, train_step

    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world_size)
    try:
        torch.manual_seed(0)
        model = build_paraformer(config, 100, 560)
        for block in list(model.encoder.blocks()) + list(model.decoder.blocks()):
            fully_shard(block)
        fully_shard(model)
        optimizer = make_optimizer(model)
        batch = fake_batch(2, 40, 5, 560, 100)
        batch["speech"] = torch.randn(2, 40, 560)
        train_step(model, optimizer, batch, grad_clip=5.0)  # creates the optimizer state
        loss, _, _ = model(**batch)
        loss.backward()  # the sharded gradients, as they stand at the optimizer step

        def storages(tensors):  # bytes of the distinct local storages
            seen = {}
            for t in tensors:
                st = (t.to_local() if hasattr(t, "to_local") else t).untyped_storage()
                seen[st.data_ptr()] = st.nbytes()
            return sum(seen.values())

        measured = {"parameters": storages(model.parameters()),
                    "gradients": storages(p.grad for p in model.parameters() if p.grad is not None),
                    "optimizer_state": storages(v for s in optimizer.state.values() for v in s.values()
                                                if isinstance(v, torch.Tensor))}
        with open(f"{tmp}/rank{rank}.json", "w") as f:
            json.dump(measured, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 4])
def test_fsdp2_static_per_rank_matches_real_shards(large_dir, tmp_path, world_size):
    config = small_config(load_config(large_dir))
    mp.spawn(_rank, args=(world_size, config, str(tmp_path)), nprocs=world_size)
    with torch.device("meta"):
        from paratune.model.build import build_paraformer
        predicted = sharded_static(build_paraformer(config, 100, 560), world_size)
    total = predicted["parameters"] + predicted["gradients"] + predicted["optimizer_state"]
    for rank in range(world_size):
        measured = json.loads((tmp_path / f"rank{rank}.json").read_text())
        real = sum(measured.values())
        assert abs(total - real) <= 0.03 * real, (rank, predicted, measured)
    rank0 = json.loads((tmp_path / "rank0.json").read_text())
    assert rank0 == {k: predicted[k] for k in rank0}  # rank 0 holds the padded shards: exact


def test_sharding_divides_the_static_memory(large_dir, fake_fit):
    config = small_config(load_config(large_dir))
    model = fake_fit(config, 100, 560, StepOptions(), 200, 40)
    with torch.device("meta"):
        from paratune.model.build import build_paraformer
        net = build_paraformer(config, 100, 560)
    s2, s4 = shard_model(model, net, 2), shard_model(model, net, 4)
    assert s4.static_step < s2.static_step < model.static_step
    assert s2.static_step == pytest.approx(model.static_step / 2, rel=0.02)
    # activations are per rank and do not shrink; the all-gathered blocks come on top
    assert s2.peak(8, 100, 20) - s2.static_forward > model.peak(8, 100, 20) - model.static_forward - \
        model.resident["gradients"]
