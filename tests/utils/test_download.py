"""Cached, verified, rank-0 downloads against a local HTTP server (offline)."""

import collections
import hashlib
import http.server
import json
import os
import pathlib
import subprocess
import sys
import threading
import time

import pytest

from lm_human_preferences.utils import download as dl

PAYLOAD = bytes(range(256)) * 300  # 76,800 bytes, spans several reads
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()


class FixtureServer:
    """Serves scripted responses per path: each GET pops the next one, the last one repeats."""

    def __init__(self):
        self.routes = {}
        self.hits = collections.Counter()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.hits[self.path] += 1
                script = server.routes.get(self.path)
                if not script:
                    self.send_error(404)
                    return
                kind, body = script.pop(0) if len(script) > 1 else script[0]
                if kind == "status":
                    self.send_error(body)
                    return
                sent = body
                if kind == "truncate":  # promise the full length, send half, hang up
                    sent = body[: len(body) // 2]
                elif kind == "corrupt":  # right length, one flipped byte
                    sent = bytes([body[0] ^ 0xFF]) + body[1:]
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(sent)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def url(self, path):
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = FixtureServer()
    yield s
    s.close()


@pytest.fixture(autouse=True)
def single_process(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LMHP_DOWNLOAD_TIMEOUT", "LMHP_CACHE_DIR"):
        monkeypatch.delenv(name, raising=False)


def test_download_verifies_and_leaves_only_dest(server, tmp_path):
    server.routes["/data/file.bin"] = [("ok", PAYLOAD)]
    dest = tmp_path / "out" / "file.bin"
    got = dl.download(server.url("/data/file.bin"), dest, sha256=PAYLOAD_SHA, size=len(PAYLOAD), progress=False)
    assert got == dest and dest.read_bytes() == PAYLOAD
    assert os.listdir(dest.parent) == ["file.bin"]


def test_download_retries_server_error(server, tmp_path):
    server.routes["/flaky"] = [("status", 500), ("status", 503), ("ok", PAYLOAD)]
    dest = dl.download(server.url("/flaky"), tmp_path / "f", sha256=PAYLOAD_SHA, backoff=0.01, progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert server.hits["/flaky"] == 3


def test_truncated_transfer_rejected_after_retries(server, tmp_path):
    server.routes["/short"] = [("truncate", PAYLOAD)]
    url = server.url("/short")
    with pytest.raises(dl.DownloadError, match="short read|IncompleteRead") as info:
        dl.download(url, tmp_path / "f", retries=2, backoff=0.01, progress=False)
    assert url in str(info.value) and "3 attempts" in str(info.value)
    assert server.hits["/short"] == 3
    assert os.listdir(tmp_path) == []


def test_corrupt_transfer_retried_then_rejected(server, tmp_path):
    server.routes["/bad"] = [("corrupt", PAYLOAD)]
    url = server.url("/bad")
    with pytest.raises(dl.DownloadError) as info:
        dl.download(url, tmp_path / "f", sha256=PAYLOAD_SHA, retries=1, backoff=0.01, progress=False)
    corrupt_sha = hashlib.sha256(bytes([PAYLOAD[0] ^ 0xFF]) + PAYLOAD[1:]).hexdigest()
    message = str(info.value)
    assert url in message and PAYLOAD_SHA in message and corrupt_sha in message
    assert server.hits["/bad"] == 2
    assert os.listdir(tmp_path) == []


def test_corrupt_first_attempt_then_good(server, tmp_path):
    server.routes["/once"] = [("corrupt", PAYLOAD), ("ok", PAYLOAD)]
    dest = dl.download(server.url("/once"), tmp_path / "f", sha256=PAYLOAD_SHA, backoff=0.01, progress=False)
    assert dest.read_bytes() == PAYLOAD and server.hits["/once"] == 2


def test_size_mismatch_names_sizes(server, tmp_path):
    server.routes["/sized"] = [("ok", PAYLOAD)]
    with pytest.raises(dl.DownloadError, match=f"expected 5 bytes, got {len(PAYLOAD)}"):
        dl.download(server.url("/sized"), tmp_path / "f", size=5, retries=0, progress=False)
    assert os.listdir(tmp_path) == []


def test_client_error_is_not_retried(server, tmp_path):
    with pytest.raises(dl.DownloadError, match="HTTP 404"):
        dl.download(server.url("/missing"), tmp_path / "f", retries=3, backoff=0.01, progress=False)
    assert server.hits["/missing"] == 1


def test_download_file_url(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(PAYLOAD)
    dest = dl.download(src.as_uri(), tmp_path / "copy.bin", sha256=PAYLOAD_SHA, progress=False)
    assert dest.read_bytes() == PAYLOAD
    with pytest.raises(dl.DownloadError, match="nothere"):
        dl.download((tmp_path / "nothere").as_uri(), tmp_path / "x", backoff=0.01, progress=False)


def test_unsupported_scheme_suggests_https(tmp_path):
    with pytest.raises(dl.DownloadError, match="https://storage.googleapis.com/bucket/x.json"):
        dl.fetch("gs://bucket/x.json", cache=tmp_path)


def test_cache_dir_precedence(tmp_path, monkeypatch):
    assert dl.cache_dir() == pathlib.Path.home() / ".cache" / "lm_human_preferences"
    monkeypatch.setenv("LMHP_CACHE_DIR", str(tmp_path / "env"))
    assert dl.cache_dir() == tmp_path / "env"
    assert dl.cache_dir(tmp_path / "arg") == tmp_path / "arg"


def test_fetch_caches(server, tmp_path):
    server.routes["/a/b/data.json"] = [("ok", PAYLOAD)]
    url = server.url("/a/b/data.json")
    first = dl.fetch(url, sha256=PAYLOAD_SHA, size=len(PAYLOAD), cache=tmp_path)
    second = dl.fetch(url, sha256=PAYLOAD_SHA, size=len(PAYLOAD), cache=tmp_path)
    port = server.httpd.server_address[1]
    assert first == second == tmp_path / f"127.0.0.1_{port}" / "a" / "b" / "data.json"
    assert first.read_bytes() == PAYLOAD
    assert json.loads((first.parent / "data.json.ok").read_text())["sha256"] == PAYLOAD_SHA
    assert server.hits["/a/b/data.json"] == 1


def test_fetch_uses_env_cache_dir(server, tmp_path, monkeypatch):
    monkeypatch.setenv("LMHP_CACHE_DIR", str(tmp_path))
    server.routes["/e.bin"] = [("ok", PAYLOAD)]
    path = dl.fetch(server.url("/e.bin"))
    assert path.is_relative_to(tmp_path) and path.read_bytes() == PAYLOAD


def test_fetch_redownloads_corrupt_cache(server, tmp_path):
    server.routes["/c.bin"] = [("ok", PAYLOAD)]
    url = server.url("/c.bin")
    stale = dl.cache_path(url, tmp_path)
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"stale")
    assert dl.fetch(url, sha256=PAYLOAD_SHA, cache=tmp_path).read_bytes() == PAYLOAD
    assert server.hits["/c.bin"] == 1


def test_fetch_local_paths(tmp_path):
    local = tmp_path / "labels.json"
    local.write_text("[]")
    assert dl.fetch(local) == local
    assert dl.fetch(str(local)) == local
    with pytest.raises(FileNotFoundError, match="does-not-exist.json"):
        dl.fetch(tmp_path / "does-not-exist.json")


def _publish_as_rank0(url, cache, delay_between):
    """What rank 0 does: download into the cache, then (after a pause) write the sentinel."""
    path = dl.cache_path(url, cache)
    dl.download(url, path, progress=False)
    time.sleep(delay_between)
    (path.parent / (path.name + ".ok")).write_text(dl.file_sha256(path) + "\n")


def test_nonzero_rank_waits_for_rank0(server, tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LMHP_DOWNLOAD_TIMEOUT", "30")
    server.routes["/shared.bin"] = [("ok", PAYLOAD)]
    url = server.url("/shared.bin")
    rank0 = threading.Timer(0.3, _publish_as_rank0, args=(url, tmp_path, 0.7))
    start = time.monotonic()
    rank0.start()
    path = dl.fetch(url, sha256=PAYLOAD_SHA, cache=tmp_path)
    waited = time.monotonic() - start
    rank0.join()
    assert path.read_bytes() == PAYLOAD
    assert waited >= 1.0  # the file alone is not enough: it waits for the sentinel
    assert server.hits["/shared.bin"] == 1  # only "rank 0" downloaded


def test_nonzero_rank_timeout(server, tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LMHP_DOWNLOAD_TIMEOUT", "0.6")
    server.routes["/never.bin"] = [("ok", PAYLOAD)]
    url = server.url("/never.bin")
    # A cached file with a sentinel for other contents does not count as published.
    path = dl.cache_path(url, tmp_path)
    path.parent.mkdir(parents=True)
    path.write_bytes(PAYLOAD)
    (path.parent / (path.name + ".ok")).write_text("0" * 64 + "\n")
    with pytest.raises(dl.DownloadError, match="rank 0 did not finish downloading") as info:
        dl.fetch(url, sha256=PAYLOAD_SHA, cache=tmp_path)
    assert url in str(info.value) and "single process" in str(info.value)
    assert server.hits["/never.bin"] == 0


def test_two_processes_download_once(server, tmp_path):
    server.routes["/both.bin"] = [("ok", PAYLOAD)]
    url = server.url("/both.bin")
    code = ("import sys; from lm_human_preferences.utils import download as dl; "
            f"print(dl.fetch({url!r}, sha256={PAYLOAD_SHA!r}, cache=sys.argv[1]))")
    procs = []
    for rank in (1, 0):  # the waiter starts first
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LMHP_DOWNLOAD_TIMEOUT="60")
        procs.append(subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      cwd=pathlib.Path(__file__).resolve().parents[2]))
    outputs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert outputs[0][0] == outputs[1][0] == f"{dl.cache_path(url, tmp_path)}\n"
    assert server.hits["/both.bin"] == 1


# --- the cache checks what it holds on every use --------------------------------------------------------------

HTML_PAGE = b"<!DOCTYPE html>\n<html><head><title>Sign in</title></head><body>Please log in</body></html>\n"
LABELS = json.dumps([{"query": [1, 2], "best": 0}]).encode()


def _cache_as_old_code_did(url, cache, body):
    """A cached file with the bare-sha256 record the cache wrote before it recorded anything else."""
    path = dl.cache_path(url, cache)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(body)
    (path.parent / (path.name + ".ok")).write_text(hashlib.sha256(body).hexdigest() + "\n")
    return path


def test_edited_file_url_source_is_read_again(tmp_path):
    source = tmp_path / "labels.json"
    source.write_text("[1]")
    url = source.as_uri()
    assert dl.fetch(url, cache=tmp_path / "cache").read_text() == "[1]"
    source.write_text("[1, 2]")  # another size
    assert dl.fetch(url, cache=tmp_path / "cache").read_text() == "[1, 2]"
    source.write_text("[3, 4]")  # same size, another mtime
    st = source.stat()
    os.utime(source, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    assert dl.fetch(url, cache=tmp_path / "cache").read_text() == "[3, 4]"
    assert dl.fetch(url, cache=tmp_path / "cache").read_text() == "[3, 4]"  # unchanged: served from the cache


def test_cached_html_page_is_dropped_and_fetched_again(server, tmp_path, capsys):
    server.routes["/labels/offline_5k.json"] = [("ok", LABELS)]
    url = server.url("/labels/offline_5k.json")
    _cache_as_old_code_did(url, tmp_path, HTML_PAGE)  # an error page an earlier run cached as valid
    path = dl.fetch(url, expect="json", cache=tmp_path)
    assert path.read_bytes() == LABELS and server.hits["/labels/offline_5k.json"] == 1
    assert "HTML page" in capsys.readouterr().err
    assert dl.fetch(url, expect="json", cache=tmp_path).read_bytes() == LABELS
    assert server.hits["/labels/offline_5k.json"] == 1  # checked once, then trusted while its bytes are unchanged


@pytest.mark.parametrize("body, problem", [(HTML_PAGE, "HTML page, not JSON"), (LABELS[:-5], "not valid JSON"),
                                           (b"\xff\xfe[]", "not UTF-8 text")])
def test_response_that_is_not_json_is_not_cached(server, tmp_path, body, problem):
    server.routes["/bad.json"] = [("ok", body)]
    url = server.url("/bad.json")
    for hits in (1, 2):  # nothing cached: the next use asks again
        with pytest.raises(dl.DownloadError, match=problem) as info:
            dl.fetch(url, expect="json", cache=tmp_path)
        assert "\n" not in str(info.value) and url in str(info.value)
        assert server.hits["/bad.json"] == hits
    assert not dl.cache_path(url, tmp_path).exists()
    assert not dl.cache_path(url, tmp_path).with_name("bad.json.ok").exists()


def test_cached_html_page_refetched_once_then_one_line_error(server, tmp_path):
    server.routes["/still-bad.json"] = [("ok", HTML_PAGE)]
    url = server.url("/still-bad.json")
    cached = _cache_as_old_code_did(url, tmp_path, HTML_PAGE)
    with pytest.raises(dl.DownloadError, match="HTML page") as info:
        dl.fetch(url, expect="json", cache=tmp_path)
    assert "\n" not in str(info.value)
    assert server.hits["/still-bad.json"] == 1 and not cached.exists()


def test_cached_file_whose_bytes_changed_is_fetched_again(server, tmp_path):
    server.routes["/model.bin"] = [("ok", PAYLOAD)]
    url = server.url("/model.bin")
    path = dl.fetch(url, cache=tmp_path)  # no sha256 from the caller: the record's is checked
    path.write_bytes(PAYLOAD[:1000])  # truncated on disk
    assert dl.fetch(url, cache=tmp_path).read_bytes() == PAYLOAD
    assert server.hits["/model.bin"] == 2


def test_text_check_rejects_html(server, tmp_path):
    server.routes["/list.txt"] = [("ok", HTML_PAGE)]
    with pytest.raises(dl.DownloadError, match="HTML page, not UTF-8 text"):
        dl.fetch(server.url("/list.txt"), expect="text", cache=tmp_path)
    server.routes["/ok.txt"] = [("ok", b"http://www.cnn.com/a\n")]
    assert dl.fetch(server.url("/ok.txt"), expect="text", cache=tmp_path).read_bytes() == b"http://www.cnn.com/a\n"


def test_unknown_content_check_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown content check expect='yaml'"):
        dl.fetch("https://example.com/x.yaml", expect="yaml", cache=tmp_path)


def test_nonzero_rank_does_not_accept_a_record_of_an_older_file_source(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LMHP_DOWNLOAD_TIMEOUT", "0.6")
    source = tmp_path / "labels.json"
    source.write_text("[1]")
    url = source.as_uri()
    path = _cache_as_old_code_did(url, tmp_path / "cache", b"[1]")  # no record of the source's size and mtime
    with pytest.raises(dl.DownloadError, match="rank 0 did not finish"):
        dl.fetch(url, cache=tmp_path / "cache")
    monkeypatch.setenv("RANK", "0")
    assert dl.fetch(url, cache=tmp_path / "cache") == path  # rank 0 re-reads and records it
    monkeypatch.setenv("RANK", "1")
    assert dl.fetch(url, cache=tmp_path / "cache") == path


def test_download_failure_is_one_line(server, tmp_path):
    server.routes["/flaky-forever"] = [("status", 503)]
    with pytest.raises(dl.DownloadError, match="failed after 2 attempts") as info:
        dl.download(server.url("/flaky-forever"), tmp_path / "f", retries=1, backoff=0.01, progress=False)
    assert "\n" not in str(info.value)


# --- file modes -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o002, 0o664, 0o775)])
def test_cache_files_are_readable_as_the_umask_allows(server, tmp_path, umask, file_mode, dir_mode):
    server.routes["/shared/data.json"] = [("ok", LABELS)]
    old = os.umask(umask)
    try:
        path = dl.fetch(server.url("/shared/data.json"), expect="json", cache=tmp_path / "cache")
    finally:
        os.umask(old)
    for p in (path, path.with_name("data.json.ok")):
        assert p.stat().st_mode & 0o777 == file_mode, p
    for d in (path.parent, path.parent.parent, tmp_path / "cache"):
        assert d.stat().st_mode & 0o777 == dir_mode, d
