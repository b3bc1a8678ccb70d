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


def test_checkpoint_to_resume_refuses_incomplete_checkpoints_it_would_pass_over(tmp_path):
    assert ckpt.checkpoint_to_resume(tmp_path / "absent") is None
    ckpt.begin_checkpoint(tmp_path, 1)  # a crash while assembling the first checkpoint: nothing to pass over
    assert ckpt.checkpoint_to_resume(tmp_path) is None
    (tmp_path / "step-00000002").mkdir()  # no COMPLETE marker
    with pytest.raises(ckpt.InputError, match=r"holds no complete checkpoint, only step-00000002 without a COMPLETE "
                                              r"marker .* rerun with --overwrite instead of --resume, or delete "):
        ckpt.checkpoint_to_resume(tmp_path)
    (tmp_path / "step-00000002").rmdir()
    for step in (3, 4):
        ckpt.commit_checkpoint(ckpt.begin_checkpoint(tmp_path, step), keep=0)
    (tmp_path / "step-00000002").mkdir()  # older than the latest complete one: not passed over
    assert ckpt.checkpoint_to_resume(tmp_path).name == "step-00000004"
    (tmp_path / "step-00000005").mkdir()
    with pytest.raises(ckpt.InputError, match=r"holds step-00000005 without a COMPLETE marker .* newer than the latest "
                                              r"complete checkpoint step-00000004; .* To resume from step-00000004, "
                                              r"delete .*step-00000005 and rerun with --resume"):
        ckpt.checkpoint_to_resume(tmp_path)
    assert ckpt.agreed_checkpoint(tmp_path / "absent", is_main=True) is None  # one process: no collective
    with pytest.raises(ckpt.InputError, match="step-00000005 without a COMPLETE marker"):
        ckpt.agreed_checkpoint(tmp_path, is_main=True)


def test_commit_checkpoint_needs_every_file_and_marks_each_checkpoint_uniquely(tmp_path):
    tmp = ckpt.begin_checkpoint(tmp_path, 1)
    (tmp / "model.safetensors").write_bytes(b"x")
    with pytest.raises(OSError, match=r"rng-vrank1.pt missing from .*step-00000001.tmp"):
        ckpt.commit_checkpoint(tmp, keep=3, files=["model.safetensors", "rng-vrank1.pt"])
    assert not (tmp / "COMPLETE").exists() and ckpt.latest_checkpoint(tmp_path) is None
    (tmp / "rng-vrank1.pt").write_bytes(b"x")
    first = ckpt.commit_checkpoint(tmp, keep=3, files=["model.safetensors", "rng-vrank1.pt"])
    second = ckpt.commit_checkpoint(ckpt.begin_checkpoint(tmp_path, 2), keep=3)
    assert (first / "COMPLETE").read_bytes() != (second / "COMPLETE").read_bytes()  # what other ranks compare
    for bad in (-3, True, 2.0):
        with pytest.raises(ValueError, match="must be an integer >= 0"):
            ckpt.begin_checkpoint(tmp_path, bad)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000001", "step-00000002"]
