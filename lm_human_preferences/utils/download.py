"""Cached, verified downloads over plain HTTPS; under torchrun only rank 0 downloads.

Replaces the original's `utils/gcs.py` (gsutil into a local cache, ORIGINAL §7.5): a URL is cached at
`cache_dir()/<host>/<url path>`; rank 0 fetches it and writes a `<file>.ok` record after verifying it,
and the other ranks wait for that record.

The record (JSON) holds the file's sha256 and size, the content checks it passed (`expect`) and, for a
`file://` source, the source's size and mtime. Every `fetch` checks the cached file against it: a file whose
bytes changed since it was downloaded, that fails the caller's sha256, size or content check, or whose
`file://` source changed is dropped and fetched again, once; a fresh download that fails is not cached.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import pathlib
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

from tqdm import tqdm

from lm_human_preferences.utils.files import atomic_open, atomic_write_bytes

CHUNK_BYTES = 1 << 20
POLL_SECONDS = 0.5
DEFAULT_WAIT_SECONDS = 3600.0
URL_SCHEMES = ("http", "https", "file")
# expect= values: what a downloaded file must be (an HTML error or login page is neither).
CONTENT_KINDS = {"json": "JSON", "text": "UTF-8 text"}
_HTML_STARTS = (b"<!doctype html", b"<html", b"<head", b"<body", b"<?xml", b"<!--")


class DownloadError(RuntimeError):
    """A download failed: network error, bad HTTP status, short read, checksum mismatch, unexpected content or
    timeout."""


class _RetryableError(Exception):
    """An attempt failed in a way another attempt may fix."""


class _ContentError(Exception):
    """A complete response is not what was asked for (another attempt is not expected to fix it)."""


def cache_dir(override: str | os.PathLike | None = None) -> pathlib.Path:
    """The download cache: `override`, else env LMHP_CACHE_DIR, else ~/.cache/lm_human_preferences."""
    if override is not None:
        return pathlib.Path(override).expanduser()
    env = os.environ.get("LMHP_CACHE_DIR")
    if env:
        return pathlib.Path(env).expanduser()
    return pathlib.Path.home() / ".cache" / "lm_human_preferences"


def is_url(url_or_path: str | os.PathLike) -> bool:
    """Whether `url_or_path` is an http(s):// or file:// URL (anything else is treated as a local path)."""
    return urllib.parse.urlsplit(str(url_or_path)).scheme in URL_SCHEMES


def cache_path(url: str, cache: str | os.PathLike | None = None) -> pathlib.Path:
    """Where `fetch(url)` stores `url`: cache_dir(cache)/<host>/<url path> (query and fragment ignored)."""
    parts = urllib.parse.urlsplit(url)
    _check_scheme(url, parts.scheme)
    host = (parts.netloc or "localhost").replace(":", "_")
    segments = [s for s in urllib.parse.unquote(parts.path).split("/") if s]
    if not segments or parts.path.endswith("/"):
        raise DownloadError(f"cannot cache {url!r}: its path does not name a file")
    if any(s in (".", "..") for s in segments):
        raise DownloadError(f"cannot cache {url!r}: its path contains '.' or '..' segments")
    return cache_dir(cache).joinpath(host, *segments)


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_kind(expect: str) -> None:
    """ValueError unless `expect` is a known content check."""
    if expect not in CONTENT_KINDS:
        raise ValueError(f"unknown content check expect={expect!r}: expected one of {list(CONTENT_KINDS)} or None")


def content_problem(path: str | os.PathLike, expect: str | None) -> str | None:
    """Why the file at `path` is not `expect` ('json': parses as JSON; 'text': UTF-8 text), or None if it is.

    Either way an HTML page (an error or login page served in place of the file) is named as such.
    """
    if expect is None:
        return None
    _check_kind(expect)
    data = pathlib.Path(path).read_bytes()
    head = data[:200].lstrip(b"\xef\xbb\xbf \t\r\n")
    if head.lower().startswith(_HTML_STARTS) or (expect == "json" and head.startswith(b"<")):
        first = head.split(b"\n", 1)[0][:60].decode("utf-8", "replace")
        return f"it is an HTML page, not {CONTENT_KINDS[expect]} (it starts with {first!r})"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        return f"it is not UTF-8 text ({e})"
    if expect == "json":
        try:
            json.loads(text)
        except RecursionError:
            return "it is JSON nested too deeply to parse"
        except ValueError as e:
            return f"it is not valid JSON ({e}; truncated?)"
    return None


def _check_scheme(url: str, scheme: str) -> None:
    """Raise DownloadError for a URL scheme this module cannot fetch, suggesting the HTTPS form of gs://."""
    if scheme in URL_SCHEMES:
        return
    hint = ""
    if scheme == "gs":
        hint = f"; use the HTTPS form https://storage.googleapis.com/{url[len('gs://'):]}"
    raise DownloadError(f"unsupported URL scheme {scheme!r} in {url!r}: expected one of {URL_SCHEMES}{hint}")


def _show_progress(progress: bool, total: int | None) -> bool:
    """Whether to draw a progress bar: asked for, and either a terminal or a known size."""
    return progress and (sys.stderr.isatty() or total is not None)


def _fetch_once(url: str, f, *, sha256: str | None, size: int | None, timeout: float, progress: bool) -> None:
    """One attempt: stream `url` into the binary file `f` and verify length, size and sha256."""
    digest = hashlib.sha256()
    received = 0
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            length_header = response.headers.get("Content-Length")
            expected_length = int(length_header) if length_header is not None else None
            total = size if size is not None else expected_length
            name = pathlib.Path(urllib.parse.urlsplit(url).path).name
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=name,
                      disable=not _show_progress(progress, total), leave=False) as bar:
                for chunk in iter(lambda: response.read(CHUNK_BYTES), b""):
                    f.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as e:
        if e.code >= 500 or e.code == 429:
            raise _RetryableError(f"HTTP {e.code} {e.reason}") from e
        raise DownloadError(f"downloading {url} failed with HTTP {e.code} {e.reason}") from e
    except urllib.error.URLError as e:
        if isinstance(e.reason, FileNotFoundError):
            raise DownloadError(f"downloading {url} failed: {e.reason}") from e
        raise _RetryableError(f"network error: {e.reason}") from e
    except (http.client.HTTPException, ConnectionError, socket.timeout, TimeoutError) as e:
        raise _RetryableError(f"{type(e).__name__}: {e}") from e

    if expected_length is not None and received != expected_length:
        raise _RetryableError(f"short read: got {received} bytes, Content-Length says {expected_length}")
    if size is not None and received != size:
        raise _RetryableError(f"size mismatch: expected {size} bytes, got {received}")
    actual = digest.hexdigest()
    if sha256 is not None and actual != sha256.lower():
        raise _RetryableError(f"sha256 mismatch: expected {sha256.lower()}, got {actual}")


def download(url: str, dest: str | os.PathLike, *, sha256: str | None = None, size: int | None = None,
             expect: str | None = None, retries: int = 4, backoff: float = 1.0, timeout: float = 60,
             progress: bool = True) -> pathlib.Path:
    """Download an http(s):// or file:// `url` to `dest` atomically, verifying `size`, `sha256` and the content
    check `expect` (see `content_problem`) when given.

    Network errors, HTTP 5xx/429, short reads and checksum mismatches are retried `retries` times, waiting
    `backoff * 2**attempt` seconds; then DownloadError. Content that is not `expect` is not retried.
    `dest` appears only once complete and verified.
    """
    _check_scheme(url, urllib.parse.urlsplit(url).scheme)
    if retries < 0:
        raise ValueError(f"retries must be >= 0, got {retries}")
    if expect is not None:
        _check_kind(expect)
    dest = pathlib.Path(dest)
    failures = []
    for attempt in range(retries + 1):
        try:
            with atomic_open(dest) as f:  # a failed attempt leaves `dest` as it was
                _fetch_once(url, f, sha256=sha256, size=size, timeout=timeout, progress=progress)
                f.flush()
                problem = content_problem(f.name, expect)
                if problem is not None:
                    raise _ContentError(problem)
            return dest
        except _RetryableError as e:
            failures.append(f"attempt {attempt + 1}: {e}")
        except _ContentError as e:
            raise DownloadError(f"{url} did not give {CONTENT_KINDS[expect]}: {e}; nothing was cached. Check the URL "
                                f"(an error or login page?), or download the file yourself and pass its local "
                                f"path") from None
        if attempt < retries:
            time.sleep(backoff * 2 ** attempt)
    raise DownloadError(f"downloading {url} failed after {retries + 1} attempts ({'; '.join(failures)})")


def _ok_path(path: pathlib.Path) -> pathlib.Path:
    """The record rank 0 writes next to a verified cached file."""
    return path.with_name(path.name + ".ok")


def _read_record(path: pathlib.Path) -> dict | None:
    """The record of a cached file: a JSON object, or a bare sha256 line (older caches); None if absent or bad."""
    try:
        text = _ok_path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    if len(text) == 64 and all(c in "0123456789abcdef" for c in text):
        return {"sha256": text}
    try:
        record = json.loads(text)
    except ValueError:
        return None
    valid = (isinstance(record, dict) and isinstance(record.get("sha256"), str)
             and isinstance(record.get("checked", []), list))
    return record if valid else None


def _source_stat(url: str) -> dict | None:
    """Size and mtime of a file:// URL's file (the cache re-reads it when they change); None for other URLs."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "file":
        return None
    try:
        st = os.stat(urllib.request.url2pathname(parts.path))
    except OSError:
        return {"missing": True}  # never matches a record: the download then reports the error
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _stale_reason(path: pathlib.Path, record: dict | None, *, sha256: str | None, size: int | None,
                  expect: str | None, source: dict | None) -> str | None:
    """Why the cached `path` cannot be used as is (None if it can); drops nothing. Hashes the file. Without a
    record (a file put there by hand, or a crash before the record was written), only the caller's sha256 vouches
    for the bytes."""
    if not path.is_file():
        return "not cached"
    if source is not None and (record is None or record.get("source") != source):
        return "its file:// source changed"
    if size is not None and path.stat().st_size != size:
        return f"it has {path.stat().st_size} bytes, expected {size}"
    if record is None and sha256 is None:
        return "no record of a verified download"
    digest = file_sha256(path)
    if record is not None and digest != record["sha256"]:
        return "its bytes changed since it was downloaded"
    if sha256 is not None and digest != sha256.lower():
        return f"its sha256 {digest} is not the expected {sha256.lower()}"
    if expect is not None and expect not in (record or {}).get("checked", []):
        return content_problem(path, expect)  # checked once, then recorded
    return None


def _write_record(path: pathlib.Path, digest: str, checked: list[str], source: dict | None) -> None:
    record = {"sha256": digest, "size": path.stat().st_size, "checked": sorted(set(checked))}
    if source is not None:
        record["source"] = source
    atomic_write_bytes(_ok_path(path), (json.dumps(record, sort_keys=True) + "\n").encode())


def _env_int(name: str, default: int) -> int:
    """An integer environment variable, with an error naming it when malformed."""
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def _wait_timeout() -> float:
    """Seconds non-zero ranks wait for rank 0 (env LMHP_DOWNLOAD_TIMEOUT, default 3600)."""
    value = os.environ.get("LMHP_DOWNLOAD_TIMEOUT")
    if value is None or value == "":
        return DEFAULT_WAIT_SECONDS
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"environment variable LMHP_DOWNLOAD_TIMEOUT={value!r} is not a number of seconds") from None


def _record_accepts(path: pathlib.Path, *, sha256: str | None, size: int | None, expect: str | None,
                    source: dict | None) -> bool:
    """Whether rank 0 has published `path` as asked: file and record present, record as expected (no hashing)."""
    record = _read_record(path)
    if record is None or not path.is_file():
        return False
    if size is not None and path.stat().st_size != size:
        return False
    if sha256 is not None and record["sha256"] != sha256.lower():
        return False
    if expect is not None and expect not in record.get("checked", []):
        return False
    return source is None or record.get("source") == source


def _wait_for_rank0(url: str, path: pathlib.Path, cache: str | os.PathLike | None, **expected) -> pathlib.Path:
    """Poll until rank 0 has downloaded and verified `url` into `path`, or raise DownloadError on timeout."""
    timeout = _wait_timeout()
    deadline = time.monotonic() + timeout
    while not _record_accepts(path, **expected):
        if time.monotonic() >= deadline:
            raise DownloadError(
                f"rank 0 did not finish downloading {url} to {path} within {timeout:g} s "
                f"(LMHP_DOWNLOAD_TIMEOUT). Pre-download it by running once with a single process "
                f"(no torchrun); if ranks do not share the cache directory {cache_dir(cache)} (e.g. several nodes), "
                f"pre-download on every node or point LMHP_CACHE_DIR at a shared directory.")
        time.sleep(POLL_SECONDS)
    return path


def fetch(url_or_path: str | os.PathLike, *, sha256: str | None = None, size: int | None = None,
          expect: str | None = None, cache: str | os.PathLike | None = None) -> pathlib.Path:
    """A local file for `url_or_path`: a local path as is, a URL downloaded once into the cache.

    `expect` ('json', 'text' or None) is a content check for downloads (see `content_problem`); a local path is
    returned unchecked. On every call the cached file is checked against its record (see the module docstring):
    a file that fails is dropped and downloaded again, and a fresh download that fails raises DownloadError.
    Under torchrun (env RANK, WORLD_SIZE) only global rank 0 downloads; the other ranks wait for its record
    for up to LMHP_DOWNLOAD_TIMEOUT seconds.
    """
    if expect is not None:
        _check_kind(expect)
    if not is_url(url_or_path):
        scheme = urllib.parse.urlsplit(str(url_or_path)).scheme
        if "://" in str(url_or_path):
            _check_scheme(str(url_or_path), scheme)
        path = pathlib.Path(url_or_path).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"local file {str(path)!r} does not exist: pass an existing path or a URL")
        return path

    url = str(url_or_path)
    path = cache_path(url, cache)
    source = _source_stat(url)
    rank, world_size = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
    if world_size > 1 and rank != 0:
        return _wait_for_rank0(url, path, cache, sha256=sha256, size=size, expect=expect, source=source)

    record = _read_record(path)
    reason = _stale_reason(path, record, sha256=sha256, size=size, expect=expect, source=source)
    checked = set(record.get("checked", [])) if record is not None else set()
    if reason is None:
        if record is None or (expect is not None and expect not in checked):  # what was just verified
            _write_record(path, file_sha256(path), [*checked, *([expect] if expect else [])], source)
        return path
    _ok_path(path).unlink(missing_ok=True)
    if path.is_file():
        if record is not None and not (source is not None and record.get("source") != source):
            print(f"note: dropping the cached {path} ({reason}); downloading {url} again", file=sys.stderr)
        path.unlink()
    download(url, path, sha256=sha256, size=size, expect=expect)
    checked = {expect} if expect is not None else set()
    _write_record(path, file_sha256(path), sorted(checked), source)
    return path
