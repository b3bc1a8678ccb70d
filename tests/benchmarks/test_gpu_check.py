"""benchmarks/gpu_check.py runs from a fresh clone: every check SKIPPED without CUDA, OK on the CPU with tiny shapes
(--cpu-smoke), FAILED checks named and exit status 1, and an out-of-memory iteration is a failed check."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
sys.path.insert(0, str(SCRIPT.parent))

import gpu_check  # noqa: E402
import ppo_iteration  # noqa: E402

CHECKS = ("bf16 speed", "nccl", "ppo iteration", "projection")


def run(*args, env=None):
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300,
                          cwd=ROOT.parent, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    lines = {line.split("  ")[0].strip(): line for line in proc.stdout.splitlines()}
    return proc, lines


def test_without_cuda_every_check_is_skipped():
    proc, lines = run(env={"CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in CHECKS:
        assert lines[name].split(None, len(name.split()))[-1] == "SKIPPED (no CUDA)", proc.stdout
    assert "4 of 4 checks passed or skipped" in proc.stdout


def test_cpu_smoke_runs_every_check():
    proc, lines = run("--cpu-smoke")
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    for name in CHECKS:
        assert f"{name} " in lines[name] and " OK: " in lines[name], proc.stdout
    assert "gloo, 2 ranks" in lines["nccl"] and "broadcast_module" in lines["nccl"]
    assert "relative error" in lines["bf16 speed"] and "auto -> " in lines["bf16 speed"]
    assert "per-rank batch 8, micro-batches 4/2" in lines["ppo iteration"]
    assert "s/iteration" in lines["ppo iteration"] and "projected" in lines["projection"]


def test_failed_checks_are_named_and_exit_1(monkeypatch, capsys):
    def fails(*args):
        raise gpu_check.Failed("bf16 is not faster than fp32")

    def crashes(*args):
        raise RuntimeError("NCCL error: unhandled system error")

    monkeypatch.setattr(gpu_check, "check_bf16", fails)
    monkeypatch.setattr(gpu_check, "check_nccl", crashes)
    monkeypatch.setattr(gpu_check, "check_iteration", lambda *args: "fine")
    monkeypatch.setattr(gpu_check, "check_projection", lambda *args: "fine")
    assert gpu_check.main(["--cpu-smoke"]) == 1
    out = capsys.readouterr().out
    assert "bf16 speed     FAILED: bf16 is not faster than fp32" in out
    assert "nccl           FAILED: RuntimeError: NCCL error" in out and "ppo iteration  OK: fine" in out
    assert "FAILED: bf16 speed, nccl" in out


@pytest.mark.parametrize("error", [torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 GiB"),
                                   RuntimeError("CUDA error: out of memory")])
def test_out_of_memory_iteration_fails_the_check_with_its_shapes(monkeypatch, error):
    def out_of_memory(self, mark):
        raise error

    monkeypatch.setattr(ppo_iteration.OurIteration, "__call__", out_of_memory)
    cache = {}
    with pytest.raises(gpu_check.Failed, match=r"^out of memory at batch 8 with micro-batches 4/2 \(.*out of memory"):
        gpu_check.check_iteration(torch.device("cpu"), True, cache)
    with pytest.raises(gpu_check.Failed, match=r"^out of memory at batch 8 with micro-batches 4/2$"):
        gpu_check.check_projection(torch.device("cpu"), True, cache)
