"""The PPO-iteration benchmark runs at the `test` size and reports every phase, baseline and figure it promises."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

import params

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "ppo_iteration.py"
_SENTIMENT_RUN = params.get_hparams("train_policy", "sentiment").run
SENTIMENT_MICRO = (_SENTIMENT_RUN.rollout_micro_batch, _SENTIMENT_RUN.train_micro_batch)  # params.py's settings
PHASES = ("sampling", "score", "update", "iteration")
FIGURES = ("median_s", "times_s", "tokens_per_s", "flops", "flops_per_s", "mfu", "peak_bytes")


def run(tmp_path, *args):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(SCRIPT), "--size", "test", "--threads", "1", "--repeats", "1", "--warmup", "0",
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
    assert report["machine"]["threads"] == 1 and len(report["machine"]["loadavg_start"]) == 3
    r = report["results"]["bf16"]
    for phase in PHASES:
        fig = r["ours"][phase]
        assert set(FIGURES) <= set(fig)
        assert fig["median_s"] > 0 and fig["tokens_per_s"] > 0 and fig["mfu"] > 0
        assert 2 ** 20 < fig["peak_bytes"] < 2 ** 34  # measured in the child process, a plausible RSS
    parts = sum(r["ours"][p]["median_s"] for p in ("sampling", "score", "update"))
    assert r["ours"]["iteration"]["median_s"] == pytest.approx(parts)
    assert r["ours"]["iteration"]["peak_bytes"] == max(r["ours"][p]["peak_bytes"] for p in PHASES)
    assert set(r["baselines"]) == {"hf", "hf_generate", "nocache"}
    assert set(r["baselines"]["hf"]) == set(PHASES)
    assert set(r["baselines"]["nocache"]) == set(r["baselines"]["hf_generate"]) == {"sampling"}
    assert set(r["speedup"]["sampling"]) == {"hf_generate", "nocache"}
    for phase in PHASES:
        for base, ratio in r["speedup"][phase].items():
            assert ratio == pytest.approx(r["baselines"][base][phase]["median_s"] / r["ours"][phase]["median_s"])
    s = report["sentiment"]
    assert s["batch"] == 512 and s["total_episodes"] == 1_000_000 and s["nupdates"] == 1954
    assert (s["rollout_micro_batch"], s["train_micro_batch"]) == SENTIMENT_MICRO and "error" not in s
    assert "per-rank batch 512, micro-batches {}/{}".format(*SENTIMENT_MICRO) in stdout
    assert s["projected_hours"] == pytest.approx(s["seconds_per_iteration"] * s["nupdates"] / 3600)
    assert "targets" not in report  # the targets are for the 124M shape
    # the table names every phase and baseline, with its speed-up, and the projection
    for label in ("sampling", "ref+score", "update (4 ep)", "iteration", "HF generate", "no KV cache",
                  "HF + torch Adam", "x", "projected", "load average"):
        assert label in stdout


def test_benchmark_rejects_bad_arguments(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--size", "7B"], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "--size" in proc.stderr and "124M" in proc.stderr
    proc = subprocess.run([sys.executable, str(SCRIPT), "--repeats", "0"], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "--repeats" in proc.stderr


# Runs the benchmark with the projection's iteration (the only one at the sentiment batch, 512) replaced by one
# that reports the micro-batches its trainer was given and then raises ERROR, as a GPU that runs out of memory does.
INJECT = """
import sys, torch
sys.path.insert(0, {bench_dir!r})
import ppo_iteration as bench
call = bench.OurIteration.__call__

def fail_at_sentiment_batch(self, mark):
    if len(self.queries) == 512:
        run = self.trainer.hp.run
        print(f"projection micro-batches {{run.rollout_micro_batch}}/{{run.train_micro_batch}}", file=sys.stderr)
        raise {error}
    return call(self, mark)

bench.OurIteration.__call__ = fail_at_sentiment_batch
bench.main(sys.argv[1:])
"""


def run_injected(tmp_path, error):
    out = tmp_path / "bench.json"
    code = INJECT.format(bench_dir=str(SCRIPT.parent), error=error)
    cmd = [sys.executable, "-c", code, "--size", "test", "--threads", "1", "--repeats", "1", "--warmup", "0",
           "--precision", "fp32", "--no-baselines", "--sentiment", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert "projection micro-batches {}/{}".format(*SENTIMENT_MICRO) in proc.stderr, proc.stderr[-3000:]
    return proc, out


@pytest.mark.parametrize("error", ['torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")',
                                   'RuntimeError("CUDA error: out of memory")'])
def test_projection_out_of_memory_is_a_figure_and_keeps_every_other(tmp_path, error):
    proc, out = run_injected(tmp_path, error)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    ours = report["results"]["fp32"]["ours"]
    assert set(ours) == set(PHASES) and all(ours[p]["median_s"] > 0 and ours[p]["peak_bytes"] for p in PHASES)
    s = report["sentiment"]
    assert (s["batch"], s["rollout_micro_batch"], s["train_micro_batch"]) == (512, *SENTIMENT_MICRO)
    assert s["error"] == "out of memory at batch 512 with micro-batches {}/{}".format(*SENTIMENT_MICRO)
    assert "out of memory" in s["detail"] and "projected_hours" not in s
    assert "update (4 ep)" in proc.stdout and "out of memory at batch 512 with micro-batches {}/{}".format(*SENTIMENT_MICRO) in proc.stdout


def test_projection_crash_keeps_every_earlier_figure(tmp_path):
    proc, out = run_injected(tmp_path, 'ValueError("not a memory problem")')
    assert proc.returncode != 0 and "ValueError: not a memory problem" in proc.stderr
    report = json.loads(out.read_text())  # written before the projection started
    assert set(report["results"]["fp32"]["ours"]) == set(PHASES) and "sentiment" not in report
    assert "update (4 ep)" in proc.stdout and "load average" in proc.stdout
