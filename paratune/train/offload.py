"""AdamW whose state lives in host memory: the plan's lever for a GPU that cannot hold AdamW's two fp32
moments (8 bytes per parameter) beside the weights and gradients.

The device keeps the weights and, during a step, their gradients. Each step copies the (clipped,
unscaled) gradients to the host, runs PyTorch's fused CPU AdamW on an fp32 host copy of the weights,
and copies the weights back: device memory holds no optimizer state and the update allocates nothing
there. The host holds 16 bytes per trained parameter (weights, gradients, two moments).

Why not torchao's `CPUOffloadOptimizer` (tried, torchao 0.18): it refuses to be built without a CUDA or
XPU device, so neither a CPU run nor the CPU tracer can build it, and a lever no trace can follow is a
guess; it copies each gradient to the host in a backward hook, before `clip_grad_norm_` runs, so the
update ignores clipping; and it is not an `Optimizer` (no `state`, no step hooks). The arithmetic here is
still the library's (`torch.optim.AdamW(fused=True)`); this class only moves tensors.
"""
from __future__ import annotations

import torch

HYPER = ("lr", "betas", "eps", "weight_decay")  # what a scheduler or a checkpoint may change


class HostAdamW(torch.optim.Optimizer):
    """`torch.optim.AdamW` over `params` with every tensor of its state on the host. `param_groups` hold
    the device parameters (LR schedulers and the fp16 loss scaler work on them); `state_dict()` is the
    host AdamW's, the same layout as a device AdamW's, so either loads the other's checkpoint."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0):
        params = list(params)
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self._device_params = [p for g in self.param_groups for p in g["params"]]
        # pinned host memory lets the copies run asynchronously; it needs a CUDA device
        pin = torch.cuda.is_available() and any(p.device.type == "cuda" for p in self._device_params)
        with torch.no_grad():
            self._masters = [torch.empty(p.shape, dtype=torch.float32, device="cpu", pin_memory=pin)
                             for p in self._device_params]
            self._grads = [torch.empty_like(m, pin_memory=pin) for m in self._masters]
        self._seen = [None] * len(self._masters)  # each parameter's version when last copied
        groups, start = [], 0
        for g in self.param_groups:
            groups.append({"params": self._masters[start:start + len(g["params"])], **{k: g[k] for k in HYPER}})
            start += len(g["params"])
        self.host = torch.optim.AdamW(groups, fused=True)

    def host_tensors(self) -> list[torch.Tensor]:
        """Every tensor this optimizer keeps in host memory: what a tracker of device memory leaves out."""
        state = [t for s in self.host.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
        return [*self._masters, *self._grads, *state]

    def _sync_hyper(self, source, target) -> None:
        for a, b in zip(source, target):
            b.update({k: a[k] for k in HYPER})

    @torch.no_grad()
    def _refresh_masters(self) -> None:
        """Copy weights changed on the device since this optimizer last wrote them (the first step, a
        checkpoint loaded into the model) to their host copies."""
        for i, (p, m) in enumerate(zip(self._device_params, self._masters)):
            if self._seen[i] != p._version:
                m.copy_(p)
                self._seen[i] = p._version

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("HostAdamW.step takes no closure")
        self._refresh_masters()
        self._sync_hyper(self.param_groups, self.host.param_groups)
        live = [p.grad is not None for p in self._device_params]
        for p, m, g, on in zip(self._device_params, self._masters, self._grads, live):
            if on:
                g.copy_(p.grad, non_blocking=True)
            m.grad = g if on else None  # AdamW skips a tensor without a gradient, as on the device
        for device in {p.device for p in self._device_params if p.device.type == "cuda"}:
            torch.cuda.current_stream(device).synchronize()  # the gradients are on the host before the update
        self.host.step()
        for i, (p, m, on) in enumerate(zip(self._device_params, self._masters, live)):
            m.grad = None
            if on:
                p.copy_(m, non_blocking=True)  # the stream orders it before the next forward
                self._seen[i] = p._version

    def state_dict(self) -> dict:
        self._sync_hyper(self.param_groups, self.host.param_groups)
        return self.host.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.host.load_state_dict(state_dict)
        self._sync_hyper(self.host.param_groups, self.param_groups)


def host_update_seconds(parameters: int, sample: int = 1 << 22, repeats: int = 3) -> float:
    """Seconds the host's part of a `HostAdamW` step (PyTorch's fused CPU AdamW) takes on this machine for
    `parameters` weights: a step over `sample` of them timed, the best of `repeats`, scaled to the count.
    What the plan says the lever costs; the copies to and from the GPU come on top."""
    import time
    weight = torch.zeros(sample, requires_grad=True)
    weight.grad = torch.zeros(sample)
    optimizer = torch.optim.AdamW([weight], fused=True)
    optimizer.step()  # the state is made
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        optimizer.step()
        best = min(best, time.perf_counter() - start)
    return best * parameters / sample
