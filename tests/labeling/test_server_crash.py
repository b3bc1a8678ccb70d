"""kill -9 of `launch.py label serve` loses no acknowledged answer, and a server restarted on the same store
continues where the labelers were: every answer the server acknowledged (HTTP 200) is in the store after the
crash, at most the one answer in flight is there without an acknowledgement, and nothing is answered twice."""
import importlib.util
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("starlette", reason="the labeling app needs the `label` extra (pip install -e '.[label]')")
pytest.importorskip("uvicorn", reason="the labeling app needs the `label` extra (pip install -e '.[label]')")

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("lmhp_test_labeling_server", REPO / "tests/fixtures/labeling_server.py")
fx = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fx)


class Served:
    """`launch.py label serve --port 0` in a subprocess; `url` from the address it prints."""

    def __init__(self, store_path):
        self.proc = subprocess.Popen([sys.executable, str(REPO / "launch.py"), "label", "serve", "--store",
                                      str(store_path), "--port", "0"], cwd=REPO, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 60
        lines = []
        for line in self.proc.stdout:  # the server prints its address once it listens
            lines.append(line)
            match = re.search(r"serving on (http://127\.0\.0\.1:\d+)/", line)
            if match:
                self.url = match.group(1)
                break
            assert time.monotonic() < deadline, lines
        else:
            raise AssertionError(f"the server exited ({self.proc.wait()}) without serving: {''.join(lines)}")

    def kill9(self):
        os.kill(self.proc.pid, signal.SIGKILL)
        assert self.proc.wait(10) == -signal.SIGKILL
        self.proc.stdout.close()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            assert self.proc.wait(20) == 0
        self.proc.stdout.close()


def answer_until(url, token, acks, stop, limit):
    """Answers as fast as possible, recording each acknowledged (uid, position, sample), until `stop` is set,
    `limit` acknowledgements or nothing is left; a connection error (the server killed) ends it quietly."""
    try:
        data = fx.call(url, "GET", "/api/next", token=token)[3]
        while data["assignment"] is not None and not stop.is_set() and len(acks) < limit:
            a = data["assignment"]
            position = len(acks) % 4
            status, _, _, data = fx.call(url, "POST", "/api/answer", token=token,
                                         body={"assignment_id": a["id"], "position": position})
            assert status == 200, data
            acks.append((a["uid"], position, data["recorded"]["sample"]))
    except OSError:
        pass


def test_kill_9_loses_no_acknowledged_answer_and_a_restart_continues(tmp_path):
    count = 40
    path = tmp_path / "store.db"
    store = fx.make_store(path, count)
    token = store.add_labeler("alice")
    store.close()

    server = Served(path)
    acks = []
    try:
        # a labeler answering as fast as it can; the server is killed while its requests come and go
        stop = threading.Event()
        worker = threading.Thread(target=answer_until, args=(server.url, token, acks, stop, count))
        worker.start()
        deadline = time.monotonic() + 30
        while len(acks) < 10 and worker.is_alive() and time.monotonic() < deadline:
            time.sleep(0.005)
        server.kill9()
        worker.join(30)
        stop.set()
    finally:
        if server.proc.poll() is None:
            server.kill9()
    assert 10 <= len(acks) < count, len(acks)

    after_crash = LabelStoreView(path).answers()
    acknowledged = {(uid, "alice", position, sample) for uid, position, sample in acks}
    assert acknowledged <= set(after_crash)  # every acknowledged answer survived
    assert len(after_crash) - len(acknowledged) in (0, 1)  # at most the one in flight, committed but not acked
    assert len({row[0] for row in after_crash}) == len(after_crash)

    # a restart continues: the labeler gets the rest, nothing twice
    server = Served(path)
    try:
        more = []
        answer_until(server.url, token, more, threading.Event(), count)
        status, _, _, data = fx.call(server.url, "GET", "/api/next", token=token)
        assert status == 200 and data["assignment"] is None and data["progress"]["answered"] == count
    finally:
        server.stop()
    final = LabelStoreView(path).answers()
    assert sorted(row[0] for row in final) == sorted(f"1-{i}" for i in range(count))  # each once
    assert set(after_crash) <= set(final)
    assert {(uid, "alice", position, sample) for uid, position, sample in more} <= set(final)
    assert len(after_crash) + len(more) == count


class LabelStoreView:
    """The store as a fresh process would open it (after the server's kill -9)."""

    def __init__(self, path):
        from lm_human_preferences.labeling.store import LabelStore
        self.store = LabelStore(path)

    def answers(self):
        try:
            return [(a["uid"], a["name"], a["choice_position"], a["choice_sample"]) for a in self.store.answers()]
        finally:
            self.store.close()
