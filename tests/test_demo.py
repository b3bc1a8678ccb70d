"""The offline demo (`python launch.py demo`): its pieces, and the reduced end-to-end run that must learn.

The end-to-end test runs `launch.py demo --fast` in a subprocess (3-6 minutes on 2 CPU cores) and checks that
the labeler's score of policy samples on held-out queries rises by more than four times the seed noise the run
measures itself (the initial policy re-sampled with a second seed, and the standard error of the rise), while the KL
to the initial policy stays bounded.
"""
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lm_human_preferences import demo, demo_corpus, demo_eval, demo_labels, demo_pretrain, demo_stages
from lm_human_preferences.language.datasets import TokenFile, write_token_file
from lm_human_preferences.language.encodings import get_encoding
from lm_human_preferences.language.labels import records_to_arrays
from lm_human_preferences.language import model as gpt2
from lm_human_preferences.policy import Policy
from lm_human_preferences.rewards import RewardModel

REPO = Path(__file__).resolve().parents[1]
HAVE_CORPUS = bool(demo_corpus.FORTUNES_DIR.is_dir() and any(demo_corpus.FORTUNES_DIR.iterdir()))
HAVE_VADER = importlib.util.find_spec("vaderSentiment") is not None


# ---- corpus -------------------------------------------------------------------------------------------------

def write_fortunes(directory: Path) -> Path:
    """A tiny fortunes directory: two files, a .dat index and a .u8 link that must be skipped."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "wisdom").write_text("A first\n\tentry.\n%\nSecond _\x08u_\x08n entry. It has two sentences.\n%\n\n%\n")
    (directory / "love").write_text("Love is patient.\n%\nLove is kind. And more.\n")
    (directory / "wisdom.dat").write_bytes(b"\x00\x01binary")
    (directory / "wisdom.u8").symlink_to(directory / "wisdom")
    (directory / "ascii-art").write_text("  /\\_/\\\n ( o.o )\n%\n")
    return directory


def test_clean_entry_removes_overstrike_and_collapses_whitespace():
    assert demo_corpus.clean_entry("  _\x08b_\x08o_\x08l_\x08d\n\ttext  ") == "bold text"


def test_read_fortunes_reads_text_files_only(tmp_path):
    entries = demo_corpus.read_fortunes(write_fortunes(tmp_path / "f"))
    assert entries == ["Love is patient.", "Love is kind. And more.", "A first entry.",
                       "Second un entry. It has two sentences."]


def test_missing_corpus_says_how_to_install(tmp_path):
    with pytest.raises(demo_corpus.CorpusMissingError, match="apt-get install fortunes"):
        demo_corpus.read_fortunes(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(demo_corpus.CorpusMissingError, match="apt-get install fortunes"):
        demo_corpus.fortune_files(tmp_path / "empty")


def test_split_corpus_is_disjoint_complete_and_deterministic():
    entries = [f"entry {i}." for i in range(1000)]
    parts = demo_corpus.split_corpus(entries)
    assert [len(parts[n]) for n in demo_corpus.SPLIT_NAMES] == [700, 200, 100]
    assert sorted(sum(parts.values(), [])) == sorted(entries)
    assert parts == demo_corpus.split_corpus(list(entries))
    assert parts != demo_corpus.split_corpus(entries, seed=1)


def test_prepare_corpus_writes_token_files_the_query_sampler_reads(tmp_path):
    stats = demo_corpus.prepare_corpus(write_fortunes(tmp_path / "f"), tmp_path / "corpus")
    assert sum(s["documents"] for s in stats.values()) == 4
    enc = get_encoding("main")
    docs = [enc.decode(d) for name in demo_corpus.SPLIT_NAMES for d in TokenFile(tmp_path / "corpus" / name)]
    assert sorted(docs) == sorted(demo_corpus.read_fortunes(tmp_path / "f"))
    assert all(p.is_file() for p in demo_corpus.corpus_files(tmp_path / "corpus"))


def test_main_fails_fast_without_corpus(tmp_path, capsys):
    code = demo.main(["--fast", "--corpus_dir", str(tmp_path / "none"), "--cache_dir", str(tmp_path / "c"),
                      "--out", str(tmp_path / "o")])
    assert code == 2
    assert "apt-get install fortunes" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


# ---- labels -------------------------------------------------------------------------------------------------

def test_pick_best_takes_the_maximum_and_breaks_ties_at_random():
    rng = np.random.default_rng(0)
    scores = np.array([[0.1, 0.5, -0.2, 0.0], [0.0, 0.0, 0.0, 0.0], [0.3, 0.3, -1.0, 0.3]])
    picks = np.stack([demo_labels.pick_best(scores, rng) for _ in range(400)])
    assert (picks[:, 0] == 1).all()
    assert set(picks[:, 1]) == {0, 1, 2, 3}
    assert set(picks[:, 2]) == {0, 1, 3}


def test_label_records_have_the_original_best_of_4_schema():
    pad = 50259
    queries = torch.tensor([[10, 13, pad, pad], [11, 12, 13, pad]])
    samples = torch.tensor([[[1, 13, pad]] * 4, [[2, 3, 13]] * 4])
    records = demo_labels.label_records(queries, samples, np.array([2, 0]))
    assert records[0] == {"query": [10, 13, pad, pad], "sample0": [1, 13, pad], "sample1": [1, 13, pad],
                          "sample2": [1, 13, pad], "sample3": [1, 13, pad], "best": 2}
    assert all(type(v) is int for r in records for k, v in r.items() if k == "best")
    arrays = records_to_arrays(json.loads(json.dumps(records)), "best_of_4", query_length=4, response_length=3,
                               n_vocab=50257, padding_token=pad)
    assert arrays["best"].tolist() == [2, 0]


@pytest.mark.skipif(not HAVE_VADER, reason="vaderSentiment is not installed (pip install vaderSentiment)")
def test_labeler_scores_sentiment():
    score = demo_labels.make_labeler()
    happy, neutral, sad = score(["I love this wonderful day.", "The table has four legs.", "A terrible, sad loss."])
    assert happy > 0.5 and neutral == 0.0 and sad < -0.5


# ---- stage markers ------------------------------------------------------------------------------------------

def test_stage_markers_detect_missing_corrupted_and_changed_settings(tmp_path):
    markers = demo_stages.StageMarkers(tmp_path, ["a", "b"])
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
    markers = demo_stages.StageMarkers(tmp_path, ["a", "b", "c"])
    for stage in "abc":
        markers.mark_done(stage, {}, [], seconds=0.0, cpu_seconds=0.0)
    markers.invalidate_from("b")
    assert [markers.path(s).is_file() for s in "abc"] == [True, False, False]


# ---- pretraining --------------------------------------------------------------------------------------------

def test_learning_rate_warms_up_then_decays_to_a_tenth():
    config = demo_pretrain.PretrainConfig(steps=100, warmup=10, lr=1.0)
    lrs = [demo_pretrain.learning_rate(s, config) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert demo_pretrain.learning_rate(100, config) == pytest.approx(0.1)


def test_token_stream_and_windows(tmp_path):
    write_token_file(tmp_path / "lm", [[1, 2, 3], [4, 5]])
    stream = demo_pretrain.token_stream(TokenFile(tmp_path / "lm"), eot_token=9)
    assert stream.tolist() == [1, 2, 3, 9, 4, 5, 9]
    windows = demo_pretrain.sample_windows(stream, 5, 3, np.random.default_rng(0))
    assert windows.shape == (5, 3)
    assert all(any(stream[s:s + 3].tolist() == w for s in range(5)) for w in windows.tolist())
    with pytest.raises(ValueError, match="fewer than one window"):
        demo_pretrain.sample_windows(stream, 1, 8, np.random.default_rng(0))


def test_pretrain_lowers_the_loss_and_writes_a_loadable_model(tmp_path):
    docs = [[int(t) for t in np.arange(i, i + 30) % 50] for i in range(40)]  # a learnable counting pattern
    write_token_file(tmp_path / "lm", docs)
    config = demo_pretrain.PretrainConfig(n_layer=1, n_embd=16, n_head=2, n_ctx=16, batch_size=8, steps=40, lr=1e-2,
                                          warmup=4, precision="fp32")
    stats = demo_pretrain.pretrain(config, TokenFile(tmp_path / "lm"), TokenFile(tmp_path / "lm"), tmp_path / "m",
                                   torch.device("cpu"), log=lambda _: None)
    losses = [loss for _, loss in stats["losses"]]
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 1.0
    from lm_human_preferences.language.trained_models import load_model
    model = load_model(str(tmp_path / "m"), ["value"], n_vocab=50257)
    assert model.config.n_layer == 1 and float(model.heads["value"].w.detach().abs().sum()) == 0.0


# ---- evaluation ---------------------------------------------------------------------------------------------

def test_last_per_step_keeps_the_last_row_of_a_repeated_step():
    rows = [{"step": 0, "k": 1.0}, {"step": 1, "k": 2.0}, {"step": 1, "k": 5.0}, {"step": 2, "other": 1.0}]
    assert demo_eval.last_per_step(rows, "k") == ([0.0, 1.0], [1.0, 5.0])


def test_evaluate_policy_of_the_reference_itself_has_zero_kl():
    torch.manual_seed(0)
    enc = get_encoding("test")
    policy = Policy(gpt2.GPT2(gpt2.test_config(), ["value"]), temperature=0.7, padding_token=enc.padding_token).eval()
    reward_model = RewardModel(gpt2.GPT2(gpt2.test_config(), ["reward"]), padding_token=enc.padding_token).eval()
    task = demo.reward_hparams(demo.PROFILES["fast"], demo.DemoPaths(Path("w"), Path("o")), "cpu").task
    task.response_length, task.truncate_token, task.truncate_after = 3, 26, 1
    queries = torch.randint(0, 27, (10, 4))

    def labeler(texts):
        return np.array([text.count("a") / 3 for text in texts])

    result = demo_eval.evaluate_policy(policy, policy, reward_model, queries, task, enc, labeler,
                                       torch.Generator().manual_seed(0), batch_size=4)
    assert len(result["samples"]) == 10
    assert abs(result["kl"]) < 1e-4
    assert result["score"] == pytest.approx(np.mean([s["score"] for s in result["samples"]]))
    assert all(set(s) == {"query", "response", "score", "reward", "kl"} for s in result["samples"])


# ---- settings -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("profile", sorted(demo.PROFILES))
def test_profiles_build_valid_training_hparams(profile, tmp_path):
    paths = demo.DemoPaths(work=tmp_path / "w", out=tmp_path / "o")
    p = demo.PROFILES[profile]
    reward = demo.reward_hparams(p, paths, "cpu")
    policy = demo.policy_hparams(p, paths, "cpu")
    reward.check_world_size(1)
    policy.check_world_size(1)
    assert reward.task.to_nested_dict() == policy.task.to_nested_dict()
    assert reward.labels.num_train == (p.num_labels - p.num_heldout) * p.rm_epochs
    assert reward.labels.num_train % reward.batch_size == 0 and 0 < p.num_heldout < p.num_labels
    assert p.query_length + p.response_length <= p.pretrain.n_ctx
    assert policy.rewards.adaptive_kl is not None and reward.normalize_before and reward.normalize_after


# ---- the stage driver: caching, corruption, interruption ----------------------------------------------------

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
    monkeypatch.setattr(demo, "STAGE_FUNCTIONS", {stage: make(stage) for stage in demo.STAGES})
    monkeypatch.setattr(demo, "check_pretrained", lambda paths: None)


def stage_context(tmp_path, log=None):
    paths = demo.DemoPaths(work=tmp_path / "work", out=tmp_path / "out")
    return demo.DemoContext(profile=demo.PROFILES["fast"], paths=paths, corpus_dir=tmp_path, device=torch.device("cpu"),
                            log=log or (lambda _: None))


def test_run_stages_caches_resumes_and_rebuilds(tmp_path, monkeypatch):
    calls = []
    fake_stages(monkeypatch, calls, fail_in="policy")
    with pytest.raises(demo.DemoInterrupted, match="policy"):
        demo.run_stages(stage_context(tmp_path))
    assert calls == ["corpus", "pretrain", "labels", "reward"]

    calls.clear()
    fake_stages(monkeypatch, calls)
    markers = demo.run_stages(stage_context(tmp_path))
    assert calls == ["policy", "evaluate"]  # the interrupted run's completed stages are reused
    assert set(markers) == set(demo.STAGES)

    calls.clear()
    demo.run_stages(stage_context(tmp_path))
    assert calls == []  # everything cached

    (tmp_path / "work" / "pretrained" / "model.safetensors").write_bytes(b"truncated")
    logs = []
    demo.run_stages(stage_context(tmp_path, logs.append))
    assert calls == ["pretrain", "labels", "reward", "policy", "evaluate"]  # a corrupt cache reruns it and later
    assert any("corrupted" in line and "rebuilding" in line for line in logs)

    calls.clear()
    demo.run_stages(stage_context(tmp_path), restart=True)
    assert calls == list(demo.RLHF_STAGES)  # --restart keeps the corpus and the pretrained model


# ---- the reduced end-to-end run -----------------------------------------------------------------------------

@pytest.mark.skipif(not HAVE_CORPUS, reason="Debian's fortunes corpus is not installed (make corpus, or "
                                            "apt-get install fortunes)")
@pytest.mark.skipif(not HAVE_VADER, reason="vaderSentiment is not installed (pip install vaderSentiment)")
def test_fast_demo_raises_the_labelers_score_with_bounded_kl(tmp_path):
    """`launch.py demo --fast` end to end in a subprocess: the labeler's mean score of policy samples on held-out
    queries rises by far more than the seed noise the run measures itself (the initial policy sampled with a second
    seed, and the standard error of the difference), with the KL to the initial policy bounded."""
    cache, out = tmp_path / "cache", tmp_path / "out"
    cmd = [sys.executable, str(REPO / "launch.py"), "demo", "--fast", "--cache_dir", str(cache), "--out", str(out),
           "--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    ev = summary["evaluation"]
    noise = max(abs(ev["seed_difference"]), ev["score_rise_stderr"])
    assert ev["score_rise"] > 0.05 and ev["score_rise"] > 4 * noise, ev
    assert 0 < ev["final"]["kl"] < 3 * summary["settings"]["kl_target"], ev
    assert summary["reward_model"]["heldout_accuracy"] > summary["reward_model"]["chance_accuracy"]
    for name in ("score.png", "kl.png", "kl_coef.png", "reward_loss.png"):
        assert (out / name).stat().st_size > 1000
    assert len(summary["samples"]["initial"]) == len(summary["samples"]["final"]) == ev["num_queries"]
    # a second run reuses every stage
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert again.returncode == 0 and again.stdout.count(": cached (") == len(demo.STAGES), again.stdout[-2000:]
