"""demo/markers.py: the stage cache notices missing, corrupted and outdated results, and markers that are not its
own."""
import json

import pytest
import torch

from lm_human_preferences.demo import markers as demo_markers
from lm_human_preferences.demo import stages
from lm_human_preferences.demo.profiles import PROFILES, DemoPaths


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


def _good_marker(markers, tmp_path):
    out = tmp_path / "a.bin"
    out.write_bytes(b"weights")
    return markers.mark_done("a", {"x": 1}, [out], seconds=1.0, cpu_seconds=2.0, results={"loss": 3.0})


@pytest.mark.parametrize("edit, problem", [
    (lambda m: [], "[] is not a JSON object"),
    (lambda m: 3, "3 is not a JSON object"),
    (lambda m: None, "null is not a JSON object"),
    (lambda m: {k: v for k, v in m.items() if k != "outputs"}, "no outputs"),
    (lambda m: {"outputs": {}}, "no stage, config, seconds, cpu_seconds, results"),
    (lambda m: {**m, "stage": "b"}, "it is the marker of stage 'b'"),
    (lambda m: {**m, "seconds": "x"}, "seconds is 'x', not a number of seconds"),
    (lambda m: {**m, "cpu_seconds": None}, "cpu_seconds is None"),
    (lambda m: {**m, "seconds": True}, "seconds is True"),
    (lambda m: {**m, "results": [1]}, "results is not an object"),
    (lambda m: {**m, "outputs": []}, "outputs is not an object"),
    (lambda m: {**m, "outputs": {"a.bin": 3}}, "the sha256 of output 'a.bin' is 3"),
    (lambda m: {**m, "outputs": {"../../etc/passwd": "0" * 64}}, "is not a path inside the work directory"),
    (lambda m: {**m, "outputs": {"/etc/passwd": "0" * 64}}, "is not a path inside the work directory"),
    (lambda m: {**m, "outputs": {"": "0" * 64}}, "is not a path inside the work directory"),
])
def test_a_marker_of_the_wrong_structure_is_not_cached_and_says_why(tmp_path, edit, problem):
    markers = demo_markers.StageMarkers(tmp_path, ["a", "b"])
    marker = _good_marker(markers, tmp_path)
    assert markers.status("a", {"x": 1}).done
    markers.path("a").write_text(json.dumps(edit(marker)))
    status = markers.status("a", {"x": 1})
    assert not status.done
    assert status.reason.startswith(f"its marker {markers.path('a')} is not a stage marker (")
    assert problem in status.reason


@pytest.mark.parametrize("content", [b"\xff\xfe", b"[" * 100000, b"{"])
def test_an_unreadable_marker_is_not_cached(tmp_path, content):
    markers = demo_markers.StageMarkers(tmp_path, ["a"])
    _good_marker(markers, tmp_path)
    markers.path("a").write_bytes(content)
    assert "is unreadable" in markers.status("a", {"x": 1}).reason


def test_the_demo_rebuilds_a_stage_whose_marker_has_the_wrong_structure(tmp_path, monkeypatch):
    calls, logs = [], []

    def stage_function(stage):
        def run(ctx):
            calls.append(stage)
            for path in ctx.paths.stage_outputs(stage):
                target = path / "data.bin" if not path.suffix else path
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(stage.encode())
            return {}
        return run

    monkeypatch.setattr(stages, "STAGE_FUNCTIONS", {s: stage_function(s) for s in stages.STAGES})
    monkeypatch.setattr(stages, "check_pretrained", lambda paths: None)
    ctx = stages.DemoContext(profile=PROFILES["fast"], paths=DemoPaths(work=tmp_path / "w", out=tmp_path / "o"),
                             corpus_dir=tmp_path, device=torch.device("cpu"), log=logs.append)
    stages.run_stages(ctx)
    marker_path = tmp_path / "w" / "stages" / "policy.json"
    marker = json.loads(marker_path.read_text())
    marker_path.write_text(json.dumps({**marker, "seconds": "long"}))
    calls.clear()
    stages.run_stages(ctx)
    assert calls == ["policy", "evaluate"]
    assert any("policy: the cached result is not usable (its marker" in line and "not a number of seconds" in line
               for line in logs)
