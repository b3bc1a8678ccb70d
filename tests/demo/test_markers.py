"""demo/markers.py: the stage cache notices missing, corrupted and outdated results."""
import pytest

from lm_human_preferences.demo import markers as demo_markers


def test_stage_markers_detect_missing_corrupted_and_changed_settings(tmp_path):
    markers = demo_markers.StageMarkers(tmp_path, ["a", "b"])
    out = tmp_path / "a" / "model.bin"
    out.parent.mkdir()
    out.write_bytes(b"weights")
    assert not markers.status("a", {"x": 1}).done
    assert markers.status("a", {"x": 1}).reason is None  # never finished: resume, not corrupt
    markers.mark_done("a", {"x": (1, 2)}, [out.parent], seconds=1.0, cpu_seconds=2.0, results={"loss": 3.0})
    status = markers.status("a", {"x": [1, 2]})
    assert status.done and status.marker["results"] == {"loss": 3.0}
    assert "other settings" in markers.status("a", {"x": [1, 3]}).reason
    out.write_bytes(b"weightz")
    assert "corrupted" in markers.status("a", {"x": [1, 2]}).reason
    out.unlink()
    assert "missing" in markers.status("a", {"x": [1, 2]}).reason
    markers.path("a").write_text("{not json")
    assert "unreadable" in markers.status("a", {"x": [1, 2]}).reason
    with pytest.raises(ValueError, match="unknown demo stage"):
        markers.path("c")


def test_invalidate_from_removes_that_stage_and_later_ones(tmp_path):
    markers = demo_markers.StageMarkers(tmp_path, ["a", "b", "c"])
    for stage in "abc":
        markers.mark_done(stage, {}, [], seconds=0.0, cpu_seconds=0.0)
    markers.invalidate_from("b")
    assert [markers.path(s).is_file() for s in "abc"] == [True, False, False]
