"""What both trainers do the same way: host virtual ranks and their random streams, wrap a model in DDP, take one
optimizer step over micro-batches, and refuse non-finite numbers."""
import contextlib
import math
from typing import Callable, Optional

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from lm_human_preferences.utils import dist


class VirtualRanks:
    """The virtual ranks one process hosts: a run is defined on `count` ranks (the original's MPI ranks) whatever
    the number of processes W; process `rank` hosts the contiguous block rank*count/W ... (rank+1)*count/W - 1.

    Each virtual rank v has the original's per-rank random streams, seeded with seed + 100003*v: a NumPy
    RandomState (PPO permutations, the label permutation of virtual rank 0) and a torch Generator on `device`
    (sampling). seed None: unseeded, each generator seeded from its RandomState. The process's global RNGs (model
    initialisation before weights are broadcast from rank 0) get the seed of its first virtual rank.
    """

    def __init__(self, count: int, *, rank: int, world_size: int, seed: Optional[int], device: torch.device):
        if not 0 <= rank < world_size:
            raise ValueError(f"process rank {rank} is not in [0, {world_size})")
        if count % world_size:
            raise ValueError(f"virtual_ranks={count} is not divisible by the number of processes {world_size}; "
                             f"run on a divisor of {count} processes or pass --virtual_ranks <a multiple of "
                             f"{world_size}>")
        self.count, self.device = count, device
        per_process = count // world_size
        self.ids = list(range(rank * per_process, (rank + 1) * per_process))
        dist.seed_everything(dist.rank_seed(seed, self.ids[0]))
        self.np_rngs, self.generators = [], []
        for v in self.ids:
            v_seed = dist.rank_seed(seed, v)
            np_rng = np.random.RandomState(v_seed % 2**32) if v_seed is not None else np.random.RandomState()
            generator = torch.Generator(device=device)
            generator.manual_seed(v_seed if v_seed is not None else int(np_rng.randint(2**31)))
            self.np_rngs.append(np_rng)
            self.generators.append(generator)

    def __len__(self) -> int:
        return len(self.ids)

    def rows(self, total: int) -> int:
        """Rows of a global batch of `total` that each virtual rank holds (total / count)."""
        return dist.exact_batch(total, self.count, "the batch")

    def permutations(self, n: int) -> np.ndarray:
        """(hosted ranks, n): one permutation of range(n) from each hosted virtual rank's NumPy stream."""
        return np.stack([rng.permutation(n) for rng in self.np_rngs])

    def state_dict(self) -> dict:
        """{virtual rank: its random streams}, as tensors and plain values (torch.load(weights_only=True))."""
        return {v: {"numpy": _np_state(rng.get_state()), "generator": gen.get_state()}
                for v, rng, gen in zip(self.ids, self.np_rngs, self.generators)}

    def load_state_dict(self, states: dict) -> None:
        """Restores the streams of every hosted virtual rank from `states` ({virtual rank: state_dict entry})."""
        for v, rng, gen in zip(self.ids, self.np_rngs, self.generators):
            rng.set_state(_np_state_back(states[v]["numpy"]))
            gen.set_state(states[v]["generator"])


def wrap_ddp(module: torch.nn.Module, device: torch.device):
    """`module` in DistributedDataParallel under torchrun, itself in a single process."""
    if not dist.is_distributed():
        return module
    return DDP(module, device_ids=[device.index] if device.type == "cuda" else None)


def chunks(n: int, size: Optional[int]) -> list:
    """Slices covering range(n) in pieces of `size` (None or 0 = one piece)."""
    size = n if not size else size
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def pieces(n: int, micro_batch: Optional[int], groups: int = 1) -> list:
    """Slices covering range(n), n rows made of `groups` equal groups (virtual ranks), in pieces of at most
    `micro_batch` rows that never split a group across two pieces unless a group alone is larger: whole groups
    together where micro_batch holds one or more, else pieces inside each group. None = one piece."""
    if n % groups:
        raise ValueError(f"{n} rows do not split into {groups} equal groups")
    if not micro_batch:
        return [slice(0, n)]
    size = n // groups
    if micro_batch >= size:
        return chunks(n, micro_batch // size * size)
    return [slice(g * size + p.start, g * size + p.stop) for g in range(groups) for p in chunks(size, micro_batch)]


def optimizer_step(optimizer, ddp_model, n: int, micro_batch: Optional[int],
                   loss_fn: Callable[[slice], tuple], groups: int = 1) -> dict:
    """One optimizer step on n rows (`groups` equal groups of them), in `pieces` of `micro_batch` rows (gradient
    accumulation).

    `loss_fn(rows)` returns (loss, stats) of the rows `rows` (a slice) under the model `ddp_model`; each piece's loss
    is weighted by its share of the rows, so the gradient is the whole batch's. DDP synchronises gradients on the
    last piece only. Returns the stats averaged over the pieces with the same weights.
    """
    optimizer.zero_grad(set_to_none=True)
    parts = pieces(n, micro_batch, groups)
    totals = {}
    for i, rows in enumerate(parts):
        weight = (rows.stop - rows.start) / n
        last = i == len(parts) - 1
        sync = ddp_model.no_sync() if (not last and isinstance(ddp_model, DDP)) else contextlib.nullcontext()
        with sync:
            loss, stats = loss_fn(rows)
            (loss * weight).backward()
        for k, v in stats.items():
            totals[k] = totals.get(k, 0.0) + v * weight
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)  # the gradients' memory is free until the next step
    return totals


def nonfinite_statistic(stats: dict, allowed=()) -> Optional[str]:
    """The first key of `stats` (floats) whose value is NaN or inf, skipping `allowed` keys; None if all are finite."""
    return next((k for k, v in stats.items() if k not in allowed and not math.isfinite(v)), None)


def nonfinite_parameter(module: torch.nn.Module) -> Optional[str]:
    """The name of the first parameter of `module` holding a NaN or inf, or None (one device sync)."""
    named = [(n, p) for n, p in module.named_parameters()]
    finite = torch.stack([torch.isfinite(p.detach()).all() for _, p in named])
    if bool(finite.all()):
        return None
    return named[int((~finite).nonzero()[0])][0]


def _np_state(np_state) -> list:
    """A NumPy RandomState state tuple as weights_only-loadable values."""
    name, keys, pos, has_gauss, gauss = np_state
    return [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)]


def _np_state_back(saved) -> tuple:
    """The inverse of `_np_state`."""
    name, keys, pos, has_gauss, gauss = saved
    return name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss
