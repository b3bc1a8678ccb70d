"""utils/files.py: the one atomic writer."""
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
