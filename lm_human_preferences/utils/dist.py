"""torchrun / DDP plumbing: process-group setup, rank helpers, broadcasts and all-reduces of statistics.

Works with `torchrun --nnodes N --nproc_per_node M`: the global RANK is used for data sharding, seeding and
rank-0 duties; LOCAL_RANK only picks the GPU. NCCL on GPU, gloo on CPU. A single process needs no torchrun.
"""
import datetime
import math
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from lm_human_preferences.utils.precision import choose_precision

MAX_DIST_TIMEOUT = 10**8  # seconds (about 3 years): more is a typo, and a timedelta overflows near 10**14


@dataclass
class DistInfo:
    rank: int = 0  # global rank: sharding, seeding, rank-0 duties
    world_size: int = 1
    local_rank: int = 0  # picks the GPU on this node
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self):
        return self.rank == 0


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """run.device ('auto', 'cpu' or 'cuda') as this process's device. On CUDA: cuda:LOCAL_RANK where the process sees
    every GPU of its node, cuda:0 where it sees one (a scheduler gave each process its own GPU); ValueError otherwise."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("run.device=cuda but no CUDA device is available; use --run.device cpu")
        visible = torch.cuda.device_count()
        if visible == 1:
            return torch.device("cuda", 0)
        if local_rank >= visible:
            raise ValueError(f"LOCAL_RANK={local_rank} but this process sees only {visible} CUDA devices "
                             f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}): start at most "
                             f"{visible} processes per node (torchrun --nproc_per_node {visible}) or give each "
                             f"process one GPU")
        return torch.device("cuda", local_rank)
    if device == "cpu":
        return torch.device("cpu")
    raise ValueError(f"unknown run.device {device!r}; use auto, cpu or cuda")


def dist_timeout() -> datetime.timedelta:
    """How long a collective waits for the other ranks: env LMHP_DIST_TIMEOUT seconds (default 1800); ValueError
    naming the variable unless it is a finite number > 0."""
    text = os.environ.get("LMHP_DIST_TIMEOUT") or "1800"
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and 0 < seconds <= MAX_DIST_TIMEOUT):
        raise ValueError(f"environment variable LMHP_DIST_TIMEOUT={text!r} is not a number of seconds in "
                         f"(0, {MAX_DIST_TIMEOUT}]: set it to e.g. 1800 or unset it")
    return datetime.timedelta(seconds=seconds)


def env_info(device: str = "auto") -> DistInfo:
    """Rank, world size and device from torchrun's environment, without starting a process group (so settings
    can be checked against the world size before any collective); LMHP_DIST_TIMEOUT is checked here too."""
    dist_timeout()
    deterministic_from_env()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=resolve_device(device, local_rank))


def deterministic_from_env() -> bool:
    """Whether LMHP_DETERMINISTIC=1 asks for deterministic kernels (GPU runs are not bit-reproducible without them);
    ValueError for a value other than 0 or 1."""
    value = os.environ.get("LMHP_DETERMINISTIC", "")
    if value not in ("", "0", "1"):
        raise ValueError(f"environment variable LMHP_DETERMINISTIC={value!r} must be 1 (deterministic kernels) or 0; "
                         f"set it to 1 or 0, or unset it")
    return value == "1"


def init_distributed(device: str = "auto") -> DistInfo:
    """Reads torchrun's environment, initialises the process group when WORLD_SIZE > 1, and picks the device;
    with LMHP_DETERMINISTIC=1 first turns on deterministic algorithms (and cuBLAS's deterministic workspace)."""
    if deterministic_from_env():
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    info = env_info(device)
    dev = info.device
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if info.world_size > 1 and not dist.is_initialized():
        # No device_id: it turns on NCCL's eager, non-blocking init, which hangs at random in torch 2.7.0
        # (pytorch#153960). Lazy init (the communicator is made by the first collective) costs one slower first
        # collective; barrier() names the device itself.
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", timeout=dist_timeout())
    return info


def is_distributed():
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier():
    if not is_distributed():
        return
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])  # the device set_device chose, not a guess by rank
    else:
        dist.barrier()


def broadcast_module(module: torch.nn.Module, src: int = 0):
    """Copies every parameter and buffer of rank `src` to all ranks (only rank 0 loads checkpoints)."""
    if not is_distributed():
        return
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src)


def broadcast_object(obj, src: int = 0):
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src)
    return box[0]


def gather_object(obj, dst: int = 0):
    """[every rank's `obj`, by rank] on rank `dst`, None elsewhere (small picklable state: RNG states, positions)."""
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size() if dist.get_rank() == dst else None
    dist.gather_object(obj, out, dst=dst)
    return out


def all_gather_object(obj) -> list:
    """[every rank's `obj`, by rank] on every rank."""
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def all_reduce_mean_dict(stats: dict, device) -> dict:
    """Averages a dict of scalars over ranks in one collective (the original's FlatStats.map_flat(allreduce_mean))."""
    keys = sorted(stats)
    if not keys:
        return {}
    flat = torch.tensor([float(stats[k]) for k in keys], dtype=torch.float64, device=device)
    if is_distributed():
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= dist.get_world_size()
    return dict(zip(keys, flat.tolist()))


def all_ranks_agree(flag: bool, device) -> bool:
    """True on every rank if `flag` is true on any rank (used for stop signals)."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def rank_seed(seed, rank: int):
    """The original's per-rank seed: seed + 100003 * rank (None stays unseeded)."""
    return None if seed is None else seed + 100003 * rank


def seed_everything(seed):
    """Seeds Python, NumPy and torch; returns the NumPy RandomState used for permutations."""
    import random
    if seed is None:
        return np.random.RandomState()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return np.random.RandomState(seed % 2**32)


def cleanup():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def resolve_precision(precision: str, device: torch.device) -> str:
    """'fp32' or 'bf16' for run.precision on `device` ('auto' by what the hardware does well; utils/precision.py)."""
    return choose_precision(precision, device).precision


def resolved_run_settings(precision: str, device: torch.device) -> dict:
    """What run.device and run.precision became on this machine and why, for the saved hyperparameters."""
    choice = choose_precision(precision, device)
    return {"run.device": str(device), "run.precision": choice.precision, "run.precision_reason": choice.reason}


def autocast(device: torch.device, precision: str):
    """bfloat16 autocast for 'bf16' (float32 master weights; the model keeps logits/softmax in float32)."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def exact_batch(total: int, parts: int, name: str) -> int:
    """total / parts, or a ValueError naming the setting when it does not divide evenly."""
    if parts <= 0 or total % parts:
        raise ValueError(f"{name}={total} is not divisible by {parts}; choose a multiple of {parts}")
    return total // parts


def all_reduce_mean_tensors(stats: dict, device) -> dict:
    """Averages a dict of 0-d tensors over ranks with one collective; keeps them as tensors."""
    keys = sorted(stats)
    flat = torch.stack([torch.as_tensor(stats[k], device=device).float().reshape(()) for k in keys])
    if is_distributed():
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat = flat / dist.get_world_size()
    return dict(zip(keys, flat.unbind()))
