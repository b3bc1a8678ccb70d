"""torchrun plumbing read from the environment: LMHP_DIST_TIMEOUT is checked before any process group starts."""
import datetime
import re

import pytest

from lm_human_preferences.utils import dist


@pytest.mark.parametrize("text", ["abc", "nan", "inf", "-5", "0", "1e20", "30s"])
def test_bad_dist_timeout_is_one_error_naming_the_variable(monkeypatch, text):
    monkeypatch.setenv("LMHP_DIST_TIMEOUT", text)
    message = f"environment variable LMHP_DIST_TIMEOUT={text!r} is not a number of seconds in (0, 100000000]"
    with pytest.raises(ValueError, match=re.escape(message)):
        dist.dist_timeout()
    with pytest.raises(ValueError, match="LMHP_DIST_TIMEOUT"):
        dist.env_info("cpu")  # where the training commands check their environment, before any collective


@pytest.mark.parametrize("text, seconds", [(None, 1800), ("", 1800), ("60", 60), ("2.5", 2.5)])
def test_dist_timeout(monkeypatch, text, seconds):
    if text is None:
        monkeypatch.delenv("LMHP_DIST_TIMEOUT", raising=False)
    else:
        monkeypatch.setenv("LMHP_DIST_TIMEOUT", text)
    assert dist.dist_timeout() == datetime.timedelta(seconds=seconds)
    assert dist.env_info("cpu").world_size >= 1
