"""Atomic file writes: the one way the project writes a file (torch-free, so the download code can use it).

A file is written to a temporary name in its directory, flushed, fsynced and renamed over the real name, and the
directory is fsynced, so a crash or a full disk never leaves a half-written file under a real name.
"""
import contextlib
import errno
import os
import shutil
import uuid
from pathlib import Path
from typing import Optional


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


def append_all(file, data: bytes):
    """Appends `data` to the unbuffered binary `file`; if a write fails (a full disk), the file is cut back to its
    length before, so it never ends in a partial record."""
    end = file.seek(0, os.SEEK_END)
    view = memoryview(data)
    try:
        while view:
            view = view[file.write(view):]
    except OSError:
        file.truncate(end)
        raise


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


# ---- where a command may write, and what to say when a write fails ------------------------------------------

# What to do about the usual causes of a failed write, by errno.
_WRITE_FIXES = {errno.ENOSPC: "free disk space on its file system", errno.EDQUOT: "free space within your disk quota",
                errno.EACCES: "make its directory writable for this user or choose another location",
                errno.EPERM: "make its directory writable for this user or choose another location",
                errno.EROFS: "its file system is read-only: choose a location on a writable one"}


class WriteError(OSError):
    """A write that failed mid-way (a full disk, no permission, a read-only file system); its message names the
    path, the cause and the fix, on one line."""

    def __init__(self, message: str, path, errno_: Optional[int]):
        super().__init__(message)
        self.errno = errno_ or errno.EIO
        self.path = path


def fix_for(error: OSError) -> str:
    """What to do about a failed write, by its cause."""
    return _WRITE_FIXES.get(error.errno, "fix its location or choose another one")


def write_error(path, error: OSError) -> WriteError:
    """The WriteError for `error`, raised while writing `path`."""
    return WriteError(f"could not write {path} ({error.strerror or error}); {fix_for(error)}", path, error.errno)


@contextlib.contextmanager
def writing(path):
    """Turns an OSError raised in the block into the WriteError of `path` (a WriteError passes unchanged)."""
    try:
        yield
    except WriteError:
        raise
    except OSError as e:
        raise write_error(path, e) from e


def unwritable(path, *, directory: bool) -> Optional[str]:
    """Why a file (`directory`: a directory) cannot be created or replaced at `path`, or None if it can: the path
    is the other kind of thing, or its nearest existing ancestor is not a directory, not writable or on a read-only
    file system. Checked before a command starts its work, so that work is never lost to a bad output path."""
    path = Path(path)
    if path.is_dir() != directory and path.exists():
        return f"{path} is {'a file, not a directory' if directory else 'a directory, not a file'}"
    ancestor = path if directory else path.parent
    while not ancestor.exists():
        ancestor = ancestor.parent  # ends at '.' or '/', which exist
    if not ancestor.is_dir():
        return f"{ancestor} is a file, not a directory"
    try:
        read_only = bool(os.statvfs(ancestor).f_flag & os.ST_RDONLY)
    except OSError:
        read_only = False
    if read_only:
        return f"{ancestor} is on a read-only file system"
    if not os.access(ancestor, os.W_OK | os.X_OK):
        return f"{ancestor} is not writable for this user"
    return None
