"""The PPO-iteration benchmark runs at the `test` size and reports every phase, baseline and figure it promises."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "ppo_iteration.py"
PHASES = ("sampling", "score", "update", "iteration")
FIGURES = ("median_s", "times_s", "tokens_per_s", "flops", "flops_per_s", "mfu", "peak_bytes")


def run(tmp_path, *args):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(SCRIPT), "--size", "test", "--threads", "1", "--repeats", "1", "--warmup", "1",
           "--json", str(out), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, json.loads(out.read_text())


def test_benchmark_reports_every_phase_and_baseline(tmp_path):
    pytest.importorskip("transformers")
    stdout, report = run(tmp_path, "--precision", "bf16", "--sentiment")
    assert (report["size"], report["batch"], report["query_length"], report["response_length"]) == ("test", 8, 64, 24)
    assert (report["noptepochs"], report["nminibatches"]) == (4, 1)
    assert set(report["matmul_flops_per_s"]) == {"bf16"} and report["matmul_flops_per_s"]["bf16"] > 0
    r = report["results"]["bf16"]
    for phase in PHASES:
        fig = r["ours"][phase]
        assert set(FIGURES) <= set(fig)
        assert fig["median_s"] > 0 and fig["tokens_per_s"] > 0 and 0 < fig["mfu"] and fig["peak_bytes"] > 2 ** 20
    parts = sum(r["ours"][p]["median_s"] for p in ("sampling", "score", "update"))
    assert r["ours"]["iteration"]["median_s"] == pytest.approx(parts)
    assert set(r["baselines"]) == {"hf", "hf_generate", "nocache"}
    assert set(r["baselines"]["hf"]) == set(PHASES)
    assert set(r["baselines"]["nocache"]) == set(r["baselines"]["hf_generate"]) == {"sampling"}
    assert set(r["speedup"]["sampling"]) == {"hf_generate", "nocache"}
    for phase in PHASES:
        for base, ratio in r["speedup"][phase].items():
            assert ratio == pytest.approx(r["baselines"][base][phase]["median_s"] / r["ours"][phase]["median_s"])
    s = report["sentiment"]
    assert s["batch"] == 512 and s["total_episodes"] == 1_000_000 and s["nupdates"] == 1954
    assert s["projected_hours"] == pytest.approx(s["seconds_per_iteration"] * s["nupdates"] / 3600)
    # the table names every phase and baseline, with its speed-up
    for label in ("sampling", "ref+score", "update (4 ep)", "iteration", "HF generate", "no KV cache", "x"):
        assert label in stdout
    assert "projected" in stdout


def test_benchmark_ours_only_both_precisions(tmp_path):
    stdout, report = run(tmp_path, "--no-baselines")
    assert set(report["results"]) == {"fp32", "bf16"}
    for prec in ("fp32", "bf16"):
        assert "baselines" not in report["results"][prec]
        assert set(report["results"][prec]["ours"]) == set(PHASES)
    assert "HF" not in stdout.split("\n", 2)[2].split("tok/s:")[0]


def test_benchmark_rejects_bad_arguments(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--size", "7B"], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "--size" in proc.stderr and "124M" in proc.stderr
    proc = subprocess.run([sys.executable, str(SCRIPT), "--repeats", "0"], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "--repeats" in proc.stderr
