import sys

import pytest
import torch

from lm_human_preferences.utils import alloc


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt is Linux-only")
def test_keep_freed_memory_applies_once_and_changes_no_number():
    x = torch.randn(300, 50257, generator=torch.Generator().manual_seed(0))  # a logits-sized tensor
    before = torch.log_softmax(x, -1)
    assert alloc.keep_freed_memory() in (True, False)
    first = alloc._applied
    assert alloc.keep_freed_memory() is first  # idempotent
    assert torch.equal(torch.log_softmax(x, -1), before)


def test_opt_out_by_environment(monkeypatch):
    monkeypatch.setattr(alloc, "_applied", None)
    monkeypatch.setenv("LMHP_MALLOC", "default")
    assert alloc.keep_freed_memory() is False
