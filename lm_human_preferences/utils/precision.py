"""Which precision a run computes in: `run.precision auto` resolved by what the processor does well.

CPUs differ: with AVX-512 BF16 (or AMX) bfloat16 matmuls run 2-4x faster than float32, while a CPU with only AVX2
emulates them about 100x slower. So on a CPU `auto` is bf16 only where the processor has native bfloat16
instructions AND a short timed probe (a 512^3 matmul in both precisions, about 10 ms) confirms that bf16 is
actually faster there; otherwise fp32. No bfloat16 probe ever runs on a CPU without native support (it would take
seconds). On CUDA, `auto` is bf16 on GPUs with bfloat16 tensor cores (compute capability 8.0, Ampere, or newer),
fp32 on older ones, where bf16 is emulated. The answer is cached per process.

An explicit `bf16` is honoured everywhere; on a CPU without native support it prints one warning with the
measured slowdown.
"""
from __future__ import annotations

import functools
import sys
import time
from dataclasses import dataclass

import torch

PRECISIONS = ("auto", "fp32", "bf16")
PROBE_SIZE = 512  # side of the probe matmul on a CPU with native bf16
SLOW_PROBE_SIZE = 128  # side of the probe on a CPU without it (only to word the warning for an explicit bf16)
MIN_SPEEDUP = 1.2  # bf16 must beat fp32 by this factor for `auto` to pick it on a CPU


@dataclass(frozen=True)
class PrecisionChoice:
    precision: str  # 'fp32' or 'bf16'
    reason: str  # one line: why, with the measurement when one was taken


def cpu_has_native_bf16() -> bool:
    """AVX-512 BF16 or AMX tiles, as this torch build detects them (False where the query does not exist)."""
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    for check in checks:
        try:
            if check is not None and check():
                return True
        except RuntimeError:
            continue
    return False


def cpu_description() -> str:
    """'AVX2', 'AVX512', ... (torch's CPU capability), plus ' + native bf16' where the processor has it."""
    cap = torch.backends.cpu.get_cpu_capability()
    return cap + (" + native bf16" if cpu_has_native_bf16() else ", no native bf16")


def _matmul_rate(dtype: torch.dtype, n: int, budget_s: float) -> float:
    """GFLOP/s of an n^3 matmul in `dtype` on the CPU: best of repeats within about `budget_s` seconds."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(dtype)
    b = torch.randn(n, n, generator=gen).to(dtype)
    torch.mm(a, b)  # warm-up (and kernel selection)
    best, spent = float("inf"), 0.0
    for _ in range(5):
        t = time.perf_counter()
        torch.mm(a, b)
        dt = time.perf_counter() - t
        best, spent = min(best, dt), spent + dt
        if spent > budget_s:
            break
    return 2 * n ** 3 / max(best, 1e-9) / 1e9


@functools.lru_cache(maxsize=None)
def cpu_bf16_speedup(n: int) -> float:
    """bf16 matmul rate / fp32 matmul rate, measured once per process on an n^3 matmul."""
    return _matmul_rate(torch.bfloat16, n, 0.2) / _matmul_rate(torch.float32, n, 0.2)


def _cuda_choice(device: torch.device) -> PrecisionChoice:
    major, minor = torch.cuda.get_device_capability(device)
    name = torch.cuda.get_device_name(device)
    if major >= 8:
        return PrecisionChoice("bf16", f"{name} (compute capability {major}.{minor}) has bfloat16 tensor cores")
    return PrecisionChoice("fp32", f"{name} (compute capability {major}.{minor}) has no bfloat16 tensor cores "
                                   f"(bf16 would be emulated, slower than fp32)")


@functools.lru_cache(maxsize=None)
def _auto_choice(device_type: str, device_index) -> PrecisionChoice:
    if device_type == "cuda":
        return _cuda_choice(torch.device("cuda", device_index) if device_index is not None else torch.device("cuda"))
    if device_type != "cpu":
        return PrecisionChoice("fp32", f"{device_type} device: fp32 unless asked otherwise")
    cpu = cpu_description()
    if not cpu_has_native_bf16():
        return PrecisionChoice("fp32", f"CPU {cpu}: bfloat16 is emulated there, far slower than fp32")
    speedup = cpu_bf16_speedup(PROBE_SIZE)
    if speedup >= MIN_SPEEDUP:
        return PrecisionChoice("bf16", f"CPU {cpu}: bf16 matmul measured {speedup:.1f}x the fp32 rate")
    return PrecisionChoice("fp32", f"CPU {cpu}: bf16 matmul measured only {speedup:.2f}x the fp32 rate "
                                   f"(needs {MIN_SPEEDUP}x)")


_warned = set()


def choose_precision(precision: str, device: torch.device) -> PrecisionChoice:
    """Resolves run.precision ('auto', 'fp32' or 'bf16') for `device`; see the module docstring."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown run.precision {precision!r}; use auto, fp32 or bf16")
    device = torch.device(device)
    if precision == "auto":
        return _auto_choice(device.type, device.index)
    if precision == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
        speedup = cpu_bf16_speedup(SLOW_PROBE_SIZE)
        reason = (f"run.precision bf16 was asked for, but this CPU ({cpu_description()}) has no native bfloat16: "
                  f"its bf16 matmuls measured {speedup:.3f}x the fp32 rate ({1 / max(speedup, 1e-9):.0f}x slower); "
                  f"--run.precision auto (or fp32) runs in fp32")
        if reason not in _warned:
            _warned.add(reason)
            print(f"warning: {reason}", file=sys.stderr)
        return PrecisionChoice("bf16", reason)
    return PrecisionChoice(precision, "set explicitly")
