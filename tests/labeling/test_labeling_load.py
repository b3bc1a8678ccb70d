"""The labeling load benchmark runs tiny (3 labelers x 4 answers) and reports what it promises: answers per second,
answer latency p50/p99, and a store check with no lost, unacknowledged or duplicated answer."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("starlette", reason="the labeling app needs the `label` extra (pip install -e '.[label]')")
pytest.importorskip("uvicorn", reason="the labeling app needs the `label` extra (pip install -e '.[label]')")

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "labeling_load.py"


def test_the_load_benchmark_runs_tiny_and_checks_the_store(tmp_path):
    out = tmp_path / "load.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--labelers", "3", "--answers", "4", "--json", str(out),
                           "--timeout", "60"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert report["ok"] is True and report["errors"] == []
    assert (report["labelers"], report["answers_per_labeler"], report["answers"]) == (3, 4, 12)
    assert report["checks"] == {"acknowledged": 12, "stored": 12, "lost": 0, "extra": 0, "duplicated": 0,
                                "over_copies": 0}
    assert report["answers_per_s"] == pytest.approx(12 / report["seconds"]) and report["answers_per_s"] > 0
    lat = report["latency_ms"]
    assert 0 < lat["p50"] <= lat["p99"] <= lat["max"] < 60_000
    assert len(report["machine"]["loadavg_start"]) == 3
    for text in ("answers/s", "p50", "p99", "lost 0", "duplicated 0", "ok: no lost or duplicated answer"):
        assert text in proc.stdout


def test_the_store_check_finds_a_lost_and_a_duplicated_answer(tmp_path):
    """check() is what makes the benchmark's `ok` mean something: it must see a missing or doubled answer."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("lmhp_labeling_load", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    from lm_human_preferences.labeling.store import LabelStore

    tokens = bench.make_store(tmp_path / "s.db", 2, 2, 0.0)
    store = LabelStore(tmp_path / "s.db")
    alice = store.labeler_for_token(tokens["labeler00"])
    a = store.next_assignment(alice)
    sample = store.answer(alice, a.id, 1)

    class Worker:
        name_ = "labeler00"
        acks = [(a.comparison_uid, 1, sample)]

    assert bench.check(tmp_path / "s.db", [Worker()])["lost"] == 0
    Worker.acks = Worker.acks + [("1-5", 0, 0)]  # acknowledged, never stored
    checks = bench.check(tmp_path / "s.db", [Worker()])
    assert (checks["lost"], checks["extra"]) == (1, 0)
    Worker.acks = []  # stored, never acknowledged
    assert bench.check(tmp_path / "s.db", [Worker()])["extra"] == 1
    # the same labeler on the same comparison twice (written behind the store's back)
    db = store._connection()
    db.execute("INSERT INTO assignments (comparison_id, labeler_id, display_order, state, leased_at, expires_at, "
               "answered_at, choice_position, choice_sample) SELECT comparison_id, labeler_id, display_order, "
               "state, leased_at, expires_at, answered_at, choice_position, choice_sample FROM assignments "
               "WHERE id = ?", (a.id,))
    assert bench.check(tmp_path / "s.db", [Worker()])["duplicated"] == 1
    assert bench.check(tmp_path / "s.db", [Worker()])["over_copies"] == 1
