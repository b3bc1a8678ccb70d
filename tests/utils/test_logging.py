"""utils/logging.py: the metrics file, read robustly and appended without torn records."""
import errno
import json
import os

import pytest

from lm_human_preferences.utils import logging as metrics_logging
from lm_human_preferences.utils.files import WriteError


def _logger(path):
    return metrics_logging.Logger(is_main=True, metrics_path=path, config={}, wandb_setting="disabled")


def test_load_metrics_counts_damaged_lines_but_not_a_torn_last_line_or_blank_lines(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_bytes(b'{"step": 0, "a": 1.0}\n\xff\n[1]\n\n"s"\n{"step": 1, "a": 2.0}\n' + b"[" * 50000 + b"\n"
                     + b'{"step": 2, "a"')
    rows, damaged = metrics_logging.load_metrics(path)
    assert rows == [{"step": 0, "a": 1.0}, {"step": 1, "a": 2.0}] and damaged == 4
    assert metrics_logging.read_metrics(path) == rows


def test_logger_appends_one_record_per_call_with_non_finite_values_as_strings(tmp_path):
    logger = _logger(tmp_path / "sub" / "m.jsonl")
    logger.log({"a": 1.5}, 0)
    logger.log({"a": float("nan"), "b": float("inf")}, 1)
    lines = (tmp_path / "sub" / "m.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [{"step": 0, "a": 1.5}, {"step": 1, "a": "nan", "b": "inf"}]


class _FailingFile:
    """The metrics file, whose write stores part of the record and then fails as a full disk does."""

    def __init__(self, file):
        self.file = file

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()

    def write(self, data):
        self.file.write(data[:7])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_failed_append_leaves_whole_records_and_names_the_file(tmp_path, monkeypatch):
    path = tmp_path / "m.jsonl"
    logger = _logger(path)
    logger.log({"a": 1.0}, 0)
    real_open = open
    monkeypatch.setattr(metrics_logging, "open", lambda *a, **kw: _FailingFile(real_open(*a, **kw)), raising=False)
    with pytest.raises(WriteError, match=f"could not write {path} \\(No space left on device\\); free disk space"):
        logger.log({"a": 2.0}, 1)
    assert path.read_text() == '{"step": 0, "a": 1.0}\n'


def test_a_metrics_directory_that_cannot_be_made_names_the_file(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(WriteError, match=f"could not write {tmp_path / 'file' / 'm.jsonl'}"):
        _logger(tmp_path / "file" / "m.jsonl")
