"""Atomic file writes: the one way the project writes a file (torch-free, so the download code can use it).

A file is written to a temporary name in its directory, flushed, fsynced and renamed over the real name, and the
directory is fsynced, so a crash or a full disk never leaves a half-written file under a real name.
"""
import contextlib
import os
import shutil
import uuid
from pathlib import Path


def fsync_dir(path: Path):
    """fsync a directory so a rename inside it is durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path):
    """A binary file to write `path` through: a temporary file in the same directory, flushed, fsynced and renamed
    over `path` when the block ends; if the block raises, `path` is unchanged and the temporary file is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path, data: bytes):
    """Writes `data` to `path` through `atomic_open`; on failure `path` is unchanged."""
    with atomic_open(path) as f:
        f.write(data)


def replace_dir(tmp: Path, final: Path):
    """Moves the complete directory `tmp` to `final`; an existing `final` is removed only after the move."""
    old = final.with_name(final.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    try:
        os.replace(tmp, final)
    except BaseException:
        if old.exists() and not final.exists():
            os.replace(old, final)  # put the previous version back
        raise
    fsync_dir(final.parent)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)
