#!/usr/bin/env python
"""Load test of the labeling app: simulated labelers answer as fast as they can over HTTP on loopback.

A store of made-up comparisons (4 responses each, a tenth asked of two labelers, no model needed) is served by
`launch.py label serve` in a subprocess on 127.0.0.1; --labelers client threads, each with its own token and a
keep-alive connection, fetch their first comparison and then answer exactly --answers comparisons each (every
answer's response carries the next comparison, as on the page). Bounded in count and in time (--timeout).

Reports answers per second (all answers over the wall time from the first to the last) and the latency of an
answer request (p50, p99, max), and checks the store after the server stopped: every acknowledged answer is
there once, nothing else is, no labeler answered a comparison twice, and no comparison has more answers than it
asked for. Exit status 1 if a check fails or the time runs out.

    python benchmarks/labeling_load.py                          # 20 labelers x 50 answers
    python benchmarks/labeling_load.py --labelers 3 --answers 5 --json out.json
"""
import argparse
import http.client
import json
import os
import platform
import re
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runs from a fresh clone without installing the package

from lm_human_preferences.labeling.store import LabelStore  # noqa: E402

N_RESPONSES = 4


def make_store(path: Path, labelers: int, answers: int, overlap: float) -> tuple:
    """A store of labelers x (answers + 1) comparisons (each labeler holds a lease on one more than it answers; a
    fraction `overlap` is asked of two labelers); returns the labelers' tokens by name."""
    count = labelers * (answers + 1)
    store = LabelStore.create(path, {"label_type": f"best_of_{N_RESPONSES}", "num_responses": N_RESPONSES,
                                     "experiment": "load-test", "query_length": 8, "response_length": 8})
    round_id = store.add_round({"experiment": "load-test", "policy": "made up", "seed": 0})
    every = round(1 / overlap) if overlap > 0 else 0
    store.add_comparisons(round_id, [
        {"query_tokens": [i % 50000, 1, 2], "query_text": f"Query {i}: a made-up start of a text.\n",
         "responses": [([i % 50000, k], f" response {k} to query {i}, <b>not bold</b>\n second line")
                       for k in range(N_RESPONSES)],
         "copies": 2 if every and i % every == 0 else 1} for i in range(count)])
    tokens = {f"labeler{j:02d}": store.add_labeler(f"labeler{j:02d}") for j in range(labelers)}
    store.close()
    return tokens


class Server:
    """`launch.py label serve` on 127.0.0.1, a free port."""

    def __init__(self, store: Path):
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "launch.py"), "label", "serve", "--store",
                                      str(store), "--port", "0"], cwd=ROOT, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        lines = []
        for line in self.proc.stdout:
            lines.append(line)
            match = re.search(r"serving on http://127\.0\.0\.1:(\d+)/", line)
            if match:
                self.port = int(match.group(1))
                return
        raise SystemExit(f"the labeling server did not start:\n{''.join(lines)}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log = self.proc.stdout.read()  # what it printed after its address: errors, the stop line
        self.proc.stdout.close()


class Labeler(threading.Thread):
    """One simulated labeler: its first comparison, then `answers` answers as fast as the server allows."""

    def __init__(self, name, token, port, answers, start_barrier, deadline):
        super().__init__(daemon=True)
        self.name_, self.token, self.port, self.answers = name, token, port, answers
        self.start_barrier, self.deadline = start_barrier, deadline
        self.acks = []  # (uid, position, sample) for each acknowledged answer
        self.latencies = []  # seconds per answer request
        self.error = None
        self.finished_at = None

    def request(self, connection, method, path, body=None):
        headers = {"Authorization": f"Bearer {self.token}"}
        if body is not None:
            headers["Content-Type"] = "application/json"
            body = json.dumps(body)
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        raw = response.read()
        if response.status != 200:
            raise RuntimeError(f"{method} {path}: HTTP {response.status}: {raw[:300]!r}")
        return json.loads(raw)

    def run(self):
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            self.start_barrier.wait()
            data = self.request(connection, "GET", "/api/next")
            for i in range(self.answers):
                a = data["assignment"]
                if a is None:
                    raise RuntimeError(f"{self.name_} ran out of comparisons after {i} answers")
                if time.monotonic() > self.deadline:
                    raise RuntimeError(f"{self.name_}: out of time after {i} answers")
                position = (i * 7 + len(self.name_)) % len(a["responses"])
                start = time.perf_counter()
                data = self.request(connection, "POST", "/api/answer", {"assignment_id": a["id"],
                                                                        "position": position})
                self.latencies.append(time.perf_counter() - start)
                self.acks.append((a["uid"], position, data["recorded"]["sample"]))
        except Exception as e:  # reported by the main thread
            self.error = f"{type(e).__name__}: {e}"
        finally:
            self.finished_at = time.perf_counter()
            connection.close()


def percentile(sorted_values, q):
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return None
    rank = max(1, min(len(sorted_values), round(q / 100 * len(sorted_values) + 0.5)))
    return sorted_values[rank - 1]


def check(store_path: Path, workers) -> dict:
    """Compares the store with what the server acknowledged; counts of lost, duplicated and extra answers."""
    connection = sqlite3.connect(store_path)
    rows = connection.execute(
        "SELECT c.uid, l.name, a.choice_position, a.choice_sample, c.copies FROM assignments a "
        "JOIN comparisons c ON c.id = a.comparison_id JOIN labelers l ON l.id = a.labeler_id "
        "WHERE a.state = 'answered'").fetchall()
    connection.close()
    stored = Counter((uid, name, position, sample) for uid, name, position, sample, _ in rows)
    acked = Counter((uid, w.name_, position, sample) for w in workers for uid, position, sample in w.acks)
    per_labeler = Counter((uid, name) for uid, name, *_ in rows)
    per_comparison = Counter(uid for uid, *_ in rows)
    copies = {uid: c for uid, _, _, _, c in rows}
    return {"acknowledged": sum(acked.values()), "stored": sum(stored.values()),
            "lost": sum((acked - stored).values()),  # acknowledged but not in the store
            "extra": sum((stored - acked).values()),  # in the store but never acknowledged
            "duplicated": sum(n - 1 for n in per_labeler.values() if n > 1),  # a labeler twice on one comparison
            "over_copies": sum(1 for uid, n in per_comparison.items() if n > copies[uid])}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--labelers", type=int, default=20, help="simulated labelers (default 20)")
    parser.add_argument("--answers", type=int, default=50, help="answers per labeler (default 50)")
    parser.add_argument("--overlap", type=float, default=0.1, help="fraction of comparisons asked twice")
    parser.add_argument("--timeout", type=float, default=300, help="seconds before the run counts as failed")
    parser.add_argument("--json", help="also write the report as JSON to this file")
    args = parser.parse_args(argv)
    if args.labelers < 1 or args.answers < 1 or not 0 <= args.overlap <= 1:
        parser.error("--labelers and --answers must be >= 1, --overlap in [0, 1]")

    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="lmhp-labeling-load-") as tmp:
        store_path = Path(tmp) / "store.db"
        tokens = make_store(store_path, args.labelers, args.answers, args.overlap)
        server = Server(store_path)
        try:
            barrier = threading.Barrier(args.labelers + 1)
            deadline = time.monotonic() + args.timeout
            workers = [Labeler(name, token, server.port, args.answers, barrier, deadline)
                       for name, token in tokens.items()]
            for w in workers:
                w.start()
            barrier.wait()
            start = time.perf_counter()
            for w in workers:
                w.join(max(0.0, deadline - time.monotonic()) + 5)
            end = max((w.finished_at or time.perf_counter()) for w in workers)
        finally:
            server.stop()
        checks = check(store_path, workers)

    errors = [f"{w.name_}: {w.error}" for w in workers if w.error] + \
             [f"{w.name_}: still running at the deadline" for w in workers if w.is_alive()]
    latencies = sorted(x for w in workers for x in w.latencies)
    seconds = end - start
    total = sum(len(w.acks) for w in workers)
    ok = not errors and total == args.labelers * args.answers and checks["lost"] == checks["extra"] == \
        checks["duplicated"] == checks["over_copies"] == 0
    report = {
        "labelers": args.labelers, "answers_per_labeler": args.answers, "overlap": args.overlap,
        "answers": total, "seconds": seconds, "answers_per_s": total / seconds if seconds > 0 else None,
        "latency_ms": {"p50": percentile(latencies, 50) * 1e3 if latencies else None,
                       "p99": percentile(latencies, 99) * 1e3 if latencies else None,
                       "max": latencies[-1] * 1e3 if latencies else None},
        "checks": checks, "errors": errors, "ok": ok,
        "machine": {"cpus": os.cpu_count(), "loadavg_start": list(load_start), "loadavg_end": list(os.getloadavg()),
                    "python": platform.python_version(), "sqlite": sqlite3.sqlite_version},
    }
    lat = report["latency_ms"]
    print(f"{args.labelers} labelers x {args.answers} answers over HTTP on loopback: {total} answers in "
          f"{seconds:.2f} s = {report['answers_per_s']:.1f} answers/s")
    if latencies:
        print(f"answer latency: p50 {lat['p50']:.1f} ms, p99 {lat['p99']:.1f} ms, max {lat['max']:.1f} ms")
    print(f"store: {checks['stored']} answers stored, {checks['acknowledged']} acknowledged; lost {checks['lost']}, "
          f"unacknowledged {checks['extra']}, duplicated {checks['duplicated']}, over copies "
          f"{checks['over_copies']}")
    print(f"machine: {os.cpu_count()} CPUs, load average {load_start[0]:.2f} at the start "
          f"(server and clients share them); SQLite {sqlite3.sqlite_version}")
    for e in errors:
        print(f"error: {e}", file=sys.stderr)
    if not ok:
        print(f"the server's output:\n{server.log}", file=sys.stderr)
    print("ok: no lost or duplicated answer" if ok else "FAILED")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
