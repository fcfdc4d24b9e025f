"""Bytes saved for backward by each aten op in one training forward, on fake CPU vs fake CUDA tensors.

    python benchmarks/saved_by_op.py --model DIR [--shape 16x500x40] [--precision fp32]

Needs a CUDA build of PyTorch (fake CUDA tensors allocate nothing). Pins a difference between the
memory model's CPU trace and a CUDA step (benchmarks/trace_vs_cuda.py) on the ops responsible.
"""
from __future__ import annotations

import argparse
import contextlib
from collections import defaultdict

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from paratune.memory.trace import PRECISIONS, cuda_kernels, fake_batch
from paratune.model.build import build_paraformer
from paratune.modeldir import read_model_dir
from paratune.train.step import autocast_context


class LastOp(TorchDispatchMode):
    op = "?"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else (out,)
        if any(isinstance(o, torch.Tensor) for o in outs):  # not .device, .dim() and other queries
            LastOp.op = str(func.overloadpacket.__name__)
        return out


def saved_by_op(spec, shape, precision: str, device: str) -> dict:
    seen, by_op = set(), defaultdict(int)

    def pack(t):
        st = t.untyped_storage()  # fake tensors have no data pointer: a storage is known by its object
        if id(st) not in seen:
            seen.add(id(st))
            by_op[LastOp.op] += st.nbytes()
        return t

    ctx = torch.device(device) if device == "cuda" else contextlib.nullcontext()
    with FakeTensorMode(), ctx, cuda_kernels():
        model = build_paraformer(spec.config, spec.vocab_size, spec.input_size).train()
        batch = {k: v.to(device) for k, v in fake_batch(*shape, spec.input_size, spec.vocab_size).items()}
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), LastOp(), \
                autocast_context(device, PRECISIONS[precision]):
            model(**batch)
    return dict(by_op)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--shape", default="16x500x40")
    ap.add_argument("--precision", default="fp32")
    args = ap.parse_args()
    spec = read_model_dir(args.model)
    shape = tuple(int(x) for x in args.shape.split("x"))
    cpu = saved_by_op(spec, shape, args.precision, "cpu")
    cuda = saved_by_op(spec, shape, args.precision, "cuda")
    gib = 2 ** 30
    print(f"{args.precision} {args.shape}: saved for backward, GiB (fake tensors)")
    print(f"{'op':<40} {'cpu':>8} {'cuda':>8} {'cpu-cuda':>9}")
    for op in sorted(set(cpu) | set(cuda), key=lambda o: -abs(cpu.get(o, 0) - cuda.get(o, 0))):
        a, b = cpu.get(op, 0) / gib, cuda.get(op, 0) / gib
        if max(a, b) > 0.005:
            print(f"{op:<40} {a:8.3f} {b:8.3f} {a - b:9.3f}")
    print(f"{'total':<40} {sum(cpu.values()) / gib:8.3f} {sum(cuda.values()) / gib:8.3f}")


if __name__ == "__main__":
    main()
