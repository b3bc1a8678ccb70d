"""What both trainers do the same way: seed a rank, wrap a model in DDP, take one optimizer step over micro-batches,
and refuse non-finite numbers."""
import contextlib
import math
import random
from typing import Callable, Optional

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from lm_human_preferences.utils import dist


def seed_rank(seed: Optional[int], rank: int, device: torch.device):
    """Seeds Python, NumPy and torch with the original's per-rank seed; returns (NumPy RandomState for permutations,
    torch Generator for sampling on `device`). seed None: unseeded, the generator drawn from the RandomState."""
    seed = dist.rank_seed(seed, rank)
    np_rng = dist.seed_everything(seed)
    generator = torch.Generator(device=device)
    generator.manual_seed(seed if seed is not None else int(np_rng.randint(2**31)))
    return np_rng, generator


def wrap_ddp(module: torch.nn.Module, device: torch.device):
    """`module` in DistributedDataParallel under torchrun, itself in a single process."""
    if not dist.is_distributed():
        return module
    return DDP(module, device_ids=[device.index] if device.type == "cuda" else None)


def chunks(n: int, size: Optional[int]) -> list:
    """Slices covering range(n) in pieces of `size` (None or 0 = one piece)."""
    size = n if not size else size
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def optimizer_step(optimizer, ddp_model, n: int, micro_batch: Optional[int],
                   loss_fn: Callable[[slice], tuple]) -> dict:
    """One optimizer step on n rows, in pieces of `micro_batch` rows (gradient accumulation).

    `loss_fn(rows)` returns (loss, stats) of the rows `rows` (a slice) under the model `ddp_model`; each piece's loss
    is weighted by its share of the rows, so the gradient is the whole batch's. DDP synchronises gradients on the
    last piece only. Returns the stats averaged over the pieces with the same weights.
    """
    optimizer.zero_grad(set_to_none=True)
    pieces = chunks(n, micro_batch)
    totals = {}
    for i, rows in enumerate(pieces):
        weight = (rows.stop - rows.start) / n
        last = i == len(pieces) - 1
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


def rng_state(np_rng: np.random.RandomState, generator: torch.Generator) -> dict:
    """Every RNG of this rank as tensors and plain values (loadable with torch.load(weights_only=True)). On CUDA the
    default generator of the rank's own GPU (the device of `generator`) only, so the state does not depend on which
    other GPUs the process sees."""
    py = random.getstate()
    out = {"python": [py[0], list(py[1]), py[2]], "numpy": _np_state(np_rng.get_state()),
           "numpy_global": _np_state(np.random.get_state()),
           "torch_cpu": torch.get_rng_state(), "generator": generator.get_state()}
    if generator.device.type == "cuda":
        out["torch_cuda"] = torch.cuda.get_rng_state(generator.device)
    return out


def set_rng_state(state: dict, np_rng: np.random.RandomState, generator: torch.Generator):
    """Restores every RNG `rng_state` captured. A CUDA state is restored on the rank's own GPU only, and ignored by
    a run on the CPU; older checkpoints hold one state per visible GPU, of which the one at this GPU's index is used."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np_rng.set_state(_np_state_back(state["numpy"]))
    np.random.set_state(_np_state_back(state["numpy_global"]))
    torch.set_rng_state(state["torch_cpu"])
    generator.set_state(state["generator"])
    cuda_state = state.get("torch_cuda")
    if generator.device.type != "cuda" or cuda_state is None:
        return
    if isinstance(cuda_state, (list, tuple)):  # the old format: torch.cuda.get_rng_state_all() of the saving process
        index = generator.device.index or 0
        if index >= len(cuda_state):
            return  # written with fewer visible GPUs; the default CUDA generator draws nothing the run depends on
        cuda_state = cuda_state[index]
    torch.cuda.set_rng_state(cuda_state, generator.device)


def _np_state(np_state) -> list:
    """A NumPy RandomState state tuple as weights_only-loadable values."""
    name, keys, pos, has_gauss, gauss = np_state
    return [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)]


def _np_state_back(saved) -> tuple:
    """The inverse of `_np_state`."""
    name, keys, pos, has_gauss, gauss = saved
    return name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss
