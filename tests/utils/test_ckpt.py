"""utils/ckpt.py's safetensors reader (checkpoint directories and resume are tested
end to end in tests/test_resume.py and tests/test_faults.py)."""
import pytest
import torch

from lm_human_preferences.utils import ckpt


def test_load_tensors_round_trip_and_errors(tmp_path):
    tensors = {"w": torch.arange(6.0).reshape(2, 3).t(), "b": torch.zeros(3, dtype=torch.bfloat16)}
    ckpt.atomic_save_tensors(tmp_path / "m.safetensors", tensors)
    loaded = ckpt.load_tensors(tmp_path / "m.safetensors")
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[k], v) for k, v in tensors.items())

    with pytest.raises(FileNotFoundError, match="missing"):
        ckpt.load_tensors(tmp_path / "absent.safetensors")
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "m.safetensors").read_bytes()[:20])
    with pytest.raises(ckpt.CheckpointError, match="cut.safetensors is truncated or corrupt"):
        ckpt.load_tensors(tmp_path / "cut.safetensors")
