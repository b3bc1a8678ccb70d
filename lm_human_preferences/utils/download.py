"""Cached, verified downloads over plain HTTPS; under torchrun only rank 0 downloads.

Replaces the original's `utils/gcs.py` (gsutil into a local cache, ORIGINAL §7.5): a URL is cached at
`cache_dir()/<host>/<url path>`; rank 0 fetches it and writes a `<file>.ok` sentinel after verifying it,
and the other ranks wait for that sentinel.
"""

from __future__ import annotations

import hashlib
import http.client
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


class DownloadError(RuntimeError):
    """A download failed: network error, bad HTTP status, short read, checksum mismatch or timeout."""


class _RetryableError(Exception):
    """An attempt failed in a way another attempt may fix."""


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
             retries: int = 4, backoff: float = 1.0, timeout: float = 60,
             progress: bool = True) -> pathlib.Path:
    """Download an http(s):// or file:// `url` to `dest` atomically, verifying `size` and `sha256` when given.

    Network errors, HTTP 5xx/429, short reads and checksum mismatches are retried `retries` times, waiting
    `backoff * 2**attempt` seconds; then DownloadError. `dest` appears only once complete and verified.
    """
    _check_scheme(url, urllib.parse.urlsplit(url).scheme)
    if retries < 0:
        raise ValueError(f"retries must be >= 0, got {retries}")
    dest = pathlib.Path(dest)
    failures = []
    for attempt in range(retries + 1):
        try:
            with atomic_open(dest) as f:  # a failed attempt leaves `dest` as it was
                _fetch_once(url, f, sha256=sha256, size=size, timeout=timeout, progress=progress)
            return dest
        except _RetryableError as e:
            failures.append(f"attempt {attempt + 1}: {e}")
        if attempt < retries:
            time.sleep(backoff * 2 ** attempt)
    raise DownloadError(f"downloading {url} failed after {retries + 1} attempts:\n  " + "\n  ".join(failures))


def _ok_path(path: pathlib.Path) -> pathlib.Path:
    """The sentinel rank 0 writes next to a verified cached file."""
    return path.with_name(path.name + ".ok")


def _cached_digest(path: pathlib.Path, sha256: str | None, size: int | None) -> str | None:
    """The sha256 of a cached file that matches the expected size and sha256 (those given), else None."""
    if not path.is_file():
        return None
    if size is not None and path.stat().st_size != size:
        return None
    digest = file_sha256(path)
    return digest if sha256 is None or digest == sha256.lower() else None


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


def _sentinel_accepts(path: pathlib.Path, sha256: str | None, size: int | None) -> bool:
    """Whether rank 0 has published `path`: file and sentinel present, sentinel's sha256 and size as expected."""
    ok = _ok_path(path)
    if not (path.is_file() and ok.is_file()):
        return False
    if size is not None and path.stat().st_size != size:
        return False
    return sha256 is None or ok.read_text().strip() == sha256.lower()


def _wait_for_rank0(url: str, path: pathlib.Path, sha256: str | None, size: int | None,
                    cache: str | os.PathLike | None) -> pathlib.Path:
    """Poll until rank 0 has downloaded and verified `url` into `path`, or raise DownloadError on timeout."""
    timeout = _wait_timeout()
    deadline = time.monotonic() + timeout
    while not _sentinel_accepts(path, sha256, size):
        if time.monotonic() >= deadline:
            raise DownloadError(
                f"rank 0 did not finish downloading {url} to {path} within {timeout:g} s "
                f"(LMHP_DOWNLOAD_TIMEOUT). Pre-download it by running once with a single process "
                f"(no torchrun); if ranks do not share the cache directory {cache_dir(cache)} (e.g. several nodes), "
                f"pre-download on every node or point LMHP_CACHE_DIR at a shared directory.")
        time.sleep(POLL_SECONDS)
    return path


def fetch(url_or_path: str | os.PathLike, *, sha256: str | None = None, size: int | None = None,
          cache: str | os.PathLike | None = None) -> pathlib.Path:
    """A local file for `url_or_path`: a local path as is, a URL downloaded once into the cache.

    Under torchrun (env RANK, WORLD_SIZE) only global rank 0 downloads; the other ranks wait for its
    `<file>.ok` sentinel for up to LMHP_DOWNLOAD_TIMEOUT seconds. A cached file whose size or sha256
    does not match is downloaded again.
    """
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
    rank, world_size = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
    if world_size > 1 and rank != 0:
        return _wait_for_rank0(url, path, sha256, size, cache)

    ok = _ok_path(path)
    digest = _cached_digest(path, sha256, size)
    if digest is None:
        ok.unlink(missing_ok=True)
        download(url, path, sha256=sha256, size=size)
        digest = sha256.lower() if sha256 is not None else file_sha256(path)
    atomic_write_bytes(ok, (digest + "\n").encode())
    return path
