"""demo/stages.py: the stage driver caches, resumes after an interruption and rebuilds a corrupt cache."""
import pytest
import torch

from lm_human_preferences.demo import stages
from lm_human_preferences.demo.profiles import PROFILES, DemoPaths


def fake_stages(monkeypatch, calls, fail_in=None):
    """Replaces every stage by one that writes its outputs (a directory output gets one file) and records its call."""
    def make(stage):
        def run(ctx):
            if stage == fail_in:
                raise KeyboardInterrupt
            calls.append(stage)
            for path in ctx.paths.stage_outputs(stage):
                target = path / "data.bin" if not path.suffix else path
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(f"{stage} output".encode())
            return {"stage": stage}
        return run
    monkeypatch.setattr(stages, "STAGE_FUNCTIONS", {stage: make(stage) for stage in stages.STAGES})
    monkeypatch.setattr(stages, "check_pretrained", lambda paths: None)


def stage_context(tmp_path, log=None):
    paths = DemoPaths(work=tmp_path / "work", out=tmp_path / "out")
    return stages.DemoContext(profile=PROFILES["fast"], paths=paths, corpus_dir=tmp_path, device=torch.device("cpu"),
                              log=log or (lambda _: None))


def test_run_stages_caches_resumes_and_rebuilds(tmp_path, monkeypatch):
    calls = []
    fake_stages(monkeypatch, calls, fail_in="policy")
    with pytest.raises(stages.DemoInterrupted, match="policy"):
        stages.run_stages(stage_context(tmp_path))
    assert calls == ["corpus", "pretrain", "labels", "reward"]

    calls.clear()
    fake_stages(monkeypatch, calls)
    markers = stages.run_stages(stage_context(tmp_path))
    assert calls == ["policy", "evaluate"]  # the interrupted run's completed stages are reused
    assert set(markers) == set(stages.STAGES)

    calls.clear()
    stages.run_stages(stage_context(tmp_path))
    assert calls == []  # everything cached

    (tmp_path / "work" / "pretrained" / "model.safetensors").write_bytes(b"truncated")
    logs = []
    stages.run_stages(stage_context(tmp_path, logs.append))
    assert calls == ["pretrain", "labels", "reward", "policy", "evaluate"]  # a corrupt cache reruns it and later
    assert any("corrupted" in line and "rebuilding" in line for line in logs)

    calls.clear()
    stages.run_stages(stage_context(tmp_path), restart=True)
    assert calls == list(stages.RLHF_STAGES)  # --restart keeps the corpus and the pretrained model
