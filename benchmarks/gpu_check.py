#!/usr/bin/env python
"""Checks what only a GPU can show, and prints each check as OK, SKIPPED (why) or FAILED (why):

  bf16 speed     a bf16 autocast matmul is faster than fp32 where run.precision auto picks bf16 (compute
                 capability >= 8.0), and auto picks what the GPU runs well
  nccl           all_reduce_sum, all_reduce_mean_tensors, broadcast_module and broadcast_object through
                 utils/dist (init_distributed as under torchrun) on one rank per GPU, 2 to 8 ranks
  ppo iteration  one real PPOTrainer iteration (124M, sentiment shapes, per-rank batch ppo.batch_size, params.py's
                 run.rollout_micro_batch / run.train_micro_batch) in the auto precision, with its peak memory
  projection     the sentiment run's wall time on one GPU at that rate (benchmarks/ppo_iteration.py's projection)

Without CUDA every check is SKIPPED and the exit status is 0. --cpu-smoke runs the same code on the CPU with tiny
shapes (the `test` model, batch 8 in micro-batches 4/2, 2 gloo ranks) so that tests exercise it. Exit status 1
when a check FAILED.

    python benchmarks/gpu_check.py                # on a GPU machine
    python benchmarks/gpu_check.py --cpu-smoke    # anywhere, in seconds
"""
import argparse
import os
import socket
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))  # ppo_iteration.py, also from a fresh clone

import ppo_iteration as bench  # noqa: E402  (puts the project root on sys.path)
from lm_human_preferences.utils import dist  # noqa: E402
from lm_human_preferences.utils.precision import choose_precision  # noqa: E402

GB = 1e9
MAX_RANKS = 8


class Skipped(Exception):
    """The check cannot run here (the message says why)."""


class Failed(Exception):
    """The check ran and found something wrong (the message says what)."""


# ---- checks: each returns the line printed after OK ---------------------------------------------------------

def matmul_seconds(device, n: int, bf16: bool, repeats: int = 5) -> tuple[float, torch.Tensor]:
    """Best time of an n x n x n float32 matmul, under bf16 autocast if `bf16`, after two warm-ups."""
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, generator=g, device=device)
    b = torch.randn(n, n, generator=g, device=device)
    best, out = float("inf"), None
    for i in range(repeats + 2):
        bench.sync(device)
        t0 = time.perf_counter()
        with dist.autocast(device, "bf16" if bf16 else "fp32"):
            out = a @ b
        bench.sync(device)
        if i >= 2:
            best = min(best, time.perf_counter() - t0)
    return best, out


def check_bf16(device, smoke: bool) -> str:
    n = 64 if smoke else 8192
    t32, c32 = matmul_seconds(device, n, bf16=False)
    t16, c16 = matmul_seconds(device, n, bf16=True)
    if c16.dtype != torch.bfloat16:
        raise Failed(f"autocast bf16 matmul gave {c16.dtype}, not torch.bfloat16")
    err = ((c16.float() - c32).norm() / c32.norm()).item()
    if not err < 2e-2:  # bf16 keeps 8 bits of mantissa: about 0.4% relative error per product
        raise Failed(f"bf16 matmul differs from fp32 by {err:.3g} (relative), expected < 2e-2")
    auto = choose_precision("auto", device)
    speedup = t32 / t16
    line = (f"{n}^3 matmul fp32 {2 * n ** 3 / t32 / 1e12:.2f} TFLOP/s, bf16 autocast {2 * n ** 3 / t16 / 1e12:.2f} "
            f"TFLOP/s ({speedup:.2f}x), relative error {err:.1e}; auto -> {auto.precision} ({auto.reason})")
    if device.type == "cuda":
        native = torch.cuda.get_device_capability(device) >= (8, 0)
        if auto.precision != ("bf16" if native else "fp32"):
            raise Failed(f"auto picked {auto.precision} on compute capability "
                         f"{torch.cuda.get_device_capability(device)}: {line}")
        if native and speedup <= 1:
            raise Failed(f"bf16 is not faster than fp32 on a GPU where auto picks it: {line}")
    return line


def expect(ok: bool, message: str):
    if not ok:
        raise Failed(message)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def nccl_rank(rank: int, world: int, port: int, device_type: str):
    """One rank of the collective check, set up as torchrun would (env vars, then dist.init_distributed)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    os.environ.setdefault("LMHP_DIST_TIMEOUT", "300")  # a broken collective fails the check in minutes, not 30
    info = dist.init_distributed(device_type)
    try:
        dev = info.device
        total = dist.all_reduce_sum(torch.full((3,), float(rank + 1), device=dev))
        expect(torch.equal(total.cpu(), torch.full((3,), world * (world + 1) / 2)), f"all_reduce_sum gave {total}")
        mean = dist.all_reduce_mean_tensors({"r": torch.tensor(float(rank), device=dev)}, dev)["r"].item()
        expect(mean == (world - 1) / 2, f"all_reduce_mean_tensors gave {mean}, expected {(world - 1) / 2}")
        module = torch.nn.Linear(8, 4).to(dev)
        with torch.no_grad():
            for t in module.parameters():
                t.fill_(rank)
        dist.broadcast_module(module)
        expect(all((t == 0).all() for t in module.parameters()), "broadcast_module did not copy rank 0's weights")
        got = dist.broadcast_object({"from": rank})
        expect(got == {"from": 0}, f"broadcast_object gave {got}")
        dist.barrier()
    finally:
        dist.cleanup()


def check_nccl(device, smoke: bool) -> str:
    if smoke:
        world, backend, device_type = 2, "gloo", "cpu"
    else:
        world, backend, device_type = min(torch.cuda.device_count(), MAX_RANKS), "nccl", "cuda"
        if world < 2:
            raise Skipped(f"needs 2 GPUs, this machine has {world}")
    t0 = time.perf_counter()
    try:
        mp.spawn(nccl_rank, args=(world, free_port(), device_type), nprocs=world, join=True)
    except mp.ProcessRaisedException as err:
        raise Failed(str(err).strip().splitlines()[-1]) from err
    return (f"{backend}, {world} ranks: all_reduce_sum, all_reduce_mean_tensors, broadcast_module, broadcast_object "
            f"agree ({time.perf_counter() - t0:.1f} s with start-up)")


def projection(device, smoke: bool, cache: dict) -> dict:
    """The sentiment projection, run once for both checks that report it."""
    if "result" not in cache:
        precision = choose_precision("auto", device).precision
        args = SimpleNamespace(size="test" if smoke else "124M", seed=0, warmup=0 if smoke else 1, repeats=1,
                               virtual_ranks=None)
        cache["result"] = bench.sentiment_projection(device, precision, args, batch=8 if smoke else None,
                                                     micro_batches=(4, 2) if smoke else None)
    return cache["result"]


def check_iteration(device, smoke: bool, cache: dict) -> str:
    p = projection(device, smoke, cache)
    where = f"per-rank batch {p['batch']}, micro-batches {p['micro_batches']} (rollout/train), {p['precision']}"
    if p.get("error"):
        raise Failed(f"{p['error']} ({p['detail']})")
    peak = f"peak {p['peak_bytes'] / GB:.2f} GB" if p.get("peak_bytes") else "peak not measured on CPU"
    return f"{where}: {p['seconds_per_iteration']:.3f} s/iteration, {peak}"


def check_projection(device, smoke: bool, cache: dict) -> str:
    p = projection(device, smoke, cache)
    if p.get("error"):
        raise Failed(p["error"])
    return bench.format_sentiment(p)


# ---- driver -------------------------------------------------------------------------------------------------

def run_checks(smoke: bool) -> list:
    """[(name, 'OK' | 'SKIPPED' | 'FAILED', detail)] of every check, each printed as it finishes."""
    cuda = torch.cuda.is_available()
    device = torch.device("cpu") if smoke else torch.device("cuda", 0) if cuda else None
    cache = {}
    checks = [("bf16 speed", lambda: check_bf16(device, smoke)),
              ("nccl", lambda: check_nccl(device, smoke)),
              ("ppo iteration", lambda: check_iteration(device, smoke, cache)),
              ("projection", lambda: check_projection(device, smoke, cache))]
    results = []
    for name, fn in checks:
        try:
            if device is None:
                raise Skipped("no CUDA")
            status, detail = "OK", fn()
        except Skipped as err:
            status, detail = "SKIPPED", str(err)
        except Failed as err:
            status, detail = "FAILED", str(err)
        except Exception as err:  # a crash is a failed check; the others still run
            traceback.print_exc()
            status, detail = "FAILED", f"{type(err).__name__}: {err}"
        results.append((name, status, detail))
        print(f"{name:<14} {status}" + (f" ({detail})" if status == "SKIPPED" else f": {detail}"), flush=True)
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-smoke", action="store_true", help="run every check on the CPU with tiny shapes")
    args = p.parse_args(argv)
    where = "CPU smoke test (tiny shapes)" if args.cpu_smoke else (
        f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "no CUDA")
    print(f"GPU check: torch {torch.__version__}, CUDA {torch.version.cuda}, {where}", flush=True)
    results = run_checks(args.cpu_smoke)
    failed = [name for name, status, _ in results if status == "FAILED"]
    print(f"{len(results) - len(failed)} of {len(results)} checks passed or skipped"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
