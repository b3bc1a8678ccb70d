"""utils/files.py: the one atomic writer."""
import errno
import os

import pytest

from lm_human_preferences.utils import files


def test_atomic_open_replaces_only_when_the_block_completes(tmp_path):
    path = tmp_path / "sub" / "data.bin"
    with files.atomic_open(path) as f:
        f.write(b"first")
        assert not path.exists()  # nothing under the real name while writing
    assert path.read_bytes() == b"first"

    with pytest.raises(RuntimeError, match="interrupted"):
        with files.atomic_open(path) as f:
            f.write(b"second, half written")
            raise RuntimeError("interrupted")
    assert path.read_bytes() == b"first"
    assert [p.name for p in path.parent.iterdir()] == ["data.bin"]  # no temporary file left


@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o002, 0o664, 0o775),
                                                       (0o077, 0o600, 0o700)])
def test_files_and_directories_are_as_readable_as_the_umask_allows(tmp_path, umask, file_mode, dir_mode):
    old = os.umask(umask)
    try:
        files.atomic_write_bytes(tmp_path / "new" / "dir" / "a.bin", b"a")
        files.atomic_write_bytes(tmp_path / "new" / "dir" / "a.bin", b"replaced")  # a replaced file too
    finally:
        os.umask(old)
    assert (tmp_path / "new" / "dir" / "a.bin").stat().st_mode & 0o777 == file_mode
    for d in (tmp_path / "new", tmp_path / "new" / "dir"):
        assert d.stat().st_mode & 0o777 == dir_mode


# ---- where a command may write ------------------------------------------------------------------------------

def test_unwritable_says_why_a_path_cannot_be_written(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    (tmp_path / "dir").mkdir()
    assert files.unwritable(tmp_path / "new" / "deeper" / "a.json", directory=False) is None
    assert files.unwritable(tmp_path / "file", directory=False) is None  # replaced atomically
    assert files.unwritable(tmp_path / "new" / "deeper", directory=True) is None
    assert files.unwritable(tmp_path / "dir", directory=False) == f"{tmp_path / 'dir'} is a directory, not a file"
    assert files.unwritable(tmp_path / "file", directory=True) == f"{tmp_path / 'file'} is a file, not a directory"
    for path in (tmp_path / "file" / "a.json", tmp_path / "file" / "sub" / "a.json"):
        assert files.unwritable(path, directory=False) == f"{tmp_path / 'file'} is a file, not a directory"
    real_access, real_statvfs = os.access, os.statvfs
    # simulated: the tests run as root, which ignores permissions
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: str(p) != str(tmp_path / "dir") and real_access(p, mode))
    assert files.unwritable(tmp_path / "dir" / "a" / "b.json", directory=False) == (f"{tmp_path / 'dir'} is not "
                                                                                  f"writable for this user")

    class ReadOnly:
        f_flag = os.ST_RDONLY

    monkeypatch.setattr(os, "statvfs", lambda p: ReadOnly() if str(p) == str(tmp_path / "dir") else real_statvfs(p))
    assert files.unwritable(tmp_path / "dir", directory=True) == f"{tmp_path / 'dir'} is on a read-only file system"


@pytest.mark.parametrize("code, fix", [(errno.ENOSPC, "free disk space on its file system"),
                                       (errno.EDQUOT, "free space within your disk quota"),
                                       (errno.EACCES, "make its directory writable for this user or choose another "
                                                      "location"),
                                       (errno.EROFS, "its file system is read-only: choose a location on a writable "
                                                     "one"),
                                       (errno.EIO, "fix its location or choose another one")])
def test_writing_turns_an_os_error_into_one_line_naming_path_cause_and_fix(tmp_path, code, fix):
    with pytest.raises(files.WriteError) as info:
        with files.writing(tmp_path / "a.bin"):
            files.atomic_write_bytes(tmp_path / "a.bin", b"x")
            raise OSError(code, os.strerror(code))
    assert str(info.value) == f"could not write {tmp_path / 'a.bin'} ({os.strerror(code)}); {fix}"
    assert info.value.errno == code and isinstance(info.value, OSError)
