"""Small pure helpers shared across the port: exact division, logprobs/entropy, whitening, top-k/top-p, Pearson r
and the label SampleBuffer; `cumulative_max`, `index_each` and `gelu` reproduce the original's functions of those
names, which tests/reference/utils_fns.npz checks.

Everything here is tensors in, tensors out (numpy for the CPU-resident SampleBuffer): no I/O, no process group.
Numerics follow ORIGINAL §13.2: float32 logprobs/entropy even under autocast, population variance.
"""
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F


def exact_div(a: int, b: int) -> int:
    """a // b, raising ValueError when b does not divide a."""
    q = a // b
    if a != q * b:
        raise ValueError(f"Inexact division: {a} / {b} = {a / b}; choose sizes where {b} divides {a}")
    return q


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """Upcast half/bfloat16 (and integers) to float32; keep float32/float64 as they are."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[labels] in float32 (at least); logits (..., V), labels (...) -> (...)."""
    logp = F.log_softmax(_at_least_float32(logits), dim=-1)
    return logp.gather(-1, labels.long().unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) as logsumexp(l) - sum softmax(l) * l, float32 (at least); (..., V) -> (...)."""
    logits = _at_least_float32(logits)
    pd = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (pd * logits).sum(dim=-1)


def whiten(values: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over all elements, population variance; shift_mean=False adds the mean back."""
    values = _at_least_float32(values)
    mean = values.mean()
    var = (values - mean).square().mean()
    whitened = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened


def take_top_k_logits(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep logits >= the k-th largest along the last axis (ties kept), set the rest to -1e10."""
    if not 1 <= k <= logits.shape[-1]:
        raise ValueError(f"top-k needs 1 <= k <= vocabulary size {logits.shape[-1]}, got k={k}")
    min_values = torch.topk(logits, k, dim=-1).values[..., -1:]  # (..., 1)
    return torch.where(logits < min_values, torch.full_like(logits, -1e10), logits)


def take_top_p_logits(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter (ORIGINAL §5): keep logits >= the sorted logit at index max(count(cumprob <= p) - 1, 0).

    The top-1 logit is always kept; works for any leading batch shape.
    """
    sorted_logits = torch.sort(logits, dim=-1, descending=True).values
    cumulative_probs = torch.cumsum(torch.softmax(_at_least_float32(sorted_logits), dim=-1), dim=-1)
    n_keep = (cumulative_probs <= p).sum(dim=-1, keepdim=True)  # (..., 1)
    min_values = sorted_logits.gather(-1, (n_keep - 1).clamp(min=0))  # (..., 1)
    return torch.where(logits < min_values, torch.full_like(logits, -1e10), logits)


def cumulative_max(x: torch.Tensor) -> torch.Tensor:
    """Inclusive cumulative maximum along the last axis.

    Reproduces the original's utils/core.py cumulative_max; kept because tests/reference checks it."""
    return torch.cummax(x, dim=-1).values


def index_each(a: torch.Tensor, ix: torch.Tensor) -> torch.Tensor:
    """Batched lookup into axis 1: out[i, ...] = a[i, ix[i, ...]] (a is (B, N, ...), ix is (B,) or (B, ...)).

    Reproduces the original's utils/core.py index_each; kept because tests/reference checks it."""
    if a.shape[0] != ix.shape[0]:
        raise ValueError(f"index_each needs matching batch sizes, got a {tuple(a.shape)} and ix {tuple(ix.shape)}")
    i0 = torch.arange(a.shape[0], device=a.device).reshape((-1,) + (1,) * (ix.dim() - 1))
    return a[i0, ix.long()]


def gelu(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's tanh-approximate GELU: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).

    The original's language/model.py gelu (tests/reference checks it); the model's MLP uses it."""
    return F.gelu(x, approximate="tanh")


def pearson_r(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of two 1-D tensors, population moments."""
    if x.dim() != 1 or y.dim() != 1 or x.shape != y.shape:
        raise ValueError(f"pearson_r needs two 1-D tensors of equal length, got {tuple(x.shape)} and {tuple(y.shape)}")
    x, y = _at_least_float32(x), _at_least_float32(y)
    xc, yc = x - x.mean(), y - y.mean()
    return (xc * yc).mean() / torch.sqrt(xc.square().mean() * yc.square().mean())


@dataclass(frozen=True)
class Schema:
    """dtype and per-record shape of one field of a SampleBuffer."""
    dtype: Any
    shape: Tuple[int, ...]


class SampleBuffer:
    """A circular buffer of records (numpy, CPU): `add` appends and drops the oldest beyond `capacity`."""

    def __init__(self, capacity: int, schemas: Dict[str, Schema]):
        if capacity < 1:
            raise ValueError(f"SampleBuffer capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.schemas = dict(schemas)
        self._total = 0
        self._vars = {k: np.zeros((capacity,) + tuple(s.shape), dtype=s.dtype) for k, s in self.schemas.items()}

    def add(self, **data) -> None:
        """Add a batch of records (every field with the same leading size), overwriting the oldest when full."""
        if data.keys() != self._vars.keys():
            raise ValueError(f"data keys {sorted(data)} != buffer keys {sorted(self._vars)}")
        arrays = {k: np.asarray(v) for k, v in data.items()}
        n = next(iter(arrays.values())).shape[0]
        for k, v in arrays.items():
            want = (n,) + tuple(self.schemas[k].shape)
            if v.shape != want:
                raise ValueError(f"field {k!r} has shape {v.shape}, expected {want}")
        if n > self.capacity:
            raise ValueError(f"cannot add {n} records at once to a buffer of capacity {self.capacity}; add fewer")
        idx = (self._total + np.arange(n)) % self.capacity
        for k, v in arrays.items():
            self._vars[k][idx] = v
        self._total += n

    def total(self) -> int:
        """Number of records ever added, including those already dropped."""
        return self._total

    def size(self) -> int:
        """Number of records currently held."""
        return min(self._total, self.capacity)

    def read(self, indices) -> Dict[str, np.ndarray]:
        """The records at `indices` (each < size())."""
        indices = np.asarray(indices)
        if indices.size and (indices.min() < 0 or indices.max() >= self.size()):
            raise ValueError(f"indices must lie in [0, {self.size()}), got min {indices.min()} max {indices.max()}")
        return {k: v[indices] for k, v in self._vars.items()}

    def data(self) -> Dict[str, np.ndarray]:
        """All records currently held, in slot order."""
        return {k: v[:self.size()] for k, v in self._vars.items()}

    def sample(self, n: int, rng: Optional[np.random.Generator] = None) -> Dict[str, np.ndarray]:
        """n records drawn uniformly with replacement (rng: a numpy Generator or RandomState)."""
        if self.size() == 0:
            raise ValueError("cannot sample from an empty SampleBuffer; add records first")
        rng = np.random.default_rng() if rng is None else rng
        draw = rng.integers if isinstance(rng, np.random.Generator) else rng.randint
        return self.read(draw(0, self.size(), size=n))
