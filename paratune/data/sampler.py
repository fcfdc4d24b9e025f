"""A batch sampler whose every batch fits the memory budget.

Each epoch: the utterances are shuffled (seeded by seed and epoch), cut into shuffle buffers, and each
buffer sorted by length and packed greedily: a batch grows while the cost of (B, longest T, largest U)
stays within the limit. Sorting keeps padding low; the buffer keeps the epoch random. The batch order
is then shuffled. The cost is the memory model's predicted need (`paratune.memory.plan.Limit`), or,
without one, padded frames B x T against `max_frames`.

Under DDP every rank must take the same number of steps (else the collective calls hang) and no
utterance may be lost or seen twice: the largest batches are halved until the count divides by the
world size (a half of a fitting batch fits; where every batch is one utterance, empty batches make
up the count, which the loader turns into placeholders that train nothing), batches are grouped by
similar cost into steps of `world_size`, and rank r takes the r-th batch of every step. Like Lhotse's
samplers it is deterministic given the seed, and `state_dict()` / `load_state_dict()` resume mid-epoch exactly.
"""
from __future__ import annotations

import bisect
from typing import Callable, Iterator, Sequence

import numpy as np

Cost = Callable[[int, int, int], bool]  # fits(B, T, U)


def pack(order: np.ndarray, frames: np.ndarray, tokens: np.ndarray, fits: Cost, pad=None,
         max_batch: int | None = None) -> tuple[list[np.ndarray], list[int]]:
    """Greedy packing of `order` (already sorted by T): each batch is the longest run from its first
    utterance that fits (the cost only grows with the run, so a galloping search finds it). `pad` maps
    a batch's longest T to the padded T (buckets). Returns batches and the indices too big alone."""
    t, u = frames[order], tokens[order]
    pad = pad or (lambda x: x)
    n, cap = len(order), max_batch or len(order)
    batches, alone = [], []

    def ok(i, k):
        return fits(k, pad(int(t[i + k - 1])), int(u[i:i + k].max()))

    i = 0
    while i < n:
        if not ok(i, 1):
            alone.append(int(order[i]))
            i += 1
            continue
        good, step = 1, 1
        while good < cap and i + good < n:
            k = min(good + step, cap, n - i)
            if not ok(i, k):
                break
            good, step = k, step * 2
        else:
            batches.append(order[i:i + good])
            i += good
            continue
        lo, hi = good, min(good + step, cap, n - i)  # fits at lo, not at hi
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if ok(i, mid) else (lo, mid)
        batches.append(order[i:i + lo])
        i += lo
    return batches, alone


class MemoryBoundedSampler:
    """Yields lists of utterance indices (a `batch_sampler` for `torch.utils.data.DataLoader`).

    frames, tokens: T (model input frames, after LFR) and U (target tokens) per utterance.
    limit: an object with `fits(B, T, U)` and `need(B, T, U)` (a `paratune.memory.plan.Limit`), or None
      to use `max_frames` (padded frames per batch) as the cost.
    buffer_size: utterances sorted together; larger means less padding, less randomness.
    buckets: frame boundaries; a batch is padded up to the next one (fewer distinct shapes for the
      CUDA allocator to cache). `bucket_boundaries()` makes geometric ones.
    costliest_first: the epoch starts with its costliest batch, so an OOM shows at step one.
    """

    def __init__(self, frames: Sequence[int], tokens: Sequence[int], limit=None, max_frames: int | None = None,
                 shuffle: bool = True, seed: int = 0, buffer_size: int = 20_000,
                 buckets: Sequence[int] | None = None, costliest_first: bool = False, world_size: int = 1,
                 rank: int = 0, max_batch: int | None = None):
        self.frames = np.asarray(frames, dtype=np.int64)
        self.tokens = np.asarray(tokens, dtype=np.int64)
        if self.frames.shape != self.tokens.shape or self.frames.ndim != 1:
            raise ValueError("frames and tokens must be 1-d and of equal length")
        if limit is None and max_frames is None:
            raise ValueError("give a memory limit or max_frames")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in a world of {world_size}")
        self.limit, self.max_frames = limit, max_frames
        self.shuffle, self.seed, self.buffer_size = shuffle, seed, max(1, buffer_size)
        self.buckets = sorted(buckets) if buckets else None
        self.costliest_first, self.max_batch = costliest_first, max_batch
        self.world_size, self.rank = world_size, rank
        self.epoch = 0
        self.position = 0  # batches of this rank already yielded in this epoch
        self._cache: tuple[int, list[list[np.ndarray]], list[int]] | None = None

    # -- cost
    def padded(self, t: int) -> int:
        """The T a batch whose longest utterance has `t` frames is padded to."""
        if not self.buckets:
            return t
        i = bisect.bisect_left(self.buckets, t)
        return self.buckets[i] if i < len(self.buckets) else t

    def fits(self, b: int, t: int, u: int) -> bool:
        if self.limit is not None:
            return self.limit.fits(b, t, u)
        return b * t <= self.max_frames

    def cost(self, batch: np.ndarray) -> float:
        if not len(batch):  # a placeholder (`_divisible`)
            return 0.0
        b, t, u = len(batch), self.padded(int(self.frames[batch].max())), int(self.tokens[batch].max())
        if self.limit is not None:
            return float(self.limit.need(b, t, u))
        return float(b * t)

    # -- epochs
    def _epoch_plan(self, epoch: int) -> tuple[list[list[np.ndarray]], list[int]]:
        """Every rank's batches for `epoch` ([rank][step]), and the utterances too big alone."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1], self._cache[2]
        rng = np.random.default_rng([self.seed, epoch])
        n = len(self.frames)
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        batches, alone = [], []
        for start in range(0, n, self.buffer_size):
            chunk = order[start:start + self.buffer_size]
            chunk = chunk[np.lexsort((self.tokens[chunk], self.frames[chunk]))]
            b, a = pack(chunk, self.frames, self.tokens, self.fits, self.padded, self.max_batch)
            batches += b
            alone += a
        if self.world_size > 1:
            batches = self._divisible(batches)
        costs = np.array([self.cost(b) for b in batches])
        if self.world_size > 1:
            # steps of world_size batches of similar cost, steps in random order
            by_cost = np.argsort(costs, kind="stable")
            steps = [by_cost[i:i + self.world_size] for i in range(0, len(by_cost), self.world_size)]
            step_order = rng.permutation(len(steps)) if self.shuffle else np.arange(len(steps))
            steps = [steps[i] for i in step_order]
            if self.costliest_first and steps:
                top = max(range(len(steps)), key=lambda s: costs[steps[s]].max())
                steps.insert(0, steps.pop(top))
            ranks = [[batches[s[r]] for s in steps] for r in range(self.world_size)]
        else:
            idx = list(rng.permutation(len(batches))) if self.shuffle else list(range(len(batches)))
            if self.costliest_first and idx:
                top = int(np.argmax(costs))
                idx.remove(top)
                idx.insert(0, top)
            ranks = [[batches[i] for i in idx]]
        self._cache = (epoch, ranks, alone)
        return ranks, alone

    def _divisible(self, batches: list[np.ndarray]) -> list[np.ndarray]:
        if sum(len(b) for b in batches) < self.world_size:
            raise ValueError(f"{sum(len(b) for b in batches)} utterances cannot give each of "
                             f"{self.world_size} ranks a batch")
        batches = list(batches)
        while len(batches) % self.world_size:
            big = max(range(len(batches)), key=lambda i: (len(batches[i]), i))
            if len(batches[big]) < 2:  # every batch is one utterance: an empty batch, the loader's placeholder
                batches.append(batches[big][:0])
                continue
            b = batches.pop(big)
            half = len(b) // 2
            batches += [b[:half], b[half:]]
        return batches

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    def batches(self, epoch: int | None = None, rank: int | None = None) -> list[list[int]]:
        """All of a rank's batches in an epoch, in order."""
        ranks, _ = self._epoch_plan(self.epoch if epoch is None else epoch)
        return [b.tolist() for b in ranks[self.rank if rank is None else rank]]

    def excluded(self, epoch: int | None = None) -> list[int]:
        """Utterances that do not fit even alone: never yielded (the caller reports them)."""
        return list(self._epoch_plan(self.epoch if epoch is None else epoch)[1])

    def __iter__(self) -> Iterator[list[int]]:
        ranks, _ = self._epoch_plan(self.epoch)
        mine = ranks[self.rank]
        while self.position < len(mine):
            batch = mine[self.position]
            self.position += 1
            yield batch.tolist()
        # the epoch is over: the next iteration starts the next one unless set_epoch says otherwise
        self.epoch, self.position = self.epoch + 1, 0

    def __len__(self) -> int:
        return len(self._epoch_plan(self.epoch)[0][self.rank])

    # -- resume
    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "world_size": self.world_size, "n": len(self.frames)}

    def load_state_dict(self, state: dict) -> None:
        for key, mine in (("seed", self.seed), ("world_size", self.world_size), ("n", len(self.frames))):
            if state.get(key) != mine:
                raise ValueError(f"sampler state is for {key}={state.get(key)}, this sampler has {mine}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def bucket_boundaries(max_frames: int, growth: float = 1.1, smallest: int = 16) -> list[int]:
    """Geometric frame boundaries: padding to the next costs at most `growth - 1` of the frames."""
    out, b = [], smallest
    while b < max_frames:
        out.append(int(b))
        b = max(b + 1, int(np.ceil(b * growth)))
    out.append(int(max_frames))
    return out
